"""The Python client on its own: tensor conversion (numpy and torch), the safetensors module,
addresses, loss names, connection failures and the retry policy (against a fake TernaryTrainer
served in-process by grpcio, which fails on command)."""

import concurrent.futures
import importlib
import importlib.util
import inspect
import os
import re
import socket
import subprocess
import sys
import threading
import time
import unittest

import grpc
import numpy as np

import tscale
from tscale import client as client_module
from tscale import safetensors
from tscale.v1 import trainer_pb2, trainer_pb2_grpc

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HAVE_TORCH = importlib.util.find_spec("torch") is not None
NO_TORCH = "torch (python3-torch) is not installed"
if not HAVE_TORCH:
    print(f"client_unit_test: torch tests skipped: {NO_TORCH}", flush=True)


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TensorsTest(unittest.TestCase):

    def test_round_trip_every_dtype(self):
        for dtype, proto in ((np.float32, trainer_pb2.FP32), (np.float16, trainer_pb2.FP16),
                             (np.int8, trainer_pb2.INT8), (np.uint8, trainer_pb2.UINT8),
                             (np.int32, trainer_pb2.INT32), (np.int64, trainer_pb2.INT64)):
            a = (np.arange(24) - 7).astype(dtype).reshape(2, 3, 4)
            t = tscale.to_tensor(a)
            self.assertEqual(t.dtype, proto)
            self.assertEqual(list(t.shape), [2, 3, 4])
            self.assertEqual(len(t.data), a.nbytes)
            b = tscale.to_numpy(t)
            self.assertEqual(b.dtype, a.dtype)
            np.testing.assert_array_equal(a, b)
            b[0, 0, 0] = 1  # writable

    def test_little_endian_and_contiguous(self):
        a = np.arange(6, dtype=">i4").reshape(2, 3)
        self.assertEqual(tscale.to_tensor(a).data[:8], b"\x00\x00\x00\x00\x01\x00\x00\x00")
        f = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
        np.testing.assert_array_equal(tscale.to_numpy(tscale.to_tensor(f)), f)
        s = np.arange(10, dtype=np.float32)[::2]
        np.testing.assert_array_equal(tscale.to_numpy(tscale.to_tensor(s)), s)

    def test_zero_dim_and_empty(self):
        t = tscale.to_tensor(np.int64(5))
        self.assertEqual(list(t.shape), [])
        self.assertEqual(tscale.to_numpy(t), 5)
        e = tscale.to_numpy(tscale.to_tensor(np.zeros((0, 4), np.float32)))
        self.assertEqual(e.shape, (0, 4))

    def test_rejects_other_dtypes(self):
        for bad in (np.zeros(2, np.float64), np.zeros(2, bool), np.zeros(2, np.int16),
                    np.zeros(2, np.complex64), np.array(["a"]), [1.0, 2.0]):
            with self.assertRaisesRegex(ValueError, "expected"):
                tscale.to_tensor(bad, "input")

    def test_bad_tensor_from_server(self):
        with self.assertRaisesRegex(ValueError, "output: expected 8 bytes"):
            tscale.to_numpy(trainer_pb2.Tensor(dtype=trainer_pb2.FP32, shape=[2], data=b"1234"),
                            "output")
        with self.assertRaisesRegex(ValueError, "unsupported dtype"):
            tscale.to_numpy(trainer_pb2.Tensor(dtype=trainer_pb2.DATA_TYPE_UNSPECIFIED))
        bf16 = np.array([1.0, -2.5], np.float32).view(np.uint32) >> 16
        t = trainer_pb2.Tensor(dtype=trainer_pb2.BF16, shape=[2],
                               data=bf16.astype("<u2").tobytes())
        np.testing.assert_array_equal(tscale.to_numpy(t), [1.0, -2.5])


