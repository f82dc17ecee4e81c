"""Float tensors on the wire as BF16 or FP16, and gzip, through a real tscale-server: values that
the narrow types hold exactly train to the same state as FP32 (the server computes in float32
whatever came), outputs and input gradients come back rounded once, a response dtype other than
FP32, BF16 or FP16 is refused naming its field, and the error of each type on random data is
printed (the figures of docs/wire.md)."""

import socket
import threading
import unittest

import grpc
import numpy as np

import tscale
from server_process import ErrorAssertions, ServerProcess
from tscale.v1 import trainer_pb2

SPEC = {"layers": [
    {"name": "fc1", "ternary_linear": {"in_features": 32, "out_features": 64}},
    {"name": "act", "activation": {"kind": "RELU"}},
    {"name": "fc2", "ternary_linear": {"in_features": 64, "out_features": 16}},
]}
# The rounding error of one conversion: half a unit in the last place, relative (2^-9 for BF16's
# 8 bits, 2^-11 for FP16's 11; BF16's bound doubled for values at a power of two's edge), and for
# FP16 half its smallest subnormal step (2^-25) below its normal range (6.1e-5).
BOUND = {"bf16": 2.0 ** -8, "fp16": 2.0 ** -11}
FLOOR = {"bf16": 0.0, "fp16": 2.0 ** -25}


def within(got, want, wire):
    return bool(np.all(np.abs(got - want) <= BOUND[wire] * np.abs(want) + FLOOR[wire]))


class CountingProxy:
    """A TCP proxy on loopback that forwards to `target` and counts the bytes coming back."""

    def __init__(self, target):
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(8)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._back = 0
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self._target)
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, src, dst, back):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if back:
                    with self._lock:
                        self._back += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def received(self):
        with self._lock:
            return self._back

    def close(self):
        self._closed = True
        self._listener.close()


def tensors(state):
    return {k: v.tobytes() for k, v in tscale.safetensors.loads(state)[0].items()}


def integer_batch(seed, rows=16):
    rng = np.random.RandomState(seed)
    return (rng.randint(-3, 4, size=(rows, 32)).astype(np.float32),
            rng.randint(-3, 4, size=(rows, 16)).astype(np.float32))


