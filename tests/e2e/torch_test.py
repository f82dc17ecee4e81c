"""tscale.torch against a real tscale-server: a local torch.nn.Linear trained by SGD in front of a
remote ternary model (RemoteModel), step for step against the same training done with the plain
client on a second model of the same spec and seed.

Needs torch (Debian's python3-torch). Without it every test is skipped and a line
"torch_test: skipped: WHY" on stdout says so; ctest reports the entry as skipped on that line.
"""

import copy
import importlib.util
import unittest

import grpc
import numpy as np

import tscale
from tscale import safetensors
from server_process import ServerTestCase

WHY_SKIPPED = None
if importlib.util.find_spec("torch") is None:
    WHY_SKIPPED = "torch (python3-torch) is not installed"
    print(f"torch_test: skipped: {WHY_SKIPPED}", flush=True)
else:
    import torch
    import tscale.torch

IN, HIDDEN, OUT = 12, 32, 6   # the local Linear maps IN -> HIDDEN; the remote model HIDDEN -> OUT
BATCH, STEPS, LR = 8, 5, 0.05
# threshold 0.01: most trits nonzero, so that every update moves many groups' accumulators.
SPEC = {"layers": [
    {"name": "fc1", "ternary_linear": {"in_features": HIDDEN, "out_features": 24,
                                       "group_size": 16, "threshold": 0.01}},
    {"name": "act1", "activation": {"kind": "RELU"}},
    {"name": "fc2", "ternary_linear": {"in_features": 24, "out_features": OUT, "bias": True,
                                       "threshold": 0.01}},
]}


def data(step):
    rng = np.random.RandomState(100 + step)
    return (rng.randn(BATCH, IN).astype(np.float32), rng.randn(BATCH, OUT).astype(np.float32))


def mse_grad(y, t):
    """d mean((y - t)^2) / dy, by hand, in float32 (the order of torch's mse_loss backward, so
    that the bits agree)."""
    return ((y - t) * np.float32(2.0 / y.size)).astype(np.float32)