class SafetensorsTest(unittest.TestCase):

    def test_round_trip(self):
        tensors = {"a.E": np.array([-3, 0, 2], np.int8),
                   "a._T_pad": np.array(4, np.int64),
                   "a.w": np.arange(6, dtype=np.float32).reshape(2, 3),
                   "z": np.zeros((0,), np.uint8)}
        data = safetensors.dumps(tensors, {"format": "tscale/1"}, crc=True)
        (n,) = np.frombuffer(data[:8], "<u8")
        self.assertEqual(n % 8, 0)
        self.assertTrue(data[8:8 + int(n)].rstrip(b" ").endswith(b"}"))
        got, md = safetensors.loads(data)
        self.assertEqual(list(got), list(tensors))
        for k, v in tensors.items():
            self.assertEqual(got[k].dtype, v.dtype)
            self.assertEqual(got[k].shape, v.shape)
            np.testing.assert_array_equal(got[k], v)
        self.assertEqual(md["format"], "tscale/1")
        self.assertEqual(md["crc32c"], safetensors.crc32c_hex(safetensors.data_section(data)))
        self.assertEqual(safetensors.read_metadata(data), md)
        self.assertEqual(safetensors.loads(safetensors.dumps(tensors))[1], {})

    def test_crc32c(self):
        self.assertEqual(safetensors.crc32c(b"123456789"), 0xE3069283)
        self.assertEqual(safetensors.crc32c_hex(b""), "00000000")

    def test_malformed(self):
        good = safetensors.dumps({"x": np.arange(4, dtype=np.int32)})
        for bad in (b"", good[:7], b"\xff" * 8 + b"{}", good[:-1], good + b"\0",
                    b"\x02\x00\x00\x00\x00\x00\x00\x00[]"):
            with self.assertRaises(ValueError):
                safetensors.loads(bad)
        with self.assertRaisesRegex(ValueError, "unsupported dtype"):
            safetensors.dumps({"x": np.zeros(2, np.complex64)})


# ---------------------------------------------------------------- retries

class FakeTrainer(trainer_pb2_grpc.TernaryTrainerServicer):
    """Fails the first `failures[method]` calls of a method with `code`, then answers. Keeps
    every request it received, by method, in `requests`."""

    def __init__(self):
        self.failures = {}
        self.code = grpc.StatusCode.UNAVAILABLE
        self.calls = {}
        self.requests = {}

    def _maybe_fail(self, method, context, request=None):
        self.calls[method] = self.calls.get(method, 0) + 1
        self.requests.setdefault(method, []).append(request)
        if self.failures.get(method, 0) > 0:
            self.failures[method] -= 1
            context.abort(self.code, f"injected failure of {method}")

    def GetModel(self, request, context):
        self._maybe_fail("GetModel", context, request)
        return trainer_pb2.ModelInfo(model_id=request.model_id, step=3)

    def Forward(self, request, context):
        self._maybe_fail("Forward", context, request)
        return trainer_pb2.ForwardResponse(output=request.input,
                                           pass_id="p1" if request.train else "", step=3)

    def Backward(self, request, context):
        self._maybe_fail("Backward", context, request)
        if request.want_grad_input:  # the gradient given, as if the model were the identity
            return trainer_pb2.BackwardResponse(grad_input=request.grad_output)
        return trainer_pb2.BackwardResponse()

    def UpdateCorrelation(self, request, context):
        self._maybe_fail("UpdateCorrelation", context, request)
        return trainer_pb2.UpdateCorrelationResponse(step=request.expected_step + 1,
                                                     replayed=self.calls["UpdateCorrelation"] > 1)

    def TrainStep(self, request, context):
        self._maybe_fail("TrainStep", context, request)
        out = trainer_pb2.TrainStepResponse(loss=0.5, step=request.expected_step + 1,
                                            replayed=self.calls["TrainStep"] > 1)
        if request.want_output:
            out.output.CopyFrom(request.input)
        return out

    def CreateModel(self, request, context):
        self._maybe_fail("CreateModel", context, request)
        return trainer_pb2.ModelInfo(model_id=request.model_id)

    def DeleteModel(self, request, context):
        self._maybe_fail("DeleteModel", context)
        return trainer_pb2.DeleteModelResponse()

    def ExportState(self, request, context):
        self._maybe_fail("ExportState", context)
        for part in (b"abc", b"def"):
            yield trainer_pb2.StateChunk(data=part)

    def ImportState(self, request_iterator, context):
        self._maybe_fail("ImportState", context)
        reqs = list(request_iterator)
        header = reqs[0].header
        data = b"".join(r.data for r in reqs[1:])
        return trainer_pb2.ModelInfo(model_id=header.model_id, persistent_bytes=len(data),
                                     step=len(reqs) - 1)


class RetryTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.fake = FakeTrainer()
        cls.server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
        trainer_pb2_grpc.add_TernaryTrainerServicer_to_server(cls.fake, cls.server)
        port = cls.server.add_insecure_port("127.0.0.1:0")
        cls.server.start()
        cls.client = tscale.Client(f"127.0.0.1:{port}", timeout=10, retries=2, backoff=0.01)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        cls.server.stop(None)

    def setUp(self):
        self.fake.failures = {}
        self.fake.calls = {}
        self.fake.requests = {}
        self.fake.code = grpc.StatusCode.UNAVAILABLE

    def inject(self, method, times, code=grpc.StatusCode.UNAVAILABLE):
        self.fake.failures[method] = times
        self.fake.code = code

    def test_reads_are_retried(self):
        self.inject("GetModel", 2)
        self.assertEqual(self.client.get_model("m").step, 3)
        self.assertEqual(self.fake.calls["GetModel"], 3)

    def test_retries_are_bounded(self):
        self.inject("GetModel", 5)
        with self.assertRaises(tscale.Error) as cm:
            self.client.get_model("m")
        self.assertEqual(cm.exception.code, grpc.StatusCode.UNAVAILABLE)
        self.assertIn("injected failure", cm.exception.message)
        self.assertEqual(cm.exception.method, "GetModel")
        self.assertEqual(self.fake.calls["GetModel"], 3)

    def test_other_codes_are_not_retried(self):
        self.inject("GetModel", 1, grpc.StatusCode.NOT_FOUND)
        with self.assertRaises(tscale.Error) as cm:
            self.client.get_model("m")
        self.assertEqual(cm.exception.code, grpc.StatusCode.NOT_FOUND)
        self.assertEqual(self.fake.calls["GetModel"], 1)

    def test_deadline_exceeded_is_retried_for_exactly_once_calls(self):
        self.inject("TrainStep", 1, grpc.StatusCode.DEADLINE_EXCEEDED)
        r = self.client.train_step("m", np.zeros((1, 2), np.float32), np.zeros((1, 2), np.float32),
                                   expected_step=3)
        self.assertEqual((r.step, r.replayed), (4, True))
        self.inject("UpdateCorrelation", 1)
        u = self.client.update_correlation("m", 3)
        self.assertEqual((u.step, u.replayed), (4, True))

    def test_an_unknown_outcome_says_which_step_to_read(self):
        """An exactly-once call that failed without an answer (retries spent) may have been
        applied: the message says so, and which step tells."""
        zeros = np.zeros((1, 2), np.float32)
        self.inject("TrainStep", 5, grpc.StatusCode.DEADLINE_EXCEEDED)
        with self.assertRaises(tscale.Error) as cm:
            self.client.train_step("m", zeros, zeros, expected_step=3)
        self.assertEqual(cm.exception.code, grpc.StatusCode.DEADLINE_EXCEEDED)
        self.assertIn("injected failure of TrainStep (TrainStep with expected_step 3 may have "
                      "been applied: read the model's step (get_model): 4 means it was, 3 that "
                      "it was not; sending it again with expected_step 3 is safe",
                      cm.exception.message)
        self.assertEqual(cm.exception.details, "injected failure of TrainStep")
        self.inject("UpdateCorrelation", 5)
        with self.assertRaises(tscale.Error) as cm:
            self.client.update_correlation("m", 7)
        self.assertIn("UpdateCorrelation with expected_step 7 may have been applied",
                      cm.exception.message)
        # Not for calls that change nothing, nor for other codes.
        self.inject("GetModel", 5, grpc.StatusCode.DEADLINE_EXCEEDED)
        with self.assertRaises(tscale.Error) as cm:
            self.client.get_model("m")
        self.assertNotIn("may have been applied", cm.exception.message)
        self.inject("TrainStep", 1, grpc.StatusCode.FAILED_PRECONDITION)
        with self.assertRaises(tscale.Error) as cm:
            self.client.train_step("m", zeros, zeros, expected_step=3)
        self.assertNotIn("may have been applied", cm.exception.message)

    def test_cancelled_by_the_server_is_retried_for_exactly_once_calls(self):
        # A server shutting down cancels what still runs; the exactly-once calls are retried.
        self.inject("TrainStep", 1, grpc.StatusCode.CANCELLED)
        r = self.client.train_step("m", np.zeros((1, 2), np.float32), np.zeros((1, 2), np.float32),
                                   expected_step=3)
        self.assertEqual((r.step, r.replayed), (4, True))
        self.assertEqual(self.fake.calls["TrainStep"], 2)
        self.inject("UpdateCorrelation", 1, grpc.StatusCode.CANCELLED)
        self.assertEqual(self.client.update_correlation("m", 3).step, 4)
        # Not calls that could apply twice.
        self.inject("CreateModel", 1, grpc.StatusCode.CANCELLED)
        with self.assertRaises(tscale.Error) as cm:
            self.client.create_model("m", {"layers": []})
        self.assertEqual(cm.exception.code, grpc.StatusCode.CANCELLED)

    def test_eval_forward_retried_training_forward_not(self):
        x = np.ones((2, 2), np.float32)
        self.inject("Forward", 1)
        np.testing.assert_array_equal(self.client.forward("m", x).output, x)
        self.assertEqual(self.fake.calls["Forward"], 2)
        self.fake.calls = {}
        self.inject("Forward", 1)
        with self.assertRaises(tscale.Error):
            self.client.forward("m", x, train=True)
        self.assertEqual(self.fake.calls["Forward"], 1)

    def test_never_retried(self):
        x = np.ones((2, 2), np.float32)
        for method, call in (
                ("Backward", lambda: self.client.backward("m", "p1", x)),
                ("CreateModel", lambda: self.client.create_model("m", {"layers": []})),
                ("DeleteModel", lambda: self.client.delete_model("m")),
                ("ImportState", lambda: self.client.import_state("m", b"xyz"))):
            self.fake.calls = {}
            self.inject(method, 1)
            with self.assertRaises(tscale.Error) as cm:
                call()
            self.assertEqual(cm.exception.code, grpc.StatusCode.UNAVAILABLE)
            self.assertEqual(self.fake.calls[method], 1, method)

    def test_export_retried_and_joined(self):
        self.inject("ExportState", 1)
        self.assertEqual(self.client.export_state("m"), b"abcdef")

    def test_import_sends_header_then_1mib_chunks(self):
        data = bytes(range(256)) * (5 * 4096 + 1)  # 5 MiB + 256 bytes
        info = self.client.import_state("m", data, spec={"layers": []})
        self.assertEqual(info.persistent_bytes, len(data))
        self.assertEqual(info.step, 6)  # data messages

    def test_create_with_exist_ok_is_retried(self):
        """With exist_ok a repeat cannot fail on its own model, so CreateModel is retried."""
        self.inject("CreateModel", 1)
        self.assertEqual(self.client.create_model("m", {"layers": []}, exist_ok=True).model_id,
                         "m")
        self.assertEqual(self.fake.calls["CreateModel"], 2)

    def test_loss_names_of_the_cli(self):
        """The CLI's --loss names (mse, ce), the API's names and short names, in any case."""
        x = np.zeros((2, 3), np.float32)
        labels = np.array([0, 2], np.int32)
        mse, ce = trainer_pb2.TrainStepRequest.MSE, trainer_pb2.TrainStepRequest.CROSS_ENTROPY
        for name, want in (("mse", mse), ("MSE", mse), ("Mse", mse), ("ce", ce), ("CE", ce),
                           ("Ce", ce), ("cross_entropy", ce), ("CROSS_ENTROPY", ce), (ce, ce)):
            self.fake.requests = {}
            target = labels if want == ce else x
            self.client.train_step("m", x, target, loss=name, expected_step=3)
            req = self.fake.requests["TrainStep"][-1]
            self.assertEqual(req.loss, want, name)
            if want == ce:
                self.assertEqual(req.target.dtype, trainer_pb2.INT64, name)
        with self.assertRaisesRegex(ValueError, "loss: expected one of .*ce.*got 'hinge'"):
            self.client.train_step("m", x, x, loss="hinge", expected_step=3)


