"""numpy arrays and torch tensors <-> the API's ``tscale.v1.Tensor`` (row-major, little-endian,
no padding).

Supported: float32 (FP32), float16 (FP16), int8 (INT8), uint8 (UINT8), int32 (INT32),
int64 (INT64). BF16 tensors coming from the server decode to float32 (numpy has no bfloat16).
Any other dtype (float64, bool, object, ...) raises ValueError: convert explicitly, e.g.
``x.astype(np.float32)``, so that no precision is lost or invented silently.

Torch tensors of those dtypes are accepted wherever a numpy array is (detached, and copied to the
host when on a GPU). torch is never imported by this package unless a torch tensor is passed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from tscale.v1 import trainer_pb2

if TYPE_CHECKING:  # torch is imported at run time only when a torch tensor is passed
    import torch

# A numpy array or a torch tensor (torch is optional, so no narrower hint is possible at run time).
TensorLike = Any

# numpy dtype (native) -> proto DataType
_TO_PROTO = {
    np.dtype(np.float32): trainer_pb2.FP32,
    np.dtype(np.float16): trainer_pb2.FP16,
    np.dtype(np.int8): trainer_pb2.INT8,
    np.dtype(np.uint8): trainer_pb2.UINT8,
    np.dtype(np.int32): trainer_pb2.INT32,
    np.dtype(np.int64): trainer_pb2.INT64,
}
# proto DataType -> little-endian numpy dtype
_FROM_PROTO = {
    trainer_pb2.FP32: np.dtype("<f4"),
    trainer_pb2.FP16: np.dtype("<f2"),
    trainer_pb2.INT8: np.dtype("i1"),
    trainer_pb2.UINT8: np.dtype("u1"),
    trainer_pb2.INT32: np.dtype("<i4"),
    trainer_pb2.INT64: np.dtype("<i8"),
}

SUPPORTED_DTYPES = tuple(str(d) for d in _TO_PROTO)


def is_torch(value: Any) -> bool:
    """Whether value is a torch tensor (imports torch only when value's type comes from it)."""
    if not type(value).__module__.startswith("torch"):
        return False
    import torch
    return isinstance(value, torch.Tensor)


def torch_to_numpy(tensor: torch.Tensor, field: str = "tensor") -> np.ndarray:
    """A numpy array with the data of a torch tensor (detached; copied to the host from a GPU).
    ``field`` names the tensor in errors. ValueError for a dtype numpy or the API lacks
    (bfloat16, float64, bool, ...)."""
    import torch
    supported = {torch.float32, torch.float16, torch.int8, torch.uint8, torch.int32, torch.int64}
    if tensor.dtype not in supported:
        raise ValueError(
            f"{field}: expected dtype one of {', '.join(SUPPORTED_DTYPES)}, got {tensor.dtype} "
            f"(convert explicitly, e.g. .float())")
    return tensor.detach().cpu().numpy()


def numpy_to_torch(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """A torch tensor with array's data, on the device of the torch tensor ``like``."""
    import torch
    return torch.from_numpy(array).to(like.device)


def to_tensor(array: TensorLike, field: str = "tensor") -> trainer_pb2.Tensor:
    """Returns a ``trainer_pb2.Tensor`` holding a copy of ``array`` (``field`` names it in errors).

    ``array`` must be a numpy array (or something ``np.asarray`` keeps at a supported dtype, such
    as a numpy scalar) or a torch tensor, of one of SUPPORTED_DTYPES. Non-contiguous and
    big-endian arrays are converted; the shape is kept as is (0-d included). Raises ValueError
    for anything else.
    """
    if is_torch(array):
        array = torch_to_numpy(array, field)
    if not isinstance(array, np.ndarray):
        if isinstance(array, np.generic):
            array = np.asarray(array)
        else:
            raise ValueError(
                f"{field}: expected a numpy array or torch tensor of one of "
                f"{', '.join(SUPPORTED_DTYPES)}, got {type(array).__name__}")
    native = array.dtype.newbyteorder("=")
    if native not in _TO_PROTO:
        raise ValueError(
            f"{field}: expected dtype one of {', '.join(SUPPORTED_DTYPES)}, got {array.dtype} "
            f"(convert explicitly, e.g. .astype(np.float32))")
    little = native.newbyteorder("<")
    data = np.ascontiguousarray(array, dtype=little).tobytes()
    return trainer_pb2.Tensor(dtype=_TO_PROTO[native], shape=list(array.shape), data=data)


# Float dtypes a float32 tensor may travel as (Client's wire_dtype).
WIRE_DTYPES = {"fp32": trainer_pb2.FP32, "bf16": trainer_pb2.BF16, "fp16": trainer_pb2.FP16}


def to_wire_tensor(array: TensorLike, field: str, wire: int) -> trainer_pb2.Tensor:
    """Like to_tensor, but a float32 array travels as ``wire`` (trainer_pb2.FP32, BF16 or FP16):
    BF16 by round-to-nearest-even of the float32 bits, FP16 by numpy's conversion (values beyond
    its range, about 65504, become inf, which the server refuses). Other dtypes go as they are."""
    if is_torch(array):
        array = torch_to_numpy(array, field)
    if wire == trainer_pb2.FP32 or not isinstance(array, np.ndarray) or \
            array.dtype.newbyteorder("=") != np.dtype(np.float32):
        return to_tensor(array, field)
    if wire == trainer_pb2.FP16:
        return to_tensor(array.astype(np.float16), field)
    bits = np.ascontiguousarray(array, dtype="<f4").view("<u4").astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = np.isnan(array).reshape(bits.shape)
    half = np.where(nan, (bits >> 16) | 0x40, rounded).astype("<u2")
    return trainer_pb2.Tensor(dtype=trainer_pb2.BF16, shape=list(array.shape),
                              data=half.tobytes())


def to_float32(tensor: trainer_pb2.Tensor, field: str = "tensor") -> np.ndarray:
    """to_numpy of a float tensor that may come as FP32, BF16 or FP16, as float32."""
    out = to_numpy(tensor, field)
    return out if out.dtype == np.float32 else out.astype(np.float32)


def to_numpy(tensor: trainer_pb2.Tensor, field: str = "tensor") -> np.ndarray:
    """Returns a writable numpy array (native byte order) with a copy of ``tensor``'s data.

    ``field`` names the tensor in errors. Raises ValueError for an unknown dtype or a data size
    that does not match the shape.
    """
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"{field}: negative dimension in shape {list(shape)}")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if tensor.dtype == trainer_pb2.BF16:
        if len(tensor.data) != count * 2:
            raise ValueError(f"{field}: expected {count * 2} bytes for BF16 {list(shape)}, "
                             f"got {len(tensor.data)}")
        bits = np.frombuffer(tensor.data, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    dtype = _FROM_PROTO.get(tensor.dtype)
    if dtype is None:
        name = trainer_pb2.DataType.Name(tensor.dtype) if tensor.dtype in \
            trainer_pb2.DataType.values() else str(tensor.dtype)
        raise ValueError(f"{field}: unsupported dtype {name}")
    if len(tensor.data) != count * dtype.itemsize:
        raise ValueError(f"{field}: expected {count * dtype.itemsize} bytes for "
                         f"{trainer_pb2.DataType.Name(tensor.dtype)} {list(shape)}, "
                         f"got {len(tensor.data)}")
    out = np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
    return out.astype(dtype.newbyteorder("="), copy=True)
