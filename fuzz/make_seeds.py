#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into fuzz/corpus/<target>/.

Valid examples come from tests/data/golden (the models' initial states, with and without tscale's
metadata); the rest are hand-made edge cases. Deterministic: running it again gives the same files.
Inputs that once made a target fail are kept next to them as regression-* files (not written here).

Usage: python3 fuzz/make_seeds.py
"""

import json
import os
import struct

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "data", "golden")
CORPUS = os.path.join(ROOT, "fuzz", "corpus")

DTYPE_SIZE = {"U8": 1, "I8": 1, "I32": 4, "I64": 8, "F32": 4, "BF16": 2, "F16": 2}


# ---------------------------------------------------------------- CRC32C (Castagnoli, reflected)

def _crc_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc_table()


def crc32c(data):
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


# ---------------------------------------------------------------- safetensors

def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    metadata = header.pop("__metadata__", {})
    tensors = {}
    for name, e in header.items():
        b, end = e["data_offsets"]
        tensors[name] = (e["dtype"], e["shape"], data[b:end])
    return tensors, metadata


def write_safetensors(tensors, metadata=None, crc=False):
    """As the product's writer: larger elements first, then by name; header padded to 8."""
    order = sorted(tensors, key=lambda k: (-DTYPE_SIZE[tensors[k][0]], k))
    data = b"".join(tensors[k][2] for k in order)
    metadata = dict(metadata or {})
    if crc:
        metadata["crc32c"] = "%08x" % crc32c(data)
    header = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for k in order:
        dtype, shape, raw = tensors[k]
        header[k] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + data


def raw_file(header_text, data=b""):
    if isinstance(header_text, str):
        header_text = header_text.encode()
    return struct.pack("<Q", len(header_text)) + header_text + data


# ---------------------------------------------------------------- protobuf wire format

def varint(n):
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field_varint(num, value):
    return varint(num << 3) + varint(value)


def field_bytes(num, payload):
    return varint((num << 3) | 2) + varint(len(payload)) + payload


def field_float(num, value):
    return varint((num << 3) | 5) + struct.pack("<f", value)


def tensor_msg(dtype, shape, data):
    out = b""
    if dtype:
        out += field_varint(1, dtype)
    if shape:
        out += field_bytes(2, b"".join(varint(d) for d in shape))  # packed
    if data:
        out += field_bytes(3, data)
    return out


def layer_msg(layer):
    out = field_bytes(1, layer["name"].encode()) if "name" in layer else b""
    if "ternary_linear" in layer:
        p = layer["ternary_linear"]
        body = field_varint(1, p.get("in_features", 0)) + field_varint(2, p.get("out_features", 0))
        if p.get("group_size"):
            body += field_varint(3, p["group_size"])
        if p.get("threshold"):
            body += field_float(4, p["threshold"])
        if p.get("bias"):
            body += field_varint(5, 1)
        out += field_bytes(2, body)
    elif "ternary_rms_norm" in layer:
        p = layer["ternary_rms_norm"]
        body = field_varint(1, p.get("dim", 0))
        if p.get("group_size"):
            body += field_varint(2, p["group_size"])
        out += field_bytes(3, body)
    elif "activation" in layer:
        kinds = {"RELU": 1, "GELU": 2, "SILU": 3}
        out += field_bytes(4, field_varint(1, kinds[layer["activation"]["kind"]]))
    elif "residual" in layer:
        out += field_bytes(5, b"".join(field_bytes(1, layer_msg(l))
                                       for l in layer["residual"]["layers"]))
    return out


def spec_msg(spec):
    return b"".join(field_bytes(1, layer_msg(l)) for l in spec["layers"])


# ---------------------------------------------------------------- corpora

def golden_models():
    """(name, spec JSON text, initial state tensors under the layers' names)."""
    out = []
    for name in ["linear_basic", "linear_ragged_bias", "linear_gs16", "mlp", "grad_accum"]:
        tensors, metadata = read_safetensors(os.path.join(GOLDEN, name + ".safetensors"))
        state = {k[len("init."):]: v for k, v in tensors.items() if k.startswith("init.")}
        out.append((name, metadata["spec"], state))
    return out


def state_file(spec, state, step=0, crc=True):
    return write_safetensors(state, {"format": "tscale/1", "spec": spec, "step": str(step)}, crc)