class RetryTimeTest(unittest.TestCase):
    """The total retry time: calls that are safe to repeat ride through an outage of up to
    retry_seconds (60 s by default) once the server has answered, and the exactly-once calls
    repeat their expected_step on every attempt."""

    def setUp(self):
        self.fake = FakeTrainer()
        self.servers = []

    def tearDown(self):
        for server in self.servers:
            server.stop(None)

    def serve(self, port=0):
        server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4),
                             options=[("grpc.so_reuseport", 0)])
        trainer_pb2_grpc.add_TernaryTrainerServicer_to_server(self.fake, server)
        port = server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        self.servers.append(server)
        return server, port

    def test_default_rides_through_many_failures(self):
        _, port = self.serve()
        with tscale.Client(f"127.0.0.1:{port}", timeout=10, backoff=0.001) as client:
            self.assertEqual(client.get_model("m").step, 3)  # the server has answered
            self.fake.failures = {"UpdateCorrelation": 8, "TrainStep": 8}
            u = client.update_correlation("m", expected_step=7)
            self.assertEqual((u.step, u.replayed), (8, True))
            r = client.train_step("m", np.zeros((1, 2), np.float32),
                                  np.zeros((1, 2), np.float32), expected_step=7)
            self.assertEqual((r.step, r.replayed), (8, True))
        for method in ("UpdateCorrelation", "TrainStep"):
            self.assertEqual(self.fake.calls[method], 9, method)
            self.assertEqual({req.expected_step for req in self.fake.requests[method]}, {7},
                             f"{method}: every attempt sends the same expected_step")

    def test_retry_seconds_bounds_the_retries(self):
        _, port = self.serve()
        with tscale.Client(f"127.0.0.1:{port}", timeout=10, backoff=0.01,
                           retry_seconds=0.5) as client:
            client.get_model("m")
            self.fake.failures = {"GetModel": 10 ** 6}
            start = time.monotonic()
            with self.assertRaises(tscale.Error) as cm:
                client.get_model("m")
            elapsed = time.monotonic() - start
        self.assertEqual(cm.exception.code, grpc.StatusCode.UNAVAILABLE)
        self.assertIn("injected failure", cm.exception.message)
        self.assertGreaterEqual(elapsed, 0.5)
        self.assertLess(elapsed, 5.0)
        self.assertGreater(self.fake.calls["GetModel"], 5)

    def test_a_server_never_reached_fails_fast(self):
        """Before the first answer, a few retries only: a wrong address is not waited on."""
        _, port = self.serve()
        self.fake.failures = {"GetModel": 100}
        with tscale.Client(f"127.0.0.1:{port}", timeout=10, backoff=0.01) as client:
            with self.assertRaises(tscale.Error):
                client.get_model("m")
        self.assertEqual(self.fake.calls["GetModel"], 4)

    def test_rides_through_a_server_restart(self):
        """The server goes away and comes back on the same port 2 s later: an exactly-once call
        made meanwhile succeeds, with its expected_step."""
        server, port = self.serve()
        with tscale.Client(f"127.0.0.1:{port}", timeout=10) as client:
            client.get_model("m")
            server.stop(None).wait()
            restarted = threading.Timer(2.0, lambda: self.serve(port))
            restarted.start()
            try:
                start = time.monotonic()
                r = client.train_step("m", np.zeros((1, 2), np.float32),
                                      np.zeros((1, 2), np.float32), expected_step=5)
                elapsed = time.monotonic() - start
            finally:
                restarted.join()
        self.assertEqual(r.step, 6)
        self.assertGreaterEqual(elapsed, 1.5)
        self.assertLess(elapsed, 15.0, "the channel must notice the server soon after it is back")


