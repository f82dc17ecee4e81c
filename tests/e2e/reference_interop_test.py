"""Checkpoints and state files interoperate with the reference implementation
(docs/state-format.md; the reference: docs/arithmetic.md, section 9).

- service -> reference: a model trained in the service is saved with SaveCheckpoint; the file on
  the server's disk loads into the reference's modules with a strict load_state_dict; both then
  train on with the same inputs and output gradients, and their final integer state is equal
  exactly (outputs and input gradients within float32 rounding).
- reference -> service: the reference's modules, trained a little, write their state_dict as a
  bare safetensors file; ImportState (spec in the header) loads it; both train on and end equal.

The reference is tscale_mini.py, which this repository does not hold: it is loaded from the folder
$TSCALE_REFERENCE_DIR names (ctest sets it from cmake's -DTSCALE_REFERENCE_DIR=DIR when given),
else from shared/reference in the folder that holds the repository. Without it (or without torch)
every test is skipped, and a line "reference_interop: skipped: WHY" on stdout says where it looked;
ctest reports the entry as skipped on that line.
"""

import collections
import importlib.util
import os
import shutil
import tempfile
import unittest

import numpy as np

from tscale import safetensors
from server_process import REPO, ServerTestCase

# The reference's folder: $TSCALE_REFERENCE_DIR, else the default location beside the repository.
REFERENCE_DIR = os.environ.get("TSCALE_REFERENCE_DIR") or os.path.join(
    os.path.dirname(REPO), "shared", "reference")
REFERENCE_FILE = os.path.join(REFERENCE_DIR, "tscale_mini.py")


