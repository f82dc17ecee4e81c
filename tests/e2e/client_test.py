"""Every call of the Python client against a real tscale-server, and the error paths; torch
tensors, the CLI's loss names, create_model(exist_ok=True), and retries through a server restart.

Errors are checked by their gRPC code and by the field their message names.
"""

import importlib.util
import json
import os
import socket
import tempfile
import threading
import time
import unittest

import grpc
import numpy as np

import tscale
from tscale import safetensors
from server_process import ErrorAssertions, ServerProcess, ServerTestCase

HAVE_TORCH = importlib.util.find_spec("torch") is not None
NO_TORCH = "torch (python3-torch) is not installed"
if not HAVE_TORCH:
    print(f"client_test: torch tests skipped: {NO_TORCH}", flush=True)

SPEC = {"layers": [
    {"name": "fc1", "ternary_linear": {"in_features": 64, "out_features": 48,
                                       "group_size": 16}},
    {"name": "act1", "activation": {"kind": "RELU"}},
    {"name": "fc2", "ternary_linear": {"in_features": 48, "out_features": 10, "bias": True}},
]}
IN, OUT = 64, 10


def batch(n, seed=0, features=IN):
    return np.random.RandomState(seed).randn(n, features).astype(np.float32)


def unpack_trits(packed, shape, pad):
    """The reference's 5-trits-per-byte codec, decoded with numpy."""
    p = packed.astype(np.int16)
    digits = []
    for _ in range(5):
        digits.append(p % 3)
        p //= 3
    flat = np.stack(digits, axis=1).reshape(-1)
    if pad:
        flat = flat[:-pad]
    return (flat.reshape(shape) - 1).astype(np.int8)


