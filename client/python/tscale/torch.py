"""A remote tscale model as a PyTorch module (``import tscale.torch``; needs torch).

    import torch, tscale, tscale.torch

    client = tscale.Client("127.0.0.1:50051")
    local = torch.nn.Linear(32, 64)                        # trained here, by a torch optimizer
    remote = tscale.torch.RemoteModel(client, "head")      # trained on the server
    model = torch.nn.Sequential(local, torch.nn.ReLU(), remote)
    opt = torch.optim.SGD(local.parameters(), lr=0.1)
    for x, t in batches:
        loss = torch.nn.functional.mse_loss(model(x), t)
        opt.zero_grad()
        loss.backward()      # the server's Backward; local layers get the input gradient
        opt.step()
        remote.update()      # the server's UpdateCorrelation, exactly once

How the module calls the server:

- ``forward`` runs Forward with ``train=True`` when autograd records (``torch.is_grad_enabled()``)
  and the module is in training mode (``remote.train()``, the default), else with
  ``train=False``: under ``torch.no_grad()``, ``torch.inference_mode()`` or after
  ``remote.eval()`` nothing is kept on the server.
- A training forward creates a pass on the server; ``loss.backward()`` runs Backward for it (with
  the pass's id), through a ``torch.autograd.Function``, and returns the server's gradient of the
  input to the layers before the module (``want_grad_input`` is set when the input needs a
  gradient; the backward runs also when it needs none, for the remote weights). The weight
  gradients of every Backward since the last update are summed on the server; ``update()``
  applies them.
- Backward runs at most once per pass: a second ``backward`` through the same graph
  (``retain_graph=True``) fails with the server's FAILED_PRECONDITION, and a pass made before the
  last ``update()`` was released by it (FAILED_PRECONDITION too). Higher-order gradients
  (``create_graph=True``) are not available.
- A training forward whose output never gets a backward keeps its pass on the server until the
  next update (or the server's --pending-pass-ttl-seconds); ``release()`` frees the model's
  pending passes now. Evaluate under ``torch.no_grad()`` or in eval mode to make none.

Tensors go to the server as float32 (or float16) on the host: tensors on a GPU are copied to the
host and the results copied back to the input's device. Other dtypes (float64, bfloat16) raise
ValueError: convert with ``.float()``.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from tscale.client import Client
from tscale.v1 import trainer_pb2

__all__ = ["RemoteModel"]


class _RemoteForward(torch.autograd.Function):
    """Forward(train=True) of a RemoteModel; its backward is the server's Backward of that pass."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, anchor: torch.Tensor,
                remote: RemoteModel) -> torch.Tensor:
        # anchor: an empty tensor that requires grad, so that autograd records this function and
        # runs its backward even when x needs no gradient (the remote weights always learn).
        del anchor
        result = remote.client.forward(remote.model_id, x, train=True, timeout=remote.timeout)
        remote._seen_step(result.step)
        ctx.remote = remote
        ctx.pass_id = result.pass_id
        ctx.input_dtype = x.dtype
        return result.output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> Tuple[Optional[torch.Tensor], None, None]:
        remote = ctx.remote
        want_grad_input = bool(ctx.needs_input_grad[0])
        grad_input = remote.client.backward(
            remote.model_id, ctx.pass_id, grad_output.contiguous(),
            want_grad_input=want_grad_input, timeout=remote.timeout)
        if want_grad_input:
            grad_input = grad_input.to(ctx.input_dtype)
        else:
            grad_input = None
        return grad_input, None, None


class RemoteModel(torch.nn.Module):
    """A model held by a tscale server, as a ``torch.nn.Module`` with no local parameters.

    Args:
        client: a ``tscale.Client`` connected to the server that holds the model.
        model_id: the model's id (create it first, e.g. ``client.create_model``).
        timeout: seconds per attempt of each call (None: the client's default).

    ``forward(x)`` takes ``[batch, in_features]`` float32 (or float16) and returns the model's
    output, a float32 tensor on x's device. See the module's docstring for when it trains and for
    the once-per-pass rule of backward. ``step`` is the model's step as last seen (from Forward's
    response or the last update; None before the first call).
    """

    def __init__(self, client: Client, model_id: str, timeout: Optional[float] = None) -> None:
        super().__init__()
        if not isinstance(model_id, str) or not model_id:
            raise ValueError(f"model_id: expected a non-empty string, got {model_id!r}")
        self.client = client
        self.model_id = model_id
        self.timeout = timeout
        self.step: Optional[int] = None

    def _seen_step(self, step: int) -> None:
        self.step = int(step)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output for x: a training pass on the server when autograd records and the
        module is in training mode, an inference otherwise."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if self.training and torch.is_grad_enabled():
            anchor = torch.empty(0, requires_grad=True)
            return _RemoteForward.apply(x, anchor, self)
        result = self.client.forward(self.model_id, x.detach(), train=False,
                                     timeout=self.timeout)
        self._seen_step(result.step)
        return result.output

    def update(self) -> trainer_pb2.UpdateCorrelationResponse:
        """Applies the model's correlation update (UpdateCorrelation) with the gradients of every
        Backward since the last update, at the step of this module's last forward (read from the
        server when there was none). Exactly once: the client retries the call with the same
        expected step and the server answers a retry of the update it applied as a replay.
        Returns the ``trainer_pb2.UpdateCorrelationResponse``; ``step`` is then the new step.

        Raises ``tscale.Error`` FAILED_PRECONDITION when the model's step is no longer that step
        (another client updated it) or when no Backward ran since the last update.
        """
        if self.step is None:
            self._seen_step(self.client.get_model(self.model_id, timeout=self.timeout).step)
        response = self.client.update_correlation(self.model_id, expected_step=self.step,
                                                  timeout=self.timeout)
        self._seen_step(response.step)
        return response

    def release(self) -> trainer_pb2.ReleasePassesResponse:
        """Releases every pending training pass of the model on the server (those of other
        clients of the model included): passes whose output will get no backward. A backward
        through a released pass then fails. Returns ``trainer_pb2.ReleasePassesResponse``."""
        return self.client.release_passes(self.model_id, timeout=self.timeout)

    def extra_repr(self) -> str:
        """The module's line in ``repr``: its model id."""
        return f"model_id={self.model_id!r}"