class AddressTest(unittest.TestCase):
    """Addresses as the CLI takes them: HOST alone means port 50051 (gRPC's own default is 443)."""

    def test_default_port(self):
        for given, want in (("localhost", "localhost:50051"),
                            ("10.1.2.3", "10.1.2.3:50051"),
                            ("tscale.ns.svc", "tscale.ns.svc:50051"),
                            ("[::1]", "[::1]:50051"),
                            ("::1", "[::1]:50051"),
                            ("localhost:1234", "localhost:1234"),
                            ("[::1]:1234", "[::1]:1234"),
                            ("dns:///localhost:1234", "dns:///localhost:1234"),
                            ("unix:/tmp/tscale.sock", "unix:/tmp/tscale.sock")):
            with tscale.Client(given) as client:
                self.assertEqual(client.address, want, given)

    def test_bad_addresses(self):
        for bad in ("", "host:", "host:port", ":50051", "host:99999", "[::1]x", None):
            with self.assertRaisesRegex(ValueError, "address: expected"):
                tscale.Client(bad)

    def test_host_without_port_reaches_port_50051(self):
        fake = FakeTrainer()
        server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2),
                             options=[("grpc.so_reuseport", 0)])
        trainer_pb2_grpc.add_TernaryTrainerServicer_to_server(fake, server)
        try:
            bound = server.add_insecure_port("127.0.0.1:50051")
        except RuntimeError:
            bound = 0
        if bound != 50051:
            self.skipTest("port 50051 on 127.0.0.1 is taken")
        server.start()
        try:
            with tscale.Client("127.0.0.1", timeout=10) as client:
                self.assertEqual(client.get_model("m").step, 3)
        finally:
            server.stop(None)