def safetensors_seeds(models):
    seeds = {}
    for name, spec, state in models:
        seeds["state_" + name] = state_file(spec, state)
    seeds["reference_no_metadata"] = write_safetensors(models[1][2])
    with open(os.path.join(GOLDEN, "pack_codec.safetensors"), "rb") as f:
        seeds["pack_codec"] = f.read()
    seeds["empty_object"] = raw_file("{}")
    seeds["metadata_only"] = raw_file('{"__metadata__":{"a":"b","":"\\u00e9"}}')
    seeds["zero_size_tensors"] = raw_file(
        '{"a":{"dtype":"F32","shape":[0,3],"data_offsets":[0,0]},'
        '"b":{"dtype":"I64","shape":[],"data_offsets":[0,8]},'
        '"c":{"dtype":"U8","shape":[0],"data_offsets":[8,8]}}', b"\x01" * 8)
    seeds["all_dtypes"] = write_safetensors({
        d.lower(): (d, [2], bytes(range(2 * s))) for d, s in DTYPE_SIZE.items()})
    seeds["hole"] = raw_file('{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', b"xy")
    seeds["overlap"] = raw_file('{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},'
                                '"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}', b"xyz")
    seeds["overflow_shape"] = raw_file(
        '{"a":{"dtype":"I64","shape":[4294967296,4294967296],"data_offsets":[0,0]}}')
    seeds["duplicate_key"] = raw_file('{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
                                      '"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"x")
    seeds["header_too_long"] = struct.pack("<Q", 1 << 40) + b"{}"
    seeds["short"] = b"\x02\x00\x00"
    seeds["deep_nesting"] = raw_file("[" * 40 + "]" * 40)
    seeds["reserved_name"] = raw_file('{"__x":{"dtype":"U8","shape":[],"data_offsets":[0,1]}}', b"q")
    return seeds


def import_state_seeds(models):
    seeds = {}
    for name, spec, state in models:
        f = state_file(spec, state, step=0)
        seeds["ok_" + name] = b"\x00" + f
        seeds["fixcrc_" + name] = b"\x01" + f
    name, spec, state = models[1]  # linear_ragged_bias: the target's fallback spec
    seeds["no_metadata_fallback_spec"] = b"\x02" + write_safetensors(state)
    seeds["bad_crc"] = b"\x00" + state_file(spec, state)[:-1] + b"\x7f"
    seeds["bad_format"] = b"\x01" + write_safetensors(state, {"format": "tscale/2", "spec": spec})
    seeds["bad_step"] = b"\x01" + write_safetensors(state, {"spec": spec, "step": "-1"})
    step_state = dict(state)
    step_state["fc.step_counter"] = ("I64", [1], struct.pack("<q", 5))
    seeds["step_mismatch"] = b"\x01" + write_safetensors(step_state, {"spec": spec, "step": "3"})
    missing = {k: v for k, v in state.items() if not k.endswith(".E")}
    seeds["missing_tensor"] = b"\x01" + write_safetensors(missing, {"spec": spec})
    big_spec = json.dumps({"layers": [{"name": "fc", "ternary_linear": {
        "in_features": 1 << 30, "out_features": 1 << 30}}]})
    seeds["huge_spec"] = b"\x01" + write_safetensors(state, {"spec": big_spec})
    seeds["bad_spec"] = b"\x01" + write_safetensors(state, {"spec": "{\"layers\": 3}"})
    return seeds


def spec_seeds(models):
    specs = [json.loads(spec) for _, spec, _ in models]
    specs.append({"layers": [
        {"name": "in", "ternary_linear": {"in_features": 16, "out_features": 8, "threshold": 0.1}},
        {"name": "block", "residual": {"layers": [
            {"name": "norm", "ternary_rms_norm": {"dim": 8, "group_size": 4}},
            {"name": "up", "ternary_linear": {"in_features": 8, "out_features": 12}},
            {"name": "act", "activation": {"kind": "GELU"}},
            {"name": "down", "ternary_linear": {"in_features": 12, "out_features": 8}}]}},
        {"name": "relu", "activation": {"kind": "RELU"}}]})
    seeds = {}
    for i, spec in enumerate(specs):
        seeds["json_%d" % i] = b"\x01" + json.dumps(spec).encode()
        seeds["proto_%d" % i] = b"\x00" + spec_msg(spec)
    hand = {
        "camel_case": '{"layers":[{"name":"a","ternaryLinear":{"inFeatures":"4","outFeatures":2,'
                      '"groupSize":2}},{"name":"n","ternaryRmsNorm":{"dim":2}}]}',
        "activation_number": '{"layers":[{"name":"a","ternary_linear":{"in_features":3,'
                             '"out_features":3}},{"name":"b","activation":{"kind":3}}]}',
        "chain_mismatch": '{"layers":[{"name":"a","ternary_linear":{"in_features":3,'
                          '"out_features":4}},{"name":"b","ternary_linear":{"in_features":5,'
                          '"out_features":1}}]}',
        "duplicate_names": '{"layers":[{"name":"a","ternary_rms_norm":{"dim":3}},'
                           '{"name":"a","ternary_rms_norm":{"dim":3}}]}',
        "two_kinds": '{"layers":[{"name":"a","ternary_rms_norm":{"dim":3},"activation":{}}]}',
        "empty": '{"layers":[]}',
        "too_many_weights": '{"layers":[{"name":"a","ternary_linear":{"in_features":2147483647,'
                            '"out_features":2147483647}}]}',
        "nested_residuals": '{"layers":[{"name":"a","ternary_rms_norm":{"dim":2}}' +
                            ',{"name":"r","residual":{"layers":[{"name":"r","residual":'
                            '{"layers":[{"name":"n","ternary_rms_norm":{"dim":2}}]}}]}}]}',
        "nan_threshold": '{"layers":[{"name":"a","ternary_linear":{"in_features":1,'
                         '"out_features":1,"threshold":1e300}}]}',
    }
    for k, v in hand.items():
        seeds[k] = b"\x01" + v.encode()
    return seeds


def tensor_seeds():
    seeds = {}
    # Structured (odd first byte): dtype + 2, rank, one byte per dimension, data.
    def structured(dtype, dims, data):
        return b"\x01" + bytes([dtype + 2, len(dims)]) + bytes(dims) + data
    seeds["fp32_2x3"] = structured(1, [2, 3], struct.pack("<6f", 1, -2, 0.5, float("nan"),
                                                          float("inf"), 0))
    seeds["int64_4"] = structured(7, [4], struct.pack("<4q", 0, 1, -1, 1 << 62))
    seeds["scalar_bf16"] = structured(2, [], b"\x80\x3f")
    seeds["zero_size"] = structured(4, [0, 5], b"")
    seeds["rank9"] = structured(5, [1] * 9, b"\x01")
    seeds["edge_dims"] = structured(1, [255, 254, 253], b"")
    seeds["unknown_dtype"] = structured(9, [1], b"\x00")
    # Wire form (even first byte): a TrainStepRequest.
    def request(inp, target):
        return b"\x00" + field_bytes(1, b"m") + field_bytes(2, inp) + field_bytes(3, target) + \
            field_varint(4, 1) + field_varint(5, 0)
    seeds["wire_mse"] = request(tensor_msg(1, [2, 2], struct.pack("<4f", 1, 2, 3, 4)),
                                tensor_msg(1, [2, 1], struct.pack("<2f", 0, 1)))
    seeds["wire_cross_entropy"] = request(tensor_msg(1, [1, 3], struct.pack("<3f", 0, 0, 1)),
                                          tensor_msg(7, [1], struct.pack("<q", 2)))
    seeds["wire_negative_dim"] = request(tensor_msg(1, [-1, 2], b""), b"")
    seeds["wire_overflow"] = request(tensor_msg(1, [1 << 40, 1 << 40], b""), tensor_msg(3, [], b""))
    seeds["wire_short_data"] = request(tensor_msg(6, [3], b"\x00" * 11), tensor_msg(0, [], b""))
    return seeds


def write(target, seeds):
    folder = os.path.join(CORPUS, target)
    os.makedirs(folder, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(folder, "seed-" + name), "wb") as f:
            f.write(data)


def main():
    models = golden_models()
    write("safetensors_fuzz", safetensors_seeds(models))
    write("import_state_fuzz", import_state_seeds(models))
    write("spec_fuzz", spec_seeds(models))
    write("tensor_proto_fuzz", tensor_seeds())


if __name__ == "__main__":
    main()
