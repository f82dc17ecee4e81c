"""ReplicaGroup: one client for a replica group of tscale-servers.

A group (``tscale-server --group-size N --group-rank R --group-store HOST:PORT``) holds the same
models on every rank and trains them together: the state-changing calls are group calls, the same
request sent to every rank, which the ranks check against each other and commit together.
ReplicaGroup sends each group call to every rank in parallel; ``train_step`` splits a batch across
the ranks by rows, and the loss it returns is the group's (the mean over the whole batch)::

    import tscale
    with tscale.ReplicaGroup(["10.0.0.1:50051", "10.0.0.2:50051"]) as group:
        group.create_model("m", spec, seed=1)
        r = group.train_step("m", x, y, loss="mse", expected_step=0)
        print(r.loss, r.step)

Updates are exactly-once on every rank, so a group call that failed because the group was
re-forming (UNAVAILABLE) is retried with the same expected_step until ``retry_seconds`` pass.
A call that fails raises GroupError, which names the rank whose answer it carries.
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from typing import Any, Callable, List, Optional, Sequence, TypeVar, Union

import grpc
import numpy as np

from tscale.client import Client, EnumLike, ForwardResult, SpecLike, TrainStepResult
from tscale.errors import Error
from tscale.tensors import TensorLike
from tscale.v1 import trainer_pb2

_T = TypeVar("_T")

# Group failures worth a retry: the group was not formed, or re-forming, or another call met
# this one (ABORTED). Nothing was applied on any rank.
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED)


class GroupError(Error):
    """A group call failed: ``rank`` is the rank whose error this is (the lowest that failed)."""

    def __init__(self, rank: int, error: Error) -> None:
        super().__init__(error.code, f"rank {rank}: {error.message}", error.method)
        self.rank = rank
        self.error = error


class ReplicaGroup:
    """Clients of every rank of a group, in rank order (``addresses[r]`` is rank r).

    retry_seconds: how long a group call that failed on the group (UNAVAILABLE, ABORTED) is sent
        again to every rank; 0 sends it once. Other keyword arguments go to each rank's Client
        (whose own retries are off unless given: the group retries).
    """

    def __init__(self, addresses: Union[str, Sequence[str]], retry_seconds: float = 120.0,
                 **client_options: Any) -> None:
        if isinstance(addresses, str):
            addresses = [a for a in addresses.split(",") if a]
        if not addresses:
            raise ValueError("addresses: expected one address per rank, got none")
        self.addresses = list(addresses)
        self.retry_seconds = retry_seconds
        # The group retries its calls on every rank together: a rank's client alone does not
        # (a group call retried on one rank would wait for the others in vain).
        client_options.setdefault("retries", 0)
        self.clients = [Client(a, **client_options) for a in self.addresses]
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(self.clients))

    @property
    def size(self) -> int:
        """The number of ranks of the group."""
        return len(self.clients)

    def close(self) -> None:
        """Closes every rank's client (after the calls in flight end)."""
        self._pool.shutdown(wait=True)
        for c in self.clients:
            c.close()

    def __enter__(self) -> ReplicaGroup:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------ fan-out

    def _each(self, fn: Callable[[int, Client], _T]) -> List[_T]:
        """fn(rank, client) on every rank at once; the results in rank order, or GroupError."""
        futures = [self._pool.submit(fn, r, c) for r, c in enumerate(self.clients)]
        results, failed = [], None
        for r, f in enumerate(futures):
            try:
                results.append(f.result())
            except Error as e:
                results.append(None)
                if failed is None:
                    failed = (r, e)
        if failed is not None:
            raise GroupError(*failed)
        return results

    def _group_call(self, fn: Callable[[int, Client], _T]) -> List[_T]:
        """A group call, sent again while it fails on the group, within retry_seconds."""
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.2
        while True:
            try:
                return self._each(fn)
            except GroupError as e:
                if e.code not in _RETRYABLE or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    # ------------------------------------------------------------ reads

    def server_info(self, timeout: Optional[float] = None) -> List[trainer_pb2.ServerInfo]:
        """trainer_pb2.ServerInfo of every rank (group_size, group_rank, group_formed...)."""
        return self._each(lambda r, c: c.server_info(timeout=timeout))

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Waits until every rank is SERVING (its group formed); GroupError after ``timeout``."""
        self._each(lambda r, c: c.wait_ready(timeout=timeout))

    def get_model(self, model_id: str,
                  timeout: Optional[float] = None) -> List[trainer_pb2.ModelInfo]:
        """The model's ModelInfo on every rank, in rank order."""
        return self._each(lambda r, c: c.get_model(model_id, timeout=timeout))

    def step(self, model_id: str, timeout: Optional[float] = None) -> int:
        """The model's step (the same on every rank); ValueError when the ranks disagree."""
        steps = [i.step for i in self.get_model(model_id, timeout=timeout)]
        if len(set(steps)) != 1:
            raise ValueError(f"the ranks' replicas of '{model_id}' are at steps {steps}")
        return steps[0]

    def export_states(self, model_id: str, timeout: Optional[float] = None) -> List[bytes]:
        """Every rank's state file (bytes), in rank order: equal bytes on a healthy group."""
        return self._each(lambda r, c: c.export_state(model_id, timeout=timeout))

    # ------------------------------------------------------------ group calls

    def create_model(self, model_id: str, spec: SpecLike, seed: int = 0, device: str = "",
                     compute: EnumLike = "COMPUTE_TYPE_UNSPECIFIED",
                     timeout: Optional[float] = None) -> trainer_pb2.ModelInfo:
        """Creates the model on every rank (the same spec and seed); rank 0's ModelInfo."""
        return self._group_call(lambda r, c: c.create_model(
            model_id, spec, seed=seed, device=device, compute=compute, timeout=timeout))[0]

    def delete_model(self, model_id: str, delete_checkpoints: bool = False,
                     timeout: Optional[float] = None) -> None:
        """Deletes the model on every rank (see Client.delete_model). Returns None."""
        self._group_call(lambda r, c: c.delete_model(
            model_id, delete_checkpoints=delete_checkpoints, timeout=timeout))

    def import_state(self, model_id: str,
                     data: Union[bytes, bytearray, memoryview, str, os.PathLike],
                     **options: Any) -> trainer_pb2.ModelInfo:
        """Imports the same state on every rank; rank 0's ModelInfo. ``options`` go to each
        rank's Client.import_state."""
        return self._group_call(lambda r, c: c.import_state(model_id, data, **options))[0]

    def save_checkpoint(self, model_id: str,
                        timeout: Optional[float] = None) -> List[trainer_pb2.CheckpointInfo]:
        """Saves a checkpoint on every rank (each in its own --checkpoint-dir); every rank's
        CheckpointInfo, in rank order."""
        return self._each(lambda r, c: c.save_checkpoint(model_id, timeout=timeout))

    def restore_checkpoint(self, model_id: str, name: str = "",
                           timeout: Optional[float] = None) -> trainer_pb2.ModelInfo:
        """Restores the checkpoint ``name`` ("" = the newest valid one) on every rank; rank 0's
        ModelInfo."""
        return self._group_call(lambda r, c: c.restore_checkpoint(
            model_id, name=name, timeout=timeout))[0]

    def update_correlation(self, model_id: str, expected_step: int,
                           timeout: Optional[float] = None
                           ) -> trainer_pb2.UpdateCorrelationResponse:
        """The group's update of the gradients of every rank's Backward calls; rank 0's answer."""
        return self._group_call(lambda r, c: c.update_correlation(
            model_id, expected_step, timeout=timeout))[0]

    def split(self, x: TensorLike) -> List[TensorLike]:
        """The rows of x each rank takes, in rank order (sizes differ by at most one); ValueError
        when x has fewer rows than the group has ranks."""
        n = len(x)
        if n < self.size:
            raise ValueError(f"x: expected at least one row per rank ({self.size}), got {n}")
        bounds = [n * r // self.size for r in range(self.size + 1)]
        return [x[bounds[r]:bounds[r + 1]] for r in range(self.size)]

    def train_step(self, model_id: str, x: TensorLike, target: TensorLike, loss: EnumLike = "mse",
                   expected_step: Optional[int] = None, want_output: bool = False,
                   timeout: Optional[float] = None) -> TrainStepResult:
        """One TrainStep of the group on the batch (x, target), split across the ranks by rows.

        Equals a single server's step on the whole batch, up to the order of float32 summation.
        Returns TrainStepResult with the group's loss and step, and the output rows of every
        rank concatenated when want_output.
        """
        if expected_step is None:
            expected_step = self.step(model_id, timeout=timeout)
        xs, ts = self.split(x), self.split(target)
        results = self._group_call(lambda r, c: c.train_step(
            model_id, xs[r], ts[r], loss=loss, expected_step=expected_step,
            want_output=want_output, timeout=timeout))
        first = results[0]
        output = None
        if want_output and all(res.output is not None for res in results):
            parts = [res.output for res in results]
            if isinstance(parts[0], np.ndarray):
                output = np.concatenate(parts)
            else:  # torch tensors
                import torch
                output = torch.cat(parts)
        return TrainStepResult(first.loss, first.step, output, first.layers,
                               all(res.replayed for res in results))

    # ------------------------------------------------------------ one rank's passes

    def forward(self, model_id: str, x: TensorLike, train: bool = False, rank: int = 0,
                timeout: Optional[float] = None) -> ForwardResult:
        """Forward on one rank (passes are held by the rank that made them)."""
        return self.clients[rank].forward(model_id, x, train=train, timeout=timeout)

    def backward(self, model_id: str, pass_id: str, grad_output: TensorLike, rank: int = 0,
                 want_grad_input: bool = False,
                 timeout: Optional[float] = None) -> Optional[TensorLike]:
        """Backward of a pass on the rank that made it (see Client.backward): the input gradient
        when want_grad_input, else None."""
        return self.clients[rank].backward(model_id, pass_id, grad_output,
                                           want_grad_input=want_grad_input, timeout=timeout)