class WireTest(ErrorAssertions, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = ServerProcess().start()
        cls.fp32 = cls.server.client()

    @classmethod
    def tearDownClass(cls):
        cls.fp32.close()
        cls.server.stop()
        cls.server.remove_logs()

    def test_exact_values_train_the_same_state_and_outputs_round_once(self):
        for wire in ("bf16", "fp16"):
            with self.subTest(wire=wire), \
                    self.server.client(wire_dtype=wire, compression="gzip") as narrow:
                a, b = f"a-{wire}", f"b-{wire}"
                self.fp32.create_model(a, SPEC, seed=2)
                narrow.create_model(b, SPEC, seed=2)
                for step in range(10):
                    x, y = integer_batch(step)
                    ra = self.fp32.train_step(a, x, y, expected_step=step, want_output=True)
                    rb = narrow.train_step(b, x, y, expected_step=step, want_output=True)
                    self.assertEqual(ra.loss, rb.loss, f"{wire}: step {step}")
                    self.assertEqual(rb.output.dtype, np.float32)
                    self.assertTrue(within(rb.output, ra.output, wire),
                                    f"{wire}: output error {np.abs(rb.output - ra.output).max()}")
                self.assertEqual(tensors(self.fp32.export_state(a)),
                                 tensors(narrow.export_state(b)))
                # Forward and Backward: the input gradient rounds once too.
                x, _ = integer_batch(50)
                fa = self.fp32.forward(a, x, train=True)
                fb = narrow.forward(b, x, train=True)
                g = np.ones_like(fa.output)
                ga = self.fp32.backward(a, fa.pass_id, g, want_grad_input=True)
                gb = narrow.backward(b, fb.pass_id, g, want_grad_input=True)
                self.assertTrue(within(gb, ga, wire),
                                f"{wire}: input gradient error {np.abs(gb - ga).max()}")

    def test_error_of_each_type_on_random_data(self):
        rng = np.random.RandomState(7)
        data = [(rng.randn(64, 32).astype(np.float32), rng.randn(64, 16).astype(np.float32))
                for _ in range(20)]
        states, outputs = {}, {}
        for wire in ("fp32", "bf16", "fp16"):
            with self.server.client(wire_dtype=wire) as c:
                name = f"r-{wire}"
                c.create_model(name, SPEC, seed=5)
                for step, (x, y) in enumerate(data):
                    c.train_step(name, x, y, expected_step=step)
                states[wire] = tscale.safetensors.loads(c.export_state(name))[0]
                outputs[wire] = c.forward(name, data[0][0]).output
        for wire in ("bf16", "fp16"):
            same = np.mean([np.mean(states[wire][k] == states["fp32"][k])
                            for k in states["fp32"] if k.endswith("corr_accum")])
            rel = np.abs(outputs[wire] - outputs["fp32"]).max() / np.abs(outputs["fp32"]).max()
            print(f"\nwire_test: {wire} on the wire, 20 TrainSteps of random data: "
                  f"{same:.4f} of corr_accum equal to FP32's; output max error "
                  f"{rel:.2e} of the largest output")
            self.assertGreater(same, 0.5)

    def test_a_response_dtype_or_input_dtype_outside_the_float_types_is_refused(self):
        self.fp32.create_model("d", SPEC, seed=1)
        x, _ = integer_batch(0)
        with grpc.insecure_channel(self.server.address) as channel:
            stub = tscale.v1.trainer_pb2_grpc.TernaryTrainerStub(channel)
            req = trainer_pb2.ForwardRequest(model_id="d", input=tscale.tensors.to_tensor(x),
                                             output_dtype=trainer_pb2.INT8)
            with self.assertRaises(grpc.RpcError) as cm:
                stub.Forward(req)
            self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
            self.assertIn("output_dtype: expected FP32, BF16 or FP16, got INT8",
                          cm.exception.details())
            req = trainer_pb2.ForwardRequest(
                model_id="d", input=tscale.tensors.to_tensor(x.astype(np.int8)))
            with self.assertRaises(grpc.RpcError) as cm:
                stub.Forward(req)
            self.assertIn("input.dtype: expected FP32, BF16 or FP16, got INT8",
                          cm.exception.details())
        self.assertEqual(self.fp32.get_model("d").pending_passes, 0)

    def test_gzip_shrinks_what_crosses_the_link(self):
        """Through a byte-counting TCP proxy: the state of a fresh model (its corr_accum all
        zeros) exported by a gzip client crosses in far fewer bytes than by a plain one, and is
        the same file."""
        self.fp32.create_model("z", {"layers": [{"name": "fc", "ternary_linear": {
            "in_features": 512, "out_features": 512}}]}, seed=1)
        counted = {}
        for compression in (None, "gzip"):
            proxy = CountingProxy(self.server.address)
            try:
                with tscale.Client(proxy.address, compression=compression) as c:
                    counted[compression] = (c.export_state("z"), proxy.received())
            finally:
                proxy.close()
        self.assertEqual(counted[None][0], counted["gzip"][0])
        print(f"\nwire_test: ExportState of a fresh 512x512 model: {counted[None][1]} bytes "
              f"from the server plain, {counted['gzip'][1]} with gzip")
        self.assertLess(counted["gzip"][1], counted[None][1] / 2)

    def test_client_options_are_checked(self):
        with self.assertRaises(ValueError) as cm:
            tscale.Client(self.server.address, wire_dtype="int8")
        self.assertIn("wire_dtype: expected one of fp32, bf16, fp16, got 'int8'",
                      str(cm.exception))
        with self.assertRaises(ValueError):
            tscale.Client(self.server.address, compression="zstd")


if __name__ == "__main__":
    unittest.main()
