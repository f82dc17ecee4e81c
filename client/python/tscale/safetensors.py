"""A small safetensors reader and writer in pure Python and numpy.

The format: 8 bytes little-endian unsigned header length N, N bytes of JSON header, then the data
section. The header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the data section) and may hold ``"__metadata__"``: a string -> string map.
tscale's state files put ``format`` ("tscale/1"), ``spec`` (the ModelSpec as JSON), ``step`` and
``crc32c`` (of the data section, 8 lowercase hex digits) there.

    tensors, metadata = safetensors.load("state.safetensors")
    data = safetensors.dumps(tensors, metadata, crc=True)

Arrays come back in native byte order and writable; BF16 tensors decode to float32 (numpy has no
bfloat16) and cannot be written.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

# The bytes of a file: bytes, bytearray, memoryview (anything of the buffer protocol).
_Bytes = Union[bytes, bytearray, memoryview]

# safetensors dtype name <-> numpy dtype (little-endian)
_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {dt.newbyteorder("="): name for name, dt in _DTYPES.items()}

METADATA_KEY = "__metadata__"
MAX_HEADER_BYTES = 100 * 1024 * 1024


def _parse_header(data: memoryview) -> Tuple[Dict[str, Any], int]:
    """The JSON header of a file's bytes and the offset of its data section."""
    if len(data) < 8:
        raise ValueError(f"safetensors: expected at least 8 bytes, got {len(data)}")
    (n,) = struct.unpack_from("<Q", data, 0)
    if n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise ValueError(f"safetensors: header length {n} does not fit a file of {len(data)} bytes")
    try:
        header = json.loads(bytes(data[8:8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"safetensors: header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise ValueError("safetensors: header is not a JSON object")
    return header, 8 + n


def read_metadata(data: _Bytes) -> Dict[str, str]:
    """Returns the ``__metadata__`` map of the file's bytes ({} when there is none)."""
    header, _ = _parse_header(memoryview(data))
    return dict(header.get(METADATA_KEY) or {})


def loads(data: _Bytes) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """Parses a safetensors file's bytes.

    Returns ``(tensors, metadata)``: tensors is a dict name -> numpy array in the order of their
    data offsets (so ``dumps`` rebuilds the same data section), metadata a dict of strings ({}
    when the file has none). Raises ValueError for a malformed file (bad lengths, unknown dtype,
    offsets out of range, overlapping or leaving holes).
    """
    data = memoryview(data)
    header, start = _parse_header(data)
    metadata = header.pop(METADATA_KEY, None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("safetensors: __metadata__ must map strings to strings")
    body = data[start:]
    entries = []
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise ValueError(f"safetensors: {name}: expected dtype, shape and data_offsets")
        bf16 = info["dtype"] == "BF16"  # read as raw 16-bit words, then widened to float32
        dtype = np.dtype("<u2") if bf16 else _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"safetensors: {name}: unsupported dtype {info['dtype']!r}")
        shape = [int(d) for d in info["shape"]]
        begin, end = (int(o) for o in info["data_offsets"])
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if any(d < 0 for d in shape) or not 0 <= begin <= end <= len(body):
            raise ValueError(f"safetensors: {name}: offsets [{begin}, {end}] out of range of a "
                             f"{len(body)}-byte data section")
        if end - begin != count * dtype.itemsize:
            raise ValueError(f"safetensors: {name}: {info['dtype']} {shape} needs "
                             f"{count * dtype.itemsize} bytes, offsets give {end - begin}")
        entries.append((begin, end, name, dtype, shape, bf16))
    entries.sort(key=lambda e: (e[0], e[1]))
    pos = 0
    for begin, end, name, *_ in entries:
        if begin != pos:
            raise ValueError(f"safetensors: {name}: data starts at {begin}, expected {pos} "
                             "(overlap or hole)")
        pos = end
    if pos != len(body):
        raise ValueError(f"safetensors: the data section has {len(body)} bytes, the tensors "
                         f"cover {pos}")
    tensors = {}
    for begin, end, name, dtype, shape, bf16 in entries:
        arr = np.frombuffer(body[begin:end], dtype=dtype).reshape(shape)
        if bf16:  # the high half of a float32
            tensors[name] = (arr.astype(np.uint32) << 16).view(np.float32)
        else:
            tensors[name] = arr.astype(dtype.newbyteorder("="), copy=True)
    return tensors, dict(metadata)


def load(path: Union[str, os.PathLike]) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """Reads a safetensors file; see ``loads``."""
    with open(path, "rb") as f:
        return loads(f.read())


def dumps(tensors: Mapping[str, np.ndarray], metadata: Optional[Mapping[str, str]] = None,
          crc: bool = False) -> bytes:
    """Returns the bytes of a safetensors file holding ``tensors`` (name -> numpy array).

    Tensors are laid out in the dict's order. ``metadata`` (str -> str) goes to ``__metadata__``;
    with ``crc=True`` a ``crc32c`` entry of the data section is added (replacing any given).
    The JSON header is padded with spaces to a multiple of 8 bytes. Raises ValueError for a bad
    name, an unsupported dtype or metadata that is not strings.
    """
    header = {}
    chunks = []
    pos = 0
    for name, arr in tensors.items():
        if not isinstance(name, str) or name == METADATA_KEY:
            raise ValueError(f"safetensors: bad tensor name {name!r}")
        arr = np.asarray(arr)
        native = arr.dtype.newbyteorder("=")
        if native not in _NAMES:
            raise ValueError(f"safetensors: {name}: unsupported dtype {arr.dtype}")
        dtname = _NAMES[native]
        raw = np.ascontiguousarray(arr, dtype=_DTYPES[dtname]).tobytes()
        header[name] = {"dtype": dtname, "shape": list(arr.shape),
                        "data_offsets": [pos, pos + len(raw)]}
        chunks.append(raw)
        pos += len(raw)
    body = b"".join(chunks)
    md = dict(metadata or {})
    if crc:
        md["crc32c"] = crc32c_hex(body)
    for k, v in md.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(f"safetensors: metadata must map strings to strings, got {k!r}: {v!r}")
    if md:
        header = {METADATA_KEY: md, **header}
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * ((-len(text)) % 8)
    return struct.pack("<Q", len(text)) + text + body


def save(path: Union[str, os.PathLike], tensors: Mapping[str, np.ndarray],
         metadata: Optional[Mapping[str, str]] = None, crc: bool = False) -> None:
    """Writes ``dumps(tensors, metadata, crc)`` to ``path`` (via a temporary file and rename)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(dumps(tensors, metadata, crc))
    os.replace(tmp, path)


def data_section(data: _Bytes) -> bytes:
    """The bytes after the header (what ``crc32c`` in the metadata covers)."""
    _, start = _parse_header(memoryview(data))
    return bytes(memoryview(data)[start:])


# ---------------------------------------------------------------- CRC-32C (Castagnoli)

def _make_table() -> List[int]:
    poly = 0x82F63B78  # reflected 0x1EDC6F41
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _make_table()


def crc32c(data: _Bytes, crc: int = 0) -> int:
    """CRC-32C of ``data`` (pure Python: fine for files of a few MB); ``crc`` continues a CRC of
    the bytes before ``data``. Returns it as an int."""
    table = _CRC_TABLE
    c = crc ^ 0xFFFFFFFF
    for b in bytes(data):
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def crc32c_hex(data: _Bytes) -> str:
    """``crc32c(data)`` as tscale writes it: 8 lowercase hex digits."""
    return f"{crc32c(data):08x}"
