"""Client.train_stream: TrainSteps over one TrainStream, sent without waiting for each answer.

The server applies the steps in the order sent, each exactly as TrainStep (expected_step, replay of
a retried step, the same errors), and answers in that order; it reads a step only while fewer than
its window (ServerInfo.stream_window) are unanswered, so a fast producer is held back, not queued
without bound. When the stream breaks (the server restarted, the link dropped), the client reads the
model's step and resumes from it: the steps the server had applied are not sent again (the last of
them is sent again and answered as a replay, with its loss), so no update is lost or doubled.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Optional, Tuple

import grpc

from tscale.errors import Error
from tscale.tensors import TensorLike, is_torch, to_float32, to_wire_tensor, torch_to_numpy
from tscale.v1 import trainer_pb2

if TYPE_CHECKING:  # tscale.client imports this module (lazily); numpy is only named in hints
    import numpy as np

    from tscale.client import Client, TrainStepResult

# Stream failures after which the client resumes from the model's step.
_RESUMABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
              grpc.StatusCode.DEADLINE_EXCEEDED)


def train_stream(client: Client, model_id: str, batches: Iterable[Tuple[TensorLike, TensorLike]],
                 loss_value: int, expected_step: Optional[int], want_output: bool,
                 result_type: Callable[..., TrainStepResult],
                 like: Callable[[TensorLike, np.ndarray], TensorLike]
                 ) -> Iterator[TrainStepResult]:
    """The steps of Client.train_stream (see it), over ``client``'s channel.

    loss_value: the TrainStepRequest.Loss value. result_type: builds each step's result from
    (loss, step, output, layers, replayed). like: (the step's x, a float32 output) -> the output
    as the caller gave x (a torch tensor for a torch x). Yields the results in order; raises
    tscale.Error for a step that failed or a stream that could not be resumed.
    """
    source = iter(batches)
    if expected_step is None:
        expected_step = client.get_model(model_id).step
    lock = threading.Lock()
    state = {"next_step": expected_step, "generation": 0}
    # Steps sent on the current stream and not yet answered, oldest first:
    # (expected_step, request, x).
    unanswered = collections.deque()
    resend = []  # steps to send first on the next stream, oldest first
    first_failure = None

    def requests(generation: int) -> Iterator[trainer_pb2.TrainStepRequest]:
        while True:
            with lock:
                if generation != state["generation"]:
                    return  # a broken stream's reader: the next stream sends the rest
                if resend:
                    item = resend.pop(0)
                    unanswered.append(item)
                else:
                    item = None
            if item is None:
                try:
                    x, target = next(source)
                except StopIteration:
                    return
                if is_torch(target):
                    target = torch_to_numpy(target, "target")
                if loss_value == trainer_pb2.TrainStepRequest.CROSS_ENTROPY and \
                        hasattr(target, "dtype") and target.dtype.kind in "iu":
                    target = target.astype("int64", copy=False)
                with lock:
                    req = trainer_pb2.TrainStepRequest(
                        model_id=model_id, input=to_wire_tensor(x, "input", client._wire),
                        target=to_wire_tensor(target, "target", client._wire), loss=loss_value,
                        expected_step=state["next_step"], want_output=want_output,
                        output_dtype=client._wire)
                    item = (state["next_step"], req, x)
                    state["next_step"] += 1
                    if generation != state["generation"]:
                        resend.append(item)  # the newest: it goes last
                        return
                    unanswered.append(item)
            yield item[1]

    while True:
        with lock:
            generation = state["generation"]
        call = client._stub.TrainStream(requests(generation), metadata=client._metadata)
        try:
            for resp in call:
                with lock:
                    _, _, x = unanswered.popleft()
                output = like(x, to_float32(resp.output, "output")) \
                    if resp.HasField("output") else None
                first_failure = None
                yield result_type(resp.loss, resp.step, output, list(resp.layers), resp.replayed)
            with lock:
                if not unanswered and not resend:
                    return
                left = len(unanswered) + len(resend)
            # The server ended the stream with OK before answering every step: not expected.
            raise Error(grpc.StatusCode.INTERNAL,
                        f"TrainStream ended with {left} steps unanswered", "TrainStream")
        except grpc.RpcError as e:
            code = e.code()
            now = time.monotonic()
            first_failure = now if first_failure is None else first_failure
            call.cancel()
            with lock:
                state["generation"] += 1
                items = list(unanswered) + resend
                unanswered.clear()
                resend.clear()
            if code not in _RESUMABLE or now - first_failure > client.retry_seconds:
                error = client._error(e, "TrainStream")
                if items and code in _RESUMABLE:
                    error = Error(error.code, f"{error.message} (the steps from expected_step "
                                  f"{items[0][0]} may have been applied: read the model's step)",
                                  "TrainStream", details=error.details)
                elif items:
                    error = Error(error.code, f"{error.message} (the step sent with "
                                  f"expected_step {items[0][0]}; the {len(items) - 1} sent after "
                                  f"it were not applied)", "TrainStream", details=error.details)
                raise error from None
            # Resume from the model's step: what the server applied is not sent again.
            time.sleep(min(client.backoff, 1.0))
            applied = None
            try:
                applied = client.get_model(model_id).step
            except Error as read_error:
                if read_error.code not in _RESUMABLE or \
                        time.monotonic() - first_failure > client.retry_seconds:
                    raise
            keep = []
            for item in items:
                if applied is not None and item[0] < applied - 1:
                    # Applied before the break, its answer lost: the server keeps only the last
                    # update's answer for a replay.
                    yield result_type(math.nan, item[0] + 1, None, [], True)
                else:
                    keep.append(item)
            with lock:
                resend[:0] = keep  # before any step a broken stream's reader took meanwhile