class ConnectionFailureTest(unittest.TestCase):
    """A server that cannot be reached is named, with the reason, in the client's own words."""

    def test_connection_refused(self):
        port = free_port()
        start = time.monotonic()
        with tscale.Client(f"127.0.0.1:{port}", timeout=10) as client:
            with self.assertRaises(tscale.Error) as cm:
                client.get_model("m")
        self.assertLess(time.monotonic() - start, 10.0)
        e = cm.exception
        self.assertEqual(e.code, grpc.StatusCode.UNAVAILABLE)
        self.assertEqual(e.message,
                         f"no tscale-server answering at 127.0.0.1:{port} (connection refused)")
        self.assertEqual(e.method, "GetModel")
        self.assertIn("Connection refused", e.details)  # gRPC's own text stays at hand
        self.assertIn(f"no tscale-server answering at 127.0.0.1:{port}", str(e))

    def test_grpc_texts(self):
        describe = client_module._connection_failure
        address = "h:50051"
        for details, want in (
                ("failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.1:50051: "
                 "Failed to connect to remote host: Connection refused",
                 "no tscale-server answering at h:50051 (connection refused)"),
                ("failed to connect to all addresses; last error: UNAVAILABLE: "
                 "ipv6:%5B::1%5D:50051: Connection timed out",
                 "no tscale-server answering at h:50051 (connection timed out)"),
                ("DNS resolution failed for h:50051: C-ares status is not ARES_SUCCESS qtype=A "
                 "name=h is_balancer=0: Domain name not found",
                 "no tscale-server answering at h:50051 (DNS resolution failed: domain name not "
                 "found)"),
                ("failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.1:50051: "
                 "Ssl handshake failed: SSL_ERROR_SSL: error:1000007d:SSL "
                 "routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED",
                 "TLS handshake with h:50051 failed (Ssl handshake failed: SSL_ERROR_SSL: "
                 "error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED)"),
                ("failed to connect to all addresses; last error: UNAVAILABLE: "
                 "ipv4:10.0.0.1:50051: Socket closed",
                 "h:50051 closed the connection before answering (socket closed): a plaintext "
                 "client at a TLS server, or a client certificate the server refuses, ends so"),
                ("Socket closed", None),
                ("server shutting down", None)):
            self.assertEqual(describe(address, details), want, details)


    def test_tls_texts(self):
        """gRPC's texts that are clear about TLS, told in words of what to change, with no
        handshake of the client's own (credentials it cannot look into: tls None)."""
        diagnose = client_module._diagnose.diagnose
        prefix = "failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.1:50051: "
        for details, want in (
                (prefix + "Peer name h is not in peer certificate",
                 "TLS: the certificate of h:50051 does not name h: connect by a name the "
                 "certificate holds, or, through a tunnel or proxy, give that name with "
                 "tls_server_name (the CLI's --tls-server-name NAME)"),
                (prefix + "Ssl handshake failed: SSL_ERROR_SSL: error:0A00010B:SSL "
                 "routines::wrong version number",
                 "TLS: h:50051 does not speak TLS (a plaintext server?): connect without the TLS "
                 "options (tls, tls_ca, ...; the CLI's --tls, --tls-ca), or start the server "
                 "with --tls-cert and --tls-key"),
                (prefix + "Ssl handshake failed: SSL_ERROR_SSL: error:1000007d:SSL "
                 "routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED",
                 "TLS: the certificate of h:50051 is not signed by a CA this client trusts "
                 "(certificate verify failed): give the CA that signed it (tls_ca; the CLI's "
                 "--tls-ca FILE)"),
                (prefix + "Failed to connect to remote host: Connection refused", None),
                (prefix + "Socket closed", None),  # ambiguous, and nothing to probe with
                ("the server is shutting down; nothing was applied", None)):
            self.assertEqual(diagnose("h:50051", None, details), want, details)