def _load_reference():
    """(module, None) or (None, why it is not available)."""
    if not os.path.isfile(REFERENCE_FILE):
        where = ("$TSCALE_REFERENCE_DIR" if os.environ.get("TSCALE_REFERENCE_DIR") else
                 "the default location (set TSCALE_REFERENCE_DIR, or cmake -DTSCALE_REFERENCE_DIR, "
                 "to the folder holding tscale_mini.py)")
        return None, (f"reference implementation not found: no {REFERENCE_FILE}, from {where}; "
                      f"see docs/arithmetic.md, section 9")
    if importlib.util.find_spec("torch") is None:
        return None, f"the reference {REFERENCE_FILE} needs torch (python3-torch), not found"
    spec = importlib.util.spec_from_file_location("tscale_mini", REFERENCE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, None


ref, WHY_SKIPPED = _load_reference()
if ref is not None:
    import torch
else:
    # ctest's SKIP_REGULAR_EXPRESSION for this entry matches this line.
    print(f"reference_interop: skipped: {WHY_SKIPPED}", flush=True)

IN, HIDDEN, OUT, GS = 48, 40, 12, 16  # 16 divides 48, but neither 40 nor 12: ragged groups
SPEC = {"layers": [
    {"name": "fc1", "ternary_linear": {"in_features": IN, "out_features": HIDDEN,
                                       "group_size": GS, "bias": True}},
    {"name": "act", "activation": {"kind": "RELU"}},
    {"name": "fc2", "ternary_linear": {"in_features": HIDDEN, "out_features": OUT,
                                       "group_size": GS}},
]}
BATCH = 6
RTOL, ATOL = 1e-5, 1e-6

NUMPY_OF_TORCH = {}
if ref is not None:
    NUMPY_OF_TORCH = {torch.uint8: np.uint8, torch.int8: np.int8, torch.int32: np.int32,
                      torch.int64: np.int64, torch.float32: np.float32}


def reference_model():
    return torch.nn.Sequential(collections.OrderedDict(
        fc1=ref.TernaryScaleTensor(IN, HIDDEN, group_size=GS, bias=True),
        act=torch.nn.ReLU(),
        fc2=ref.TernaryScaleTensor(HIDDEN, OUT, group_size=GS)))


def reference_state(model):
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def batch(step, seed):
    """The input and output gradient of step `step` (the same for both implementations)."""
    rng = np.random.RandomState(1000 * seed + step)
    return (rng.randn(BATCH, IN).astype(np.float32),
            rng.randn(BATCH, OUT).astype(np.float32))


@unittest.skipIf(ref is None, WHY_SKIPPED)
class ReferenceInteropTest(ServerTestCase):

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="tscale-ckpt-interop-")
        cls.server_args = ("--checkpoint-dir", cls.dir)
        try:
            super().setUpClass()
        except BaseException:
            shutil.rmtree(cls.dir, ignore_errors=True)
            raise

    @classmethod
    def tearDownClass(cls):
        try:
            super().tearDownClass()
        finally:
            shutil.rmtree(cls.dir, ignore_errors=True)

    # ------------------------------------------------------------ helpers

    def service_step(self, model_id, step, x, g):
        y, pass_id, s = self.client.forward(model_id, x, train=True)
        self.assertEqual(s, step)
        grad_in = self.client.backward(model_id, pass_id, g, want_grad_input=True)
        update = self.client.update_correlation(model_id, expected_step=step)
        self.assertEqual((update.step, update.replayed), (step + 1, False))
        return y, grad_in

    def reference_step(self, model, x, g):
        """y = model(x); y.backward(g); update_corr on each ternary layer (one backward per step:
        the reference keeps only the last one's gradient)."""
        xt = torch.from_numpy(x.copy()).requires_grad_(True)
        y = model(xt)
        y.backward(torch.from_numpy(g.copy()))
        for module in model.modules():
            if isinstance(module, ref.TernaryScaleTensor):
                module.update_corr()
        return y.detach().numpy(), xt.grad.numpy()

    def train_both(self, model_id, model, first_step, steps, seed):
        for step in range(first_step, first_step + steps):
            x, g = batch(step, seed)
            y_svc, gin_svc = self.service_step(model_id, step, x, g)
            y_ref, gin_ref = self.reference_step(model, x, g)
            np.testing.assert_allclose(y_svc, y_ref, rtol=RTOL, atol=ATOL,
                                       err_msg=f"{model_id} step {step}: output")
            np.testing.assert_allclose(gin_svc, gin_ref, rtol=RTOL, atol=ATOL,
                                       err_msg=f"{model_id} step {step}: input gradient")

    def checkpoint_file(self, model_id):
        info = self.client.save_checkpoint(model_id)
        path = os.path.join(self.dir, model_id, info.name + ".safetensors")
        self.assertTrue(os.path.isfile(path), path)
        tensors, md = safetensors.load(path)
        self.assertEqual(md.get("format"), "tscale/1")
        self.assertEqual(md.get("step"), str(info.step))
        return info, tensors

    # ------------------------------------------------------------ tests

    def test_service_checkpoint_loads_into_reference(self):
        model_id = "to-reference"
        self.client.create_model(model_id, SPEC, seed=21)
        for step in range(3):
            x, g = batch(step, seed=1)
            self.service_step(model_id, step, x, g)
        info, tensors = self.checkpoint_file(model_id)
        self.assertEqual(info.step, 3)

        torch.manual_seed(0)  # the initial values are overwritten by the checkpoint
        model = reference_model()
        keys = model.state_dict()
        self.assertEqual(sorted(tensors), sorted(keys), "checkpoint tensors vs state_dict keys")
        for name, t in keys.items():
            self.assertEqual(tensors[name].dtype, NUMPY_OF_TORCH[t.dtype], name)
            self.assertEqual(tensors[name].shape, tuple(t.shape), name)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=True)
        self.assertEqual(int(model.fc1.step_counter[0]), 3)
        self.assert_state_equal(tensors, reference_state(model), "loaded")

        self.train_both(model_id, model, 3, 3, seed=1)
        want = reference_state(model)
        self.assertEqual(int(want["fc2.step_counter"][0]), 6)
        got = safetensors.loads(self.client.export_state(model_id))[0]
        self.assert_state_equal(want, got, "service vs reference after 6 steps")
        info, tensors = self.checkpoint_file(model_id)
        self.assertEqual(info.step, 6)
        self.assert_state_equal(want, tensors, "checkpoint vs reference after 6 steps")

    def test_reference_state_imports_into_service(self):
        model_id = "from-reference"
        torch.manual_seed(1234)
        model = reference_model()
        for step in range(2):
            x, g = batch(step, seed=2)
            self.reference_step(model, x, g)
        state = reference_state(model)
        data = safetensors.dumps(state)  # the bare state_dict: no metadata at all
        self.assertEqual(safetensors.read_metadata(data), {})
        info = self.client.import_state(model_id, data, spec=SPEC)
        self.assertEqual((info.model_id, info.step), (model_id, 2))
        got = safetensors.loads(self.client.export_state(model_id))[0]
        self.assert_state_equal(state, got, "imported")

        self.train_both(model_id, model, 2, 2, seed=2)
        want = reference_state(model)
        self.assertEqual(int(want["fc1.step_counter"][0]), 4)
        got = safetensors.loads(self.client.export_state(model_id))[0]
        self.assert_state_equal(want, got, "service vs reference after 4 steps")
        info, tensors = self.checkpoint_file(model_id)
        self.assertEqual(info.step, 4)
        self.assert_state_equal(want, tensors, "checkpoint vs reference after 4 steps")

    def test_one_sample_train_steps_match_reference(self):
        """TrainStep with one sample takes each layer's weight gradient in its two factors (no
        [out, in] gradient); the integer state must still be the reference's, which forms the
        whole gradient. A step of several samples in between takes the ordinary path."""
        model_id = "one-sample"
        torch.manual_seed(4321)
        model = reference_model()
        info = self.client.import_state(model_id, safetensors.dumps(reference_state(model)),
                                        spec=SPEC)
        self.assertEqual(info.step, 0)
        rng = np.random.RandomState(77)
        for step in range(8):
            n = 4 if step == 3 else 1
            x = rng.randn(n, IN).astype(np.float32)
            if step % 2 == 0:
                loss, target = "mse", rng.randn(n, OUT).astype(np.float32)
            else:
                loss, target = "cross_entropy", rng.randint(0, OUT, size=n).astype(np.int64)
            got = self.client.train_step(model_id, x, target, loss=loss, expected_step=step)
            self.assertEqual((got.step, got.replayed), (step + 1, False))

            y = model(torch.from_numpy(x.copy()))
            t = torch.from_numpy(target.copy())
            value = (torch.nn.functional.mse_loss(y, t) if loss == "mse"
                     else torch.nn.functional.cross_entropy(y, t))
            value.backward()
            for module in model.modules():
                if isinstance(module, ref.TernaryScaleTensor):
                    module.update_corr()
            self.assertAlmostEqual(got.loss, float(value), delta=1e-5 * max(1.0, abs(float(value))),
                                   msg=f"step {step}: {loss} loss")
            state = safetensors.loads(self.client.export_state(model_id))[0]
            self.assert_state_equal(reference_state(model), state,
                                    f"service vs reference after step {step} (batch {n}, {loss})")
        self.assertEqual(int(model.fc1.step_counter[0]), 8)


if __name__ == "__main__":
    unittest.main()
