#!/usr/bin/env python3
"""Re-makes the single-pass golden cases with the reference on another device (a GPU), so that the
core can be checked bit for bit against the reference on that same device.

For each case it loads the golden file (tests/data/golden), builds the reference model from the
case's spec and initial state on --device, runs the case's steps with the case's inputs and output
gradients, and writes a golden file of the same form whose outputs, input gradients and final state
are the reference's on that device. Then golden_test, pointed at them, compares:

  tests/gpu/reference_golden.py --reference-dir DIR --out OUT --device cuda
  TSCALE_TEST_DATA=OUT TSCALE_EXPECT_BITEXACT=1 build/bin/golden_test \
      --gtest_filter='*OnCuda*:-*grad_accum*'

grad_accum (several Backward calls summed into one update) is the service's semantics, not the
reference module's (its gradient hook keeps the last pass only), so it is not re-made here.
Needs only torch. DIR holds tscale_mini.py (or set TSCALE_REFERENCE_DIR).
"""
import argparse
import collections
import json
import os
import struct
import sys

import torch

CASES = os.environ.get("TSCALE_GOLDEN_CASES", "linear_basic,linear_ragged_bias,linear_gs16,mlp").split(",")
DTYPES = {"F32": torch.float32, "I64": torch.int64, "I32": torch.int32, "I8": torch.int8,
          "U8": torch.uint8}
NAMES = {v: k for k, v in DTYPES.items()}


def read(path):
    with open(path, "rb") as f:
        blob = f.read()
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    data = blob[8 + n:]
    meta = header.pop("__metadata__", {})
    tensors = collections.OrderedDict()
    for key, info in header.items():
        lo, hi = info["data_offsets"]
        t = torch.frombuffer(bytearray(data[lo:hi]), dtype=DTYPES[info["dtype"]]) if hi > lo \
            else torch.empty(0, dtype=DTYPES[info["dtype"]])
        tensors[key] = t.reshape(info["shape"]).clone()
    return meta, tensors


def write(path, meta, tensors):
    header, chunks, offset = {"__metadata__": meta}, [], 0
    for key, t in tensors.items():
        raw = bytes(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).tolist())
        header[key] = {"dtype": NAMES[t.dtype], "shape": list(t.shape),
                       "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(chunks))


def build(ref, spec):
    acts = {"RELU": torch.nn.ReLU, "GELU": torch.nn.GELU, "SILU": torch.nn.SiLU}
    layers = collections.OrderedDict()
    for layer in spec["layers"]:
        if "ternary_linear" in layer:
            l = layer["ternary_linear"]
            layers[layer["name"]] = ref.TernaryScaleTensor(
                l["in_features"], l["out_features"], group_size=l.get("group_size", 32),
                bias=l.get("bias", False))
        elif "ternary_rms_norm" in layer:
            l = layer["ternary_rms_norm"]
            layers[layer["name"]] = ref.TernaryRMSNorm(l["dim"], group_size=l.get("group_size", 32))
        elif "activation" in layer:
            layers[layer["name"]] = acts[layer["activation"]["kind"]]()
        else:
            sys.exit(f"reference_golden: layer {layer['name']}: kind not handled here")
    return torch.nn.Sequential(layers)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference-dir", default=os.environ.get("TSCALE_REFERENCE_DIR"))
    p.add_argument("--golden", default=os.path.join(os.path.dirname(__file__), "..", "data",
                                                    "golden"))
    p.add_argument("--out", required=True, help="folder to write OUT/golden/<case>.safetensors")
    p.add_argument("--device", default="cuda")
    a = p.parse_args()
    if not a.reference_dir or not os.path.exists(os.path.join(a.reference_dir, "tscale_mini.py")):
        sys.exit(f"reference_golden: --reference-dir: expected a folder holding tscale_mini.py, "
                 f"got {a.reference_dir!r}")
    sys.path.insert(0, a.reference_dir)
    import tscale_mini as ref  # noqa: E402

    device = torch.device(a.device)
    os.makedirs(os.path.join(a.out, "golden"), exist_ok=True)
    for case in CASES:
        meta, t = read(os.path.join(a.golden, case + ".safetensors"))
        spec = json.loads(meta["spec"])
        model = build(ref, spec)
        init = {k[len("init."):]: v for k, v in t.items() if k.startswith("init.")}
        model.load_state_dict(init, strict=True)
        model.to(device)
        out = collections.OrderedDict((k, v) for k, v in t.items() if not k.startswith("final."))
        changed = 0
        for s in range(int(meta["steps"])):
            tag = f"step{s}"
            x = t[tag + ".x"].to(device).requires_grad_(True)
            y = model(x)
            y.backward(t[tag + ".grad_out"].to(device))
            for m in model.modules():
                if isinstance(m, ref.TernaryScaleTensor):
                    m.update_corr()
            for key, value in ((tag + ".y", y), (tag + ".grad_in", x.grad)):
                value = value.detach().cpu()
                changed += int((value != t[key]).sum())
                out[key] = value
        for key, value in model.state_dict().items():
            out["final." + key] = value.cpu()
            if not torch.equal(value.cpu(), t["final." + key]):
                print(f"{case}: final.{key} differs from the CPU golden file")
        write(os.path.join(a.out, "golden", case + ".safetensors"), meta, out)
        print(f"{case}: reference on {device}: {changed} output/input-gradient elements differ "
              f"in bits from the CPU golden file")


if __name__ == "__main__":
    main()