class SpecTest(unittest.TestCase):

    def test_duplicate_keys_are_refused(self):
        """A key twice in one object would be read as one of its values without a word."""
        with self.assertRaisesRegex(ValueError, r"^spec: duplicate key 'in_features' in "
                                                r"layers\[1\]\.ternary_linear"):
            tscale.to_spec('{"layers": [{"name": "a", "activation": {"kind": "RELU"}}, '
                           '{"name": "fc", "ternary_linear": {"in_features": 4, '
                           '"out_features": 2, "in_features": 8}}]}')
        with self.assertRaisesRegex(ValueError, "duplicate key 'layers' at the top level"):
            tscale.to_spec('{"layers": [], "layers": []}')
        spec = tscale.to_spec('{"layers": [{"name": "a", "activation": {"kind": "RELU"}}, '
                              '{"name": "b", "activation": {"kind": "GELU"}}]}')
        self.assertEqual([l.name for l in spec.layers], ["a", "b"])


class VersionTest(unittest.TestCase):

    def test_version_is_the_projects(self):
        with open(os.path.join(REPO, "CMakeLists.txt")) as f:
            m = re.search(r"project\(tscale VERSION (\S+)", f.read())
        self.assertIsNotNone(m)
        self.assertEqual(tscale.__version__, m.group(1))


@unittest.skipUnless(HAVE_TORCH, NO_TORCH)
class TorchTensorsTest(unittest.TestCase):
    """torch tensors wherever numpy arrays go; results come back as torch when the input was."""

    @classmethod
    def setUpClass(cls):
        import torch
        cls.torch = torch
        cls.fake = FakeTrainer()
        cls.server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
        trainer_pb2_grpc.add_TernaryTrainerServicer_to_server(cls.fake, cls.server)
        port = cls.server.add_insecure_port("127.0.0.1:0")
        cls.server.start()
        cls.client = tscale.Client(f"127.0.0.1:{port}", timeout=10)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        cls.server.stop(None)

    def test_to_tensor(self):
        torch = self.torch
        for dtype in (torch.float32, torch.float16, torch.int8, torch.uint8, torch.int32,
                      torch.int64):
            t = (torch.arange(12) - 3).to(dtype).reshape(3, 4)
            want = tscale.to_tensor(t.numpy())
            self.assertEqual(tscale.to_tensor(t), want, dtype)
        x = torch.ones(2, 3, requires_grad=True) * 2  # not a leaf: needs detaching
        self.assertEqual(tscale.to_tensor(x), tscale.to_tensor(np.full((2, 3), 2, np.float32)))
        self.assertEqual(tscale.to_tensor(torch.arange(6.0).reshape(2, 3).t()),
                         tscale.to_tensor(np.arange(6, dtype=np.float32).reshape(2, 3).T))
        for bad in (torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.bfloat16),
                    torch.zeros(2, dtype=torch.bool)):
            with self.assertRaisesRegex(ValueError, f"input: expected dtype .*got {bad.dtype}"):
                tscale.to_tensor(bad, "input")

    def test_calls_answer_torch_for_torch(self):
        torch = self.torch
        x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
        y = self.client.forward("m", x).output
        self.assertIsInstance(y, torch.Tensor)
        self.assertTrue(torch.equal(y, x))
        self.assertIsInstance(self.client.forward("m", x.numpy()).output, np.ndarray)
        g = self.client.backward("m", "p1", x, want_grad_input=True)
        self.assertIsInstance(g, torch.Tensor)
        self.assertTrue(torch.equal(g, x))
        r = self.client.train_step("m", x, torch.tensor([0, 2], dtype=torch.int32), loss="ce",
                                   expected_step=3, want_output=True)
        self.assertIsInstance(r.output, torch.Tensor)
        self.assertTrue(torch.equal(r.output, x))
        req = self.fake.requests["TrainStep"][-1]
        self.assertEqual(req.target.dtype, trainer_pb2.INT64)
        np.testing.assert_array_equal(tscale.to_numpy(req.target), [0, 2])

    def test_cuda_tensors_go_through_the_host(self):
        torch = self.torch
        if not torch.cuda.is_available():
            self.skipTest("torch has no CUDA device here")
        x = torch.arange(6, dtype=torch.float32, device="cuda").reshape(2, 3)
        y = self.client.forward("m", x).output
        self.assertEqual(y.device, x.device)
        self.assertTrue(torch.equal(y, x))

    def test_numpy_alone_never_imports_torch(self):
        code = ("import sys, numpy as np, tscale\n"
                "tscale.to_numpy(tscale.to_tensor(np.zeros(2, np.float32)))\n"
                "tscale.Client('127.0.0.1:1').close()\n"
                "print('torch' in sys.modules)\n")
        out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             check=True, env=dict(os.environ)).stdout
        self.assertEqual(out.strip(), "False")