class TorchTest(ServerTestCase):

    @classmethod
    def setUpClass(cls):
        if WHY_SKIPPED:
            raise unittest.SkipTest(WHY_SKIPPED)
        super().setUpClass()

    def setUp(self):
        self._models = []
        torch.manual_seed(0)

    def tearDown(self):
        for model_id in self._models:
            try:
                self.client.delete_model(model_id)
            except tscale.Error:
                pass

    def new_model(self, model_id, seed=3):
        self._models.append(model_id)
        return self.client.create_model(model_id, SPEC, seed=seed)

    def state(self, model_id):
        return safetensors.loads(self.client.export_state(model_id))[0]

    def pending(self, model_id):
        return self.client.get_model(model_id).pending_passes

    def test_hybrid_training_matches_the_plain_client(self):
        """Local Linear + RemoteModel trained by autograd and SGD equals, step for step, the same
        training with the plain client's Forward/Backward/UpdateCorrelation and gradients by
        hand; the remote states are the same tensors."""
        self.new_model("hybrid")
        self.new_model("plain")
        local = torch.nn.Linear(IN, HIDDEN)
        remote = tscale.torch.RemoteModel(self.client, "hybrid")
        model = torch.nn.Sequential(local, remote)
        opt = torch.optim.SGD(local.parameters(), lr=LR)
        self.assertTrue(model.training)
        self.assertIsNone(remote.step)
        self.assertEqual(list(remote.parameters()), [])

        # The plain client's side: its own copy of the Linear, SGD on the gradients it is given.
        plain_local = copy.deepcopy(local)
        initial_w = local.weight.detach().clone().numpy()
        plain_opt = torch.optim.SGD(plain_local.parameters(), lr=LR)

        for step in range(STEPS):
            x, t = data(step)

            # tscale.torch: autograd does it all.
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(torch.from_numpy(x)), torch.from_numpy(t))
            self.assertEqual(remote.step, step)
            self.assertEqual(self.pending("hybrid"), 1)
            loss.backward()
            self.assertEqual(self.pending("hybrid"), 0)
            grad_w = local.weight.grad.detach().clone().numpy()
            grad_b = local.bias.grad.detach().clone().numpy()
            opt.step()
            update = remote.update()
            self.assertEqual((update.step, update.replayed), (step + 1, False))
            self.assertEqual(remote.step, step + 1)

            # The plain client, the remote output's gradient and the local gradients by hand.
            with torch.no_grad():
                h = plain_local(torch.from_numpy(x)).numpy()
            y, pass_id, at = self.client.forward("plain", h, train=True)
            self.assertEqual(at, step)
            self.assertIsInstance(y, np.ndarray)
            self.assertAlmostEqual(float(loss), float(np.mean((y - t) ** 2)), places=5)
            g_in = self.client.backward("plain", pass_id, mse_grad(y, t), want_grad_input=True)
            self.assertEqual(g_in.shape, (BATCH, HIDDEN))
            hand_w = g_in.T @ x
            hand_b = g_in.sum(axis=0)
            np.testing.assert_allclose(grad_w, hand_w, rtol=1e-5, atol=1e-7,
                                       err_msg=f"step {step}: local weight gradient")
            np.testing.assert_allclose(grad_b, hand_b, rtol=1e-5, atol=1e-7,
                                       err_msg=f"step {step}: local bias gradient")
            # The same step of the plain side's Linear, with torch's own arithmetic of the Linear's
            # backward on Backward's input gradient, so that both sides stay bit for bit equal.
            plain_opt.zero_grad()
            plain_local(torch.from_numpy(x)).backward(torch.from_numpy(g_in))
            np.testing.assert_array_equal(plain_local.weight.grad.numpy(), grad_w,
                                          err_msg=f"step {step}: weight gradient, plain side")
            np.testing.assert_array_equal(plain_local.bias.grad.numpy(), grad_b,
                                          err_msg=f"step {step}: bias gradient, plain side")
            plain_opt.step()
            self.assertEqual(self.client.update_correlation("plain", expected_step=at).step,
                             step + 1)

            self.assert_state_equal(self.state("plain"), self.state("hybrid"),
                                    f"remote state after step {step + 1}")
            np.testing.assert_array_equal(local.weight.detach().numpy(),
                                          plain_local.weight.detach().numpy())

        self.assertEqual(self.client.get_model("hybrid").step, STEPS)
        # The remote model did learn: its accumulators moved from their initial zeros.
        state = self.state("hybrid")
        for layer in ("fc1", "fc2"):
            self.assertGreater(np.count_nonzero(state[f"{layer}.corr_accum"]),
                               state[f"{layer}.corr_accum"].size // 2, layer)
        # The local layer did learn, by SGD on the remote model's input gradient.
        self.assertFalse(np.array_equal(local.weight.detach().numpy(), initial_w))

    def test_update_is_exactly_once(self):
        """update() at the forward's step; a repeat of that request is a replay, a second
        update() with no backward since is the server's FAILED_PRECONDITION."""
        self.new_model("once")
        remote = tscale.torch.RemoteModel(self.client, "once")
        x = torch.from_numpy(data(0)[0] @ np.ones((IN, HIDDEN), np.float32) / IN)
        remote(x).sum().backward()   # x needs no gradient: Backward runs all the same
        first = remote.update()
        self.assertEqual((first.step, first.replayed), (1, False))
        replay = self.client.update_correlation("once", expected_step=0)
        self.assertEqual((replay.step, replay.replayed), (1, True))
        with self.assertError(grpc.StatusCode.FAILED_PRECONDITION):
            remote.update()
        self.assertEqual(self.client.get_model("once").step, 1)

        # A RemoteModel that has not seen the model yet reads its step from the server.
        other = tscale.torch.RemoteModel(self.client, "once")
        self.assertIsNone(other.step)
        remote(x).sum().backward()
        self.assertEqual(other.update().step, 2)
        self.assertEqual(other.step, 2)

    def test_inference_makes_no_pass(self):
        """Eval mode and torch.no_grad() run Forward with train=False: no pending pass, an output
        that needs no gradient, the plain client's inference output."""
        self.new_model("infer")
        remote = tscale.torch.RemoteModel(self.client, "infer")
        x_np = data(1)[0] @ np.ones((IN, HIDDEN), np.float32)
        want = self.client.forward("infer", x_np).output
        x = torch.from_numpy(x_np).requires_grad_(True)

        with torch.no_grad():
            y = remote(x)
        self.assertEqual(self.pending("infer"), 0)
        self.assertFalse(y.requires_grad)
        np.testing.assert_array_equal(y.numpy(), want)

        remote.eval()
        y = remote(x)
        self.assertEqual(self.pending("infer"), 0)
        self.assertFalse(y.requires_grad)
        np.testing.assert_array_equal(y.numpy(), want)
        self.assertEqual(remote.step, 0)

        with torch.inference_mode():
            remote.train()
            remote(x)
        self.assertEqual(self.pending("infer"), 0)

        # In training mode with autograd on, each forward is a pass on the server.
        remote.train()
        y = remote(x)
        self.assertTrue(y.requires_grad)
        np.testing.assert_array_equal(y.detach().numpy(), want)
        remote(x)
        self.assertEqual(self.pending("infer"), 2)
        self.assertEqual(remote.release().released, 2)
        self.assertEqual(self.pending("infer"), 0)
        with self.assertError(grpc.StatusCode.FAILED_PRECONDITION):
            y.sum().backward()   # its pass was released

    def test_second_backward_of_a_pass_fails(self):
        """Backward runs once per pass: a second backward through a retained graph is the
        server's error, and the gradients of the first stay for the update."""
        self.new_model("twice")
        local = torch.nn.Linear(IN, HIDDEN)
        remote = tscale.torch.RemoteModel(self.client, "twice")
        x = torch.from_numpy(data(2)[0])
        loss = remote(local(x)).pow(2).mean()
        loss.backward(retain_graph=True)
        with self.assertError(grpc.StatusCode.FAILED_PRECONDITION):
            loss.backward()
        self.assertEqual(remote.update().step, 1)

    def test_bad_input(self):
        """A dtype the API lacks is refused before anything is sent."""
        self.new_model("dtype")
        remote = tscale.torch.RemoteModel(self.client, "dtype")
        with self.assertRaises(ValueError):
            remote(torch.zeros(2, HIDDEN, dtype=torch.float64))
        with self.assertRaises(ValueError):
            remote(np.zeros((2, HIDDEN), np.float32))
        with self.assertRaises(ValueError):
            tscale.torch.RemoteModel(self.client, "")
        self.assertEqual(self.pending("dtype"), 0)


if __name__ == "__main__":
    unittest.main()