def w_eff(state, layer, group_size):
    """The effective float32 weights of a ternary linear layer, from its exported state."""
    T = unpack_trits(state[f"{layer}.T_packed"], tuple(state[f"{layer}._T_shape"]),
                     int(state[f"{layer}._T_pad"]))
    out_d, in_d = T.shape
    gpr = -(-in_d // group_size)
    step = int(state[f"{layer}.step_counter"][0])
    E = state[f"{layer}.E"].astype(np.float32)
    if step > 0:
        mean_corr = state[f"{layer}.corr_accum"].astype(np.float32) / np.float32(step * group_size)
        E = E + mean_corr * np.float32(4.0)
    S = np.exp2(E).reshape(out_d, gpr).repeat(group_size, axis=1)[:, :in_d]
    return S * T.astype(np.float32)


def reference_forward(state, x):
    h = x @ w_eff(state, "fc1", 16).T
    h = np.maximum(h, 0)
    return h @ w_eff(state, "fc2", 32).T + state["fc2.bias"].astype(np.float32)


class ClientTest(ServerTestCase):

    def setUp(self):
        self._models = []

    def tearDown(self):
        for model_id in self._models:
            try:
                self.client.delete_model(model_id)
            except tscale.Error:
                pass

    def new_model(self, model_id, spec=SPEC, seed=1):
        self._models.append(model_id)
        return self.client.create_model(model_id, spec, seed=seed)

    # ------------------------------------------------------------ server

    def test_health(self):
        self.assertEqual(self.client.health(), "SERVING")
        self.assertEqual(self.client.health(""), "SERVING")
        self.assertEqual(self.client.health(tscale.SERVICE_NAME), "SERVING")
        with self.assertError(grpc.StatusCode.NOT_FOUND):
            self.client.health("no.such.Service")

    def test_reflection_lists_the_service(self):
        services = self.client.list_services()
        self.assertIn("tscale.v1.TernaryTrainer", services)
        self.assertIn("grpc.health.v1.Health", services)

    def test_version_matches_the_server(self):
        self.assertEqual(tscale.__version__, self.client.server_info().version)

    def test_server_info(self):
        info = self.client.server_info()
        self.assertTrue(info.version)
        self.assertEqual(info.default_device, "cpu")
        self.assertIn("cpu", info.devices)
        self.assertGreater(info.max_message_bytes, 0)
        self.assertGreater(info.max_pending_passes, 0)
        self.assertGreater(info.max_pending_bytes, 0)

    # ------------------------------------------------------------ models

    def test_model_lifecycle(self):
        info = self.new_model("life")
        self.assertEqual(info.model_id, "life")
        self.assertEqual(info.step, 0)
        self.assertEqual(info.device, "cpu")
        self.assertEqual(info.in_features, IN)
        self.assertEqual(info.out_features, OUT)
        self.assertEqual(info.ternary_params, 64 * 48 + 48 * 10)
        self.assertEqual(info.groups, 48 * 4 + 10 * 2)
        self.assertEqual([l.name for l in info.spec.layers], ["fc1", "act1", "fc2"])
        self.assertEqual(self.client.get_model("life"), info)
        models = {m.model_id: m for m in self.client.list_models()}
        self.assertIn("life", models)
        self.assertEqual(self.client.server_info().models, len(models))

        with self.assertError(grpc.StatusCode.ALREADY_EXISTS, "life"):
            self.client.create_model("life", SPEC)

        self.assertIsNone(self.client.delete_model("life"))
        with self.assertError(grpc.StatusCode.NOT_FOUND, "life"):
            self.client.get_model("life")
        with self.assertError(grpc.StatusCode.NOT_FOUND):
            self.client.delete_model("life")
        self.assertNotIn("life", [m.model_id for m in self.client.list_models()])

    def test_create_model_exist_ok(self):
        """exist_ok=True answers the existing model's info when it is the same model, and
        ALREADY_EXISTS, saying what differs, when it is not."""
        info = self.new_model("again", seed=4)
        x, target = batch(2), np.zeros((2, OUT), np.float32)
        self.client.train_step("again", x, target, expected_step=0)
        same = self.client.create_model("again", SPEC, seed=4, exist_ok=True)
        self.assertEqual(same.step, 1)  # the existing model, as it is now
        self.assertEqual(same, self.client.get_model("again"))
        self.assertEqual(same.spec, info.spec)
        # The defaults spelt out are the same spec; so is the compute type named.
        explicit = json.loads(json.dumps(SPEC))
        explicit["layers"][2]["ternary_linear"]["group_size"] = 32
        explicit["layers"][0]["ternary_linear"]["threshold"] = 0.05
        self.assertEqual(self.client.create_model("again", explicit, exist_ok=True,
                                                  compute="fp32", device="cpu").step, 1)
        other = json.loads(json.dumps(SPEC))
        other["layers"][0]["ternary_linear"]["group_size"] = 8
        with self.assertError(grpc.StatusCode.ALREADY_EXISTS, "again", "differs", "spec"):
            self.client.create_model("again", other, exist_ok=True)
        with self.assertError(grpc.StatusCode.ALREADY_EXISTS, "differs", "compute"):
            self.client.create_model("again", SPEC, compute="bf16", exist_ok=True)
        with self.assertError(grpc.StatusCode.ALREADY_EXISTS, "again"):
            self.client.create_model("again", SPEC, seed=4)  # exist_ok is off by default
        # A new id is simply created.
        self._models.append("fresh")
        self.assertEqual(self.client.create_model("fresh", SPEC, exist_ok=True).step, 0)
        self.assertEqual(self.client.get_model("again").step, 1)

    def test_create_is_deterministic_for_a_seed(self):
        self.new_model("seed-a", seed=42)
        self.new_model("seed-b", seed=42)
        self.new_model("seed-c", seed=43)
        a = safetensors.loads(self.client.export_state("seed-a"))[0]
        b = safetensors.loads(self.client.export_state("seed-b"))[0]
        c = safetensors.loads(self.client.export_state("seed-c"))[0]
        np.testing.assert_array_equal(a["fc1.T_packed"], b["fc1.T_packed"])
        self.assertFalse(np.array_equal(a["fc1.T_packed"], c["fc1.T_packed"]))

    def test_create_model_from_message_and_json(self):
        spec = tscale.to_spec(SPEC)
        self.assertEqual(self.new_model("from-msg", spec=spec).out_features, OUT)
        self.assertEqual(self.new_model("from-json", spec=json.dumps(SPEC)).out_features, OUT)

    def test_create_invalid_spec(self):
        bad = {"layers": [
            {"name": "fc1", "ternary_linear": {"in_features": 64, "out_features": 48}},
            {"name": "fc2", "ternary_linear": {"in_features": 32, "out_features": 10}},
        ]}
        with self.assertError(grpc.StatusCode.INVALID_ARGUMENT, "in_features"):
            self.new_model("bad-spec", spec=bad)
        with self.assertError(grpc.StatusCode.INVALID_ARGUMENT, "model_id"):
            self.new_model("bad id!")
        with self.assertRaises(tscale.Error):
            self.client.get_model("bad-spec")

    def test_compute_types(self):
        self.assertEqual(self.new_model("fp32", seed=1).compute, tscale.trainer_pb2.COMPUTE_FP32)
        self._models.append("bf16")
        bf16 = self.client.create_model("bf16", SPEC, compute="bf16", seed=1)
        self.assertEqual(bf16.compute, tscale.trainer_pb2.COMPUTE_BF16)
        # BF16 computes the same model's output within bfloat16 rounding of FP32's, not equal.
        x = batch(2)
        y32 = self.client.forward("fp32", x).output
        y16 = self.client.forward("bf16", x).output
        self.assertFalse(np.array_equal(y32, y16))
        np.testing.assert_allclose(y16, y32, rtol=0.05, atol=0.05 * np.abs(y32).max())
        self._models.append("tf32")
        if list(self.client.server_info().devices) == ["cpu"]:
            # TF32 is a CUDA tensor-core format.
            with self.assertError(grpc.StatusCode.UNIMPLEMENTED, "COMPUTE_TF32"):
                self.client.create_model("tf32", SPEC, compute="tf32", device="cpu")
        with self.assertRaisesRegex(ValueError, "compute"):
            self.client.create_model("fp99", SPEC, compute="fp99")

    def test_unknown_device(self):
        self._models.append("dev")
        with self.assertError(grpc.StatusCode.INVALID_ARGUMENT, "device"):
            self.client.create_model("dev", SPEC, device="tpu:3")

    def test_unknown_model(self):
        x = batch(2)
        for call in (lambda: self.client.get_model("nope"),
                     lambda: self.client.forward("nope", x),
                     lambda: self.client.forward("nope", x, train=True),
                     lambda: self.client.update_correlation("nope", 0),
                     lambda: self.client.train_step("nope", x, np.zeros((2, OUT), np.float32),
                                                    expected_step=0),
                     lambda: self.client.export_state("nope"),
                     lambda: self.client.scale_stats("nope"),
                     lambda: self.client.delete_model("nope")):
            with self.assertError(grpc.StatusCode.NOT_FOUND, "nope"):
                call()

    # ------------------------------------------------------------ forward / backward / update

    def test_forward_matches_exported_state(self):
        self.new_model("fwd", seed=5)
        x = batch(7, seed=3)
        y, pass_id, step = self.client.forward("fwd", x)
        self.assertEqual((pass_id, step), ("", 0))
        self.assertEqual(y.shape, (7, OUT))
        self.assertEqual(y.dtype, np.float32)
        state = safetensors.loads(self.client.export_state("fwd"))[0]
        np.testing.assert_allclose(y, reference_forward(state, x), rtol=1e-5, atol=1e-6)
        # Evaluation keeps nothing.
        self.assertEqual(self.client.get_model("fwd").pending_passes, 0)

    def test_train_cycle_and_replayed_update(self):
        self.new_model("cycle")
        x = batch(4, seed=1)
        y, pass_id, step = self.client.forward("cycle", x, train=True)
        self.assertTrue(pass_id)
        self.assertEqual(step, 0)
        info = self.client.get_model("cycle")
        self.assertEqual(info.pending_passes, 1)
        self.assertGreater(info.pending_bytes, 0)

        grad_in = self.client.backward("cycle", pass_id, np.ones_like(y), want_grad_input=True)
        self.assertEqual(grad_in.shape, (4, IN))
        self.assertEqual(grad_in.dtype, np.float32)
        with self.assertError(grpc.StatusCode.FAILED_PRECONDITION, pass_id):
            self.client.backward("cycle", pass_id, np.ones_like(y))  # a pass takes one backward

        y2, pass2, _ = self.client.forward("cycle", batch(4, seed=2), train=True)
        self.assertNotEqual(pass2, pass_id)
        self.assertIsNone(self.client.backward("cycle", pass2, -np.ones_like(y2)))
        _, pass3, _ = self.client.forward("cycle", batch(4, seed=3), train=True)  # no backward

        with self.assertError(grpc.StatusCode.FAILED_PRECONDITION, "expected_step"):
            self.client.update_correlation("cycle", expected_step=3)
        update = self.client.update_correlation("cycle", expected_step=0)
        self.assertEqual(update.step, 1)
        self.assertFalse(update.replayed)
        self.assertEqual([l.layer for l in update.layers], ["fc1", "fc2"])

        replay = self.client.update_correlation("cycle", expected_step=0)
        self.assertTrue(replay.replayed)
        self.assertEqual(replay.step, 1)
        self.assertEqual(list(replay.layers), list(update.layers))
        self.assertEqual(self.client.get_model("cycle").step, 1)

        # The update released the step's passes.
        with self.assertError(grpc.StatusCode.FAILED_PRECONDITION, pass3):
            self.client.backward("cycle", pass3, np.ones((4, OUT), np.float32))
        self.assertEqual(self.client.get_model("cycle").pending_passes, 0)
        # Stale and future steps fail and change nothing.
        with self.assertError(grpc.StatusCode.FAILED_PRECONDITION, "expected_step"):
            self.client.update_correlation("cycle", expected_step=5)
        with self.assertError(grpc.StatusCode.FAILED_PRECONDITION):
            self.client.update_correlation("cycle", expected_step=1)  # no backward since
        self.assertEqual(self.client.get_model("cycle").step, 1)

    def test_unknown_pass(self):
        self.new_model("nopass")
        with self.assertError(grpc.StatusCode.NOT_FOUND):
            self.client.backward("nopass", "no-such-pass", np.ones((4, OUT), np.float32))

    def test_wrong_feature_count(self):
        self.new_model("shape")
        with self.assertError(grpc.StatusCode.INVALID_ARGUMENT, "input", "64", "63"):
            self.client.forward("shape", batch(3, features=63))
        with self.assertError(grpc.StatusCode.INVALID_ARGUMENT, "input"):
            self.client.forward("shape", batch(3, features=63), train=True)
        _, pass_id, _ = self.client.forward("shape", batch(3), train=True)
        with self.assertError(grpc.StatusCode.INVALID_ARGUMENT, "grad_output"):
            self.client.backward("shape", pass_id, np.ones((3, OUT + 1), np.float32))
        # A failed backward leaves the pass usable.
        self.client.backward("shape", pass_id, np.ones((3, OUT), np.float32))

    def test_nan_refused_in_training(self):
        self.new_model("nan")
        x = batch(3)
        x[1, 5] = np.nan
        with self.assertError(grpc.StatusCode.INVALID_ARGUMENT, "input"):
            self.client.forward("nan", x, train=True)
        self.assertEqual(self.client.get_model("nan").pending_passes, 0)
        y, pass_id, _ = self.client.forward("nan", batch(3), train=True)
        g = np.ones_like(y)
        g[0, 0] = np.inf
        with self.assertError(grpc.StatusCode.INVALID_ARGUMENT, "grad_output"):
            self.client.backward("nan", pass_id, g)
        target = np.zeros((3, OUT), np.float32)
        with self.assertError(grpc.StatusCode.INVALID_ARGUMENT, "input"):
            self.client.train_step("nan", x, target, expected_step=0)
        self.assertEqual(self.client.get_model("nan").step, 0)

    def test_unsupported_dtype_refused_locally(self):
        self.new_model("dtype")
        with self.assertRaisesRegex(ValueError, "input: expected dtype"):
            self.client.forward("dtype", batch(2).astype(np.float64))
        with self.assertRaisesRegex(ValueError, "loss"):
            self.client.train_step("dtype", batch(2), np.zeros(2, np.int64), loss="hinge",
                                   expected_step=0)

    def test_train_step_mse(self):
        self.new_model("mse")
        x = batch(5, seed=8)
        target = np.random.RandomState(9).randn(5, OUT).astype(np.float32)
        y0 = self.client.forward("mse", x).output
        r = self.client.train_step("mse", x, target, loss="mse", expected_step=0,
                                   want_output=True)
        self.assertEqual(r.step, 1)
        self.assertFalse(r.replayed)
        np.testing.assert_allclose(r.output, y0, rtol=1e-6, atol=1e-7)
        self.assertAlmostEqual(r.loss, float(np.mean((y0.astype(np.float64) - target) ** 2)),
                               places=5)
        self.assertEqual([l.layer for l in r.layers], ["fc1", "fc2"])

        replay = self.client.train_step("mse", x, target, loss="mse", expected_step=0,
                                        want_output=True)
        self.assertTrue(replay.replayed)
        self.assertEqual(replay.step, 1)
        self.assertAlmostEqual(replay.loss, r.loss)
        self.assertEqual(replay.layers, r.layers)
        self.assertEqual(self.client.get_model("mse").step, 1)
        with self.assertError(grpc.StatusCode.FAILED_PRECONDITION, "expected_step"):
            self.client.train_step("mse", x, target, expected_step=7)
        with self.assertError(grpc.StatusCode.INVALID_ARGUMENT, "target"):
            self.client.train_step("mse", x, target[:, :3], expected_step=1)
        # expected_step=None reads the step first.
        self.assertEqual(self.client.train_step("mse", x, target).step, 2)

    def test_loss_names_of_the_cli(self):
        """The CLI's --loss mse|ce, in any case, train as MSE and CROSS_ENTROPY."""
        self.new_model("names")
        x = batch(6, seed=4)
        labels = np.array([0, 1, 2, 3, 4, 9], np.int64)
        step = 0
        for name in ("ce", "CE", "Ce"):
            y = self.client.forward("names", x).output.astype(np.float64)
            y -= y.max(axis=1, keepdims=True)
            want = -np.mean(y[np.arange(6), labels] - np.log(np.exp(y).sum(axis=1)))
            r = self.client.train_step("names", x, labels, loss=name, expected_step=step)
            self.assertAlmostEqual(r.loss, want, places=5, msg=name)
            step = r.step
        target = np.ones((6, OUT), np.float32)
        for name in ("mse", "MSE"):
            y = self.client.forward("names", x).output
            r = self.client.train_step("names", x, target, loss=name, expected_step=step)
            self.assertAlmostEqual(r.loss, float(np.mean((y.astype(np.float64) - 1) ** 2)),
                                   places=5, msg=name)
            step = r.step
        self.assertEqual(self.client.get_model("names").step, 5)

    @unittest.skipUnless(HAVE_TORCH, NO_TORCH)
    def test_torch_tensors(self):
        """torch tensors in, torch tensors out, with the numbers numpy gives."""
        import torch
        self.new_model("torch-in")
        x = batch(4, seed=6)
        xt = torch.from_numpy(x.copy())
        y = self.client.forward("torch-in", xt).output
        self.assertIsInstance(y, torch.Tensor)
        self.assertEqual((y.dtype, tuple(y.shape)), (torch.float32, (4, OUT)))
        np.testing.assert_array_equal(y.numpy(), self.client.forward("torch-in", x).output)
        out, pass_id, step = self.client.forward("torch-in", xt, train=True)
        g = self.client.backward("torch-in", pass_id, torch.ones_like(out), want_grad_input=True)
        self.assertIsInstance(g, torch.Tensor)
        self.assertEqual(tuple(g.shape), (4, IN))
        self.client.update_correlation("torch-in", expected_step=step)
        labels = torch.tensor([1, 2, 3, 4], dtype=torch.int32)
        r = self.client.train_step("torch-in", xt, labels, loss="ce", expected_step=1,
                                   want_output=True)
        self.assertEqual(r.step, 2)
        self.assertIsInstance(r.output, torch.Tensor)
        with self.assertRaisesRegex(ValueError, "input: expected dtype .*torch.float64"):
            self.client.forward("torch-in", xt.double())

    def test_train_step_cross_entropy(self):
        self.new_model("ce")
        x = batch(6, seed=4)
        labels = np.array([0, 1, 2, 3, 4, 9], np.int32)  # sent as INT64
        y0 = self.client.forward("ce", x).output
        r = self.client.train_step("ce", x, labels, loss="cross_entropy", expected_step=0)
        self.assertIsNone(r.output)
        z = y0.astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        want = -np.mean(z[np.arange(6), labels] - np.log(np.exp(z).sum(axis=1)))
        self.assertAlmostEqual(r.loss, want, places=5)
        with self.assertError(grpc.StatusCode.INVALID_ARGUMENT, "target"):
            self.client.train_step("ce", x, np.array([0, 1, 2, 3, 4, 10]), loss="CROSS_ENTROPY",
                                   expected_step=1)

    def test_concurrent_exactly_once(self):
        """Eight clients race the same expected_step: exactly one applies, the rest replay or
        fail with FAILED_PRECONDITION; the step advances by one."""
        self.new_model("race")
        x, target = batch(4), np.zeros((4, OUT), np.float32)
        results, errors = [], []

        def worker():
            try:
                results.append(self.client.train_step("race", x, target, expected_step=0))
            except tscale.Error as e:
                errors.append(e)
        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(sum(not r.replayed for r in results), 1)
        for e in errors:
            self.assertEqual(e.code, grpc.StatusCode.FAILED_PRECONDITION)
        self.assertEqual(self.client.get_model("race").step, 1)

    # ------------------------------------------------------------ state

    def test_export_import(self):
        self.new_model("exp", seed=11)
        x = batch(4)
        self.client.train_step("exp", x, np.zeros((4, OUT), np.float32), expected_step=0)
        data = self.client.export_state("exp")
        tensors, md = safetensors.loads(data)
        self.assertEqual(md["format"], "tscale/1")
        self.assertEqual(md["step"], "1")
        self.assertEqual(md["crc32c"], safetensors.crc32c_hex(safetensors.data_section(data)))
        self.assertEqual([l["name"] for l in json.loads(md["spec"])["layers"]],
                         ["fc1", "act1", "fc2"])
        want_names = [f"{l}.{b}" for l in ("fc1", "fc2")
                      for b in ("T_packed", "_T_shape", "_T_pad", "E", "corr_accum",
                                "step_counter")] + ["fc2.bias"]
        self.assertEqual(sorted(tensors), sorted(want_names))
        self.assertEqual(tensors["fc1.T_packed"].dtype, np.uint8)
        self.assertEqual(tensors["fc1.corr_accum"].dtype, np.int64)
        self.assertEqual(tensors["fc2.bias"].dtype, np.int32)
        self.assertEqual(int(tensors["fc1.step_counter"][0]), 1)

        self._models.append("imp")
        info = self.client.import_state("imp", data)
        self.assertEqual(info.step, 1)
        self.assert_same_state(self.client.export_state("imp"), data)
        np.testing.assert_array_equal(self.client.forward("imp", x).output,
                                      self.client.forward("exp", x).output)

        with self.assertError(grpc.StatusCode.ALREADY_EXISTS, "imp"):
            self.client.import_state("imp", data)
        # replace=True swaps in another state under the same id.
        other = self.client.export_state(self.new_model("exp-other", seed=12).model_id)
        self.assertEqual(self.client.import_state("imp", other, replace=True).step, 0)
        self.assert_same_state(self.client.export_state("imp"), other)

    def assert_same_state(self, a, b):
        """Same tensors and step (the metadata also names the model, which may differ)."""
        (ta, ma), (tb, mb) = safetensors.loads(a), safetensors.loads(b)
        self.assertEqual(list(ta), list(tb))
        for k in ta:
            self.assertEqual(ta[k].dtype, tb[k].dtype, k)
            np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)
        self.assertEqual(ma["step"], mb["step"])
        self.assertEqual(ma["spec"], mb["spec"])

    def test_import_from_path_and_with_spec_override(self):
        self.new_model("pathsrc")
        data = self.client.export_state("pathsrc")
        tensors, _ = safetensors.loads(data)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "state.safetensors")
            safetensors.save(path, tensors)  # no metadata: the spec must come with the header
            self._models.append("frompath")
            info = self.client.import_state("frompath", path, spec=SPEC)
            self.assertEqual(info.step, 0)
            self._models.append("nospec")
            with self.assertError(grpc.StatusCode.INVALID_ARGUMENT, "spec"):
                self.client.import_state("nospec", path)
            with self.assertError(grpc.StatusCode.NOT_FOUND):
                self.client.get_model("nospec")

    def test_import_corrupted_crc_is_data_loss(self):
        self.new_model("crc")
        data = self.client.export_state("crc")
        tensors, md = safetensors.loads(data)
        good = md["crc32c"]
        md["crc32c"] = f"{int(good, 16) ^ 0x1:08x}"
        self._models.append("crc-bad")
        with self.assertError(grpc.StatusCode.DATA_LOSS, "crc32c"):
            self.client.import_state("crc-bad", safetensors.dumps(tensors, md))
        with self.assertError(grpc.StatusCode.NOT_FOUND):
            self.client.get_model("crc-bad")
        # A flipped data byte under the original CRC: DATA_LOSS too.
        md["crc32c"] = good
        raw = bytearray(safetensors.dumps(tensors, md))
        raw[-1] ^= 0x01
        with self.assertError(grpc.StatusCode.DATA_LOSS):
            self.client.import_state("crc-bad", bytes(raw))

    def test_import_malformed(self):
        self._models.append("garbage")
        with self.assertError(grpc.StatusCode.INVALID_ARGUMENT):
            self.client.import_state("garbage", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}    ")
        with self.assertError(grpc.StatusCode.NOT_FOUND):
            self.client.get_model("garbage")

    def test_checkpoint_calls_without_checkpoint_dir(self):
        """This server runs without --checkpoint-dir: the checkpoint calls are refused cleanly
        (ExportState / ImportState are the way to save and restore)."""
        self.new_model("ckpt")
        for call in (lambda: self.client.save_checkpoint("ckpt"),
                     lambda: self.client.list_checkpoints("ckpt"),
                     lambda: self.client.restore_checkpoint("ckpt")):
            with self.assertRaises(tscale.Error) as cm:
                call()
            self.assertIn(cm.exception.code, (grpc.StatusCode.UNIMPLEMENTED,
                                              grpc.StatusCode.FAILED_PRECONDITION),
                          cm.exception.message)
            self.assertTrue(cm.exception.message)
        self.assertEqual(self.client.get_model("ckpt").step, 0)

    # ------------------------------------------------------------ statistics

    def test_scale_stats(self):
        self.new_model("stats", seed=3)
        x = batch(8, seed=5)
        target = np.zeros((8, OUT), np.float32)
        for s in range(3):
            self.client.train_step("stats", x, target, expected_step=s)
        stats = self.client.scale_stats("stats", per_group=True)
        self.assertEqual(stats.model_id, "stats")
        self.assertEqual(stats.step, 3)
        self.assertEqual([l.layer for l in stats.layers], ["fc1", "fc2"])
        state = safetensors.loads(self.client.export_state("stats"))[0]
        for layer, gs in (("fc1", 16), ("fc2", 32)):
            ls = {l.layer: l for l in stats.layers}[layer]
            corr = state[f"{layer}.corr_accum"]
            self.assertEqual(ls.groups, len(corr))
            drift = 4.0 * corr / (3 * gs)
            self.assertAlmostEqual(ls.drift_mean, drift.mean(), places=5)
            self.assertAlmostEqual(ls.drift_min, drift.min(), places=5)
            self.assertAlmostEqual(ls.drift_max, drift.max(), places=5)
            self.assertAlmostEqual(ls.drift_abs_mean, np.abs(drift).mean(), places=5)
            sat = np.mean(np.abs(corr / (3 * gs)) >= 0.99)
            self.assertAlmostEqual(ls.saturated_fraction, sat, places=6)
            self.assertEqual(sum(ls.bucket_count), ls.groups)
            log2_s = tscale.to_numpy(ls.log2_scale)
            self.assertEqual(log2_s.dtype, np.float32)
            self.assertEqual(log2_s.shape, (ls.groups,))
            want = state[f"{layer}.E"].astype(np.float32) + \
                corr.astype(np.float32) / np.float32(3 * gs) * np.float32(4.0)
            np.testing.assert_allclose(log2_s, want, rtol=1e-6, atol=1e-6)
        plain = self.client.scale_stats("stats")
        self.assertFalse(plain.layers[0].HasField("log2_scale"))


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RestartTest(ErrorAssertions, unittest.TestCase):
    """A training client rides through a server restart: its retries go on for retry_seconds
    (60 s by default), long enough for the server to come back and restore its checkpoints."""

    def test_train_step_rides_through_a_restart(self):
        port = free_port()
        with tempfile.TemporaryDirectory() as d:
            server = ServerProcess("--listen", f"127.0.0.1:{port}", "--checkpoint-dir", d)
            server.start()
            self.addCleanup(server.remove_logs)
            self.addCleanup(server.kill)
            address = f"127.0.0.1:{port}"
            self.assertEqual(server.address, address)
            client = tscale.Client(address, timeout=60)  # the default retries
            self.addCleanup(client.close)
            client.create_model("r", SPEC, seed=2)
            x, target = batch(3), np.zeros((3, OUT), np.float32)
            for s in range(3):
                client.train_step("r", x, target, expected_step=s)
            self.assertEqual(server.stop(), 0, server.log())  # checkpoints on shutdown

            # Down: a client that will not wait says so, in its own words.
            with tscale.Client(address, retry_seconds=0.5) as impatient:
                with self.assertError(grpc.StatusCode.UNAVAILABLE) as refused:
                    impatient.get_model("r")
            self.assertEqual(refused.error.message,
                             f"no tscale-server answering at {address} (connection refused)")

            # Back 2 s later, on the same address, from its checkpoints.
            outcome = {}

            def restart():
                try:
                    server.start()
                except BaseException as e:  # reported below
                    outcome["error"] = e
            restarter = threading.Timer(2.0, restart)
            restarter.start()
            start = time.monotonic()
            try:
                r = client.train_step("r", x, target, expected_step=3)
            finally:
                restarter.join()
            elapsed = time.monotonic() - start
            self.assertNotIn("error", outcome)
            self.assertEqual(server.checkpoint_log().restored["r"][1], 3)
            self.assertEqual((r.step, r.replayed), (4, False))
            self.assertGreaterEqual(elapsed, 2.0)
            self.assertEqual(client.get_model("r").step, 4)
            # The retry was the one update: the same expected_step again is its replay.
            self.assertTrue(client.train_step("r", x, target, expected_step=3).replayed)
            self.assertEqual(server.stop(), 0, server.log())


