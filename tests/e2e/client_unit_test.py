"""The Python client on its own: tensor conversion, the safetensors module, and the retry policy
(against a fake TernaryTrainer served in-process by grpcio, which fails on command)."""

import concurrent.futures
import unittest

import grpc
import numpy as np

import tscale
from tscale import safetensors
from tscale.v1 import trainer_pb2, trainer_pb2_grpc


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
    """Fails the first `failures[method]` calls of a method with `code`, then answers."""

    def __init__(self):
        self.failures = {}
        self.code = grpc.StatusCode.UNAVAILABLE
        self.calls = {}

    def _maybe_fail(self, method, context):
        self.calls[method] = self.calls.get(method, 0) + 1
        if self.failures.get(method, 0) > 0:
            self.failures[method] -= 1
            context.abort(self.code, f"injected failure of {method}")

    def GetModel(self, request, context):
        self._maybe_fail("GetModel", context)
        return trainer_pb2.ModelInfo(model_id=request.model_id, step=3)

    def Forward(self, request, context):
        self._maybe_fail("Forward", context)
        return trainer_pb2.ForwardResponse(output=request.input,
                                           pass_id="p1" if request.train else "", step=3)

    def Backward(self, request, context):
        self._maybe_fail("Backward", context)
        return trainer_pb2.BackwardResponse()

    def UpdateCorrelation(self, request, context):
        self._maybe_fail("UpdateCorrelation", context)
        return trainer_pb2.UpdateCorrelationResponse(step=request.expected_step + 1,
                                                     replayed=self.calls["UpdateCorrelation"] > 1)

    def TrainStep(self, request, context):
        self._maybe_fail("TrainStep", context)
        return trainer_pb2.TrainStepResponse(loss=0.5, step=request.expected_step + 1,
                                             replayed=self.calls["TrainStep"] > 1)

    def CreateModel(self, request, context):
        self._maybe_fail("CreateModel", context)
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


if __name__ == "__main__":
    unittest.main()