class TypeHintsTest(unittest.TestCase):
    """Every public function and method of the package (and every public class's __init__) has
    type hints on all its parameters and its return value; every public one has a docstring."""

    MODULES = ("tscale", "tscale.client", "tscale.group", "tscale.tensors", "tscale.safetensors",
               "tscale.errors", "tscale.stream")

    @staticmethod
    def ours(obj):
        module = getattr(obj, "__module__", None) or ""
        return (module == "tscale" or module.startswith("tscale.")) and \
            not module.startswith("tscale.v1")  # the generated messages are not ours

    @classmethod
    def public_functions(cls, module):
        """(qualified name, function) of the public functions, and the public methods and
        __init__ of the public classes, that ``module`` holds and the package defines."""
        found = []
        for name, value in vars(module).items():
            if name.startswith("_") or not cls.ours(value):
                continue
            if inspect.isfunction(value):
                found.append((f"{value.__module__}.{value.__qualname__}", value))
            elif inspect.isclass(value):
                for attr, member in vars(value).items():
                    if attr.startswith("_") and attr != "__init__":
                        continue
                    if isinstance(member, (staticmethod, classmethod)):
                        member = member.__func__
                    elif isinstance(member, property):
                        member = member.fget
                    if inspect.isfunction(member) and cls.ours(member):
                        found.append((f"{value.__module__}.{value.__qualname__}.{attr}", member))
        return found

    @staticmethod
    def problems(name, fn):
        """What ``fn`` lacks: its docstring (not asked of __init__: the class's documents it),
        a parameter's hint, the return hint; each naming the function."""
        out = []
        if fn.__name__ != "__init__" and not (fn.__doc__ or "").strip():
            out.append(f"{name}: no docstring")
        sig = inspect.signature(fn)
        for i, p in enumerate(sig.parameters.values()):
            if i == 0 and p.name in ("self", "cls"):
                continue
            if p.annotation is inspect.Parameter.empty:
                out.append(f"{name}: parameter {p.name} has no type hint")
            elif isinstance(p.annotation, str):
                compile(p.annotation, name, "eval")  # a hint that is not an expression fails
        if sig.return_annotation is inspect.Signature.empty:
            out.append(f"{name}: no return type hint")
        return out

    def check(self, module_names):
        functions = {}
        for module_name in module_names:
            for name, fn in self.public_functions(importlib.import_module(module_name)):
                functions[name] = fn
        problems = [p for name, fn in sorted(functions.items()) for p in self.problems(name, fn)]
        self.assertEqual(problems, [], "\n".join(problems))
        return functions

    def test_every_public_function_has_hints_and_a_docstring(self):
        functions = self.check(self.MODULES)
        for name in ("tscale.client.Client.train_step", "tscale.client.Client.__init__",
                     "tscale.client.to_spec", "tscale.group.ReplicaGroup.size",
                     "tscale.safetensors.dumps", "tscale.tensors.to_numpy",
                     "tscale.errors.Error.from_rpc_error", "tscale.stream.train_stream"):
            self.assertIn(name, functions)  # the walk reaches them

    @unittest.skipUnless(HAVE_TORCH, NO_TORCH)
    def test_tscale_torch_too(self):
        functions = self.check(["tscale.torch"])
        self.assertIn("tscale.torch.RemoteModel.update", functions)

    def test_the_check_names_what_is_missing(self):
        def bare(a, b: int = 0):
            return a

        def hinted(a: int) -> int:
            """Documented."""
            return a
        self.assertEqual(self.problems("m.bare", bare),
                         ["m.bare: no docstring", "m.bare: parameter a has no type hint",
                          "m.bare: no return type hint"])
        self.assertEqual(self.problems("m.hinted", hinted), [])


if __name__ == "__main__":
    unittest.main()