class LimitsTest(ServerTestCase):
    """A server with small limits: --max-message-bytes 1 MiB, --max-pending-passes 2."""

    server_args = ("--max-message-bytes", str(1 << 20), "--max-pending-passes", "2")

    def test_limits_reported(self):
        info = self.client.server_info()
        self.assertEqual(info.max_message_bytes, 1 << 20)
        self.assertEqual(info.max_pending_passes, 2)

    def test_request_over_max_message_bytes(self):
        self.client.create_model("big", SPEC)
        self.addCleanup(self.client.delete_model, "big")
        x = batch(5000)  # 1.28 MB of input
        with self.assertRaises(tscale.Error) as cm:
            self.client.forward("big", x)
        self.assertEqual(cm.exception.code, grpc.StatusCode.RESOURCE_EXHAUSTED,
                         cm.exception.message)
        self.assertIn("max-message-bytes", cm.exception.message)
        # Below the limit works, and the server is still fine.
        self.assertEqual(self.client.forward("big", batch(1000)).output.shape, (1000, OUT))

    def test_import_chunks_up_to_the_limit(self):
        """A 2.5 MB state file imports through a 1 MiB server in chunks of up to 1 MiB of data
        (a chunk is judged by its payload); a larger chunk is refused, naming the flag."""
        spec = {"layers": [{"name": "fc", "ternary_linear": {"in_features": 1024,
                                                             "out_features": 1024,
                                                             "group_size": 1}}]}
        self.client.create_model("chunky", spec)
        self.addCleanup(self.client.delete_model, "chunky")
        data = self.client.export_state("chunky")  # the response is streamed in chunks too
        self.assertGreater(len(data), 2 << 20)
        self.addCleanup(lambda: self.client.delete_model("chunky2"))
        info = self.client.import_state("chunky2", data, chunk_bytes=1 << 20)
        self.assertEqual(info.groups, 1024 * 1024)
        with self.assertRaises(tscale.Error) as cm:
            self.client.import_state("chunky3", data, chunk_bytes=(1 << 20) + 1)
        self.assertEqual(cm.exception.code, grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertIn("max-message-bytes", cm.exception.message)

    def test_pending_passes_limit(self):
        self.client.create_model("pend", SPEC)
        self.addCleanup(self.client.delete_model, "pend")
        for _ in range(2):
            self.client.forward("pend", batch(2), train=True)
        with self.assertRaises(tscale.Error) as cm:
            self.client.forward("pend", batch(2), train=True)
        self.assertEqual(cm.exception.code, grpc.StatusCode.RESOURCE_EXHAUSTED,
                         cm.exception.message)
        self.assertEqual(self.client.get_model("pend").pending_passes, 2)

    def test_release_passes(self):
        """Passes that will get no Backward are released, all or by id, freeing their place."""
        self.client.create_model("rel", SPEC)
        self.addCleanup(self.client.delete_model, "rel")
        a = self.client.forward("rel", batch(2), train=True).pass_id
        b = self.client.forward("rel", batch(2), train=True).pass_id
        with self.assertRaises(tscale.Error):  # the limit is reached
            self.client.forward("rel", batch(2), train=True)
        # An unknown id: NOT_FOUND, and nothing released.
        with self.assertRaises(tscale.Error) as cm:
            self.client.release_passes("rel", [a, "nope"])
        self.assertEqual(cm.exception.code, grpc.StatusCode.NOT_FOUND, cm.exception.message)
        self.assertIn("nope", cm.exception.message)
        self.assertEqual(self.client.get_model("rel").pending_passes, 2)
        r = self.client.release_passes("rel", [a])
        self.assertEqual((r.released, r.pending_passes), (1, 1))
        with self.assertRaises(tscale.Error) as cm:
            self.client.backward("rel", a, np.ones((2, OUT), np.float32))
        self.assertEqual(cm.exception.code, grpc.StatusCode.FAILED_PRECONDITION)
        self.assertIn("released by ReleasePasses", cm.exception.message)
        with self.assertRaises(tscale.Error) as cm:
            self.client.release_passes("rel", [a])
        self.assertEqual(cm.exception.code, grpc.StatusCode.FAILED_PRECONDITION)
        c = self.client.forward("rel", batch(2), train=True).pass_id
        r = self.client.release_passes("rel")
        self.assertEqual((r.released, r.pending_passes), (2, 0))
        self.assertEqual(self.client.get_model("rel").pending_passes, 0)
        for p in (b, c):
            with self.assertRaises(tscale.Error):
                self.client.backward("rel", p, np.ones((2, OUT), np.float32))
        # Room again for two.
        for _ in range(2):
            self.client.forward("rel", batch(2), train=True)


if __name__ == "__main__":
    unittest.main()
