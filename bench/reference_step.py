#!/usr/bin/env python3
"""The reference's training step of one ternary linear layer, timed on the same shapes as
bench/layer_step, so that the two can be compared from one run on one machine.

The step is the reference's own: forward, backward w.r.t. the weight (the input does not require a
gradient), update_corr. It prints ms per step and the peak device memory of one step (everything
allocated, the layer and the batch included, as layer_step counts it). With --ours FILE (the output
of layer_step) it also prints, per row of layer_step, the reference's time divided by ours.

Usage: reference_step.py --reference-dir DIR [--device cuda] [--sizes 4096,8192]
                         [--batches 1,16,256,4096,16384] [--group-size 32] [--seconds 0.5]
                         [--ours layer_step.txt]
DIR holds tscale_mini.py (or set TSCALE_REFERENCE_DIR).
"""
import argparse
import os
import sys
import time

import torch


def time_ms(fn, device, seconds):
    for _ in range(3):
        fn()
    sync(device)
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        if n >= 5 and n % 5 == 0:
            sync(device)
            if time.perf_counter() - start >= seconds:
                break
    sync(device)
    return 1e3 * (time.perf_counter() - start) / n


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference-dir", default=os.environ.get("TSCALE_REFERENCE_DIR"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", default="4096,8192")
    p.add_argument("--batches", default="1,16,256,4096,16384")
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--seconds", type=float, default=0.5)
    p.add_argument("--ours", help="layer_step's output, to print the ratios")
    a = p.parse_args()
    if not a.reference_dir or not os.path.exists(os.path.join(a.reference_dir, "tscale_mini.py")):
        sys.exit("reference_step: --reference-dir: expected a folder holding tscale_mini.py, got "
                 f"{a.reference_dir!r}")
    sys.path.insert(0, a.reference_dir)
    import tscale_mini  # noqa: E402

    device = torch.device(a.device)
    print(f"reference step on {device} (torch {torch.__version__}), group size {a.group_size}")
    print(f"{'size':>6} {'batch':>6} {'ref_ms':>10} {'peak_MiB':>9}")
    ref = {}
    for n in map(int, a.sizes.split(",")):
        for b in map(int, a.batches.split(",")):
            torch.manual_seed(0)
            layer = tscale_mini.TernaryScaleTensor(n, n, group_size=a.group_size).to(device)
            x = torch.randn(b, n, device=device)
            g = torch.randn(b, n, device=device)

            def step():
                y = layer(x)
                y.backward(g)
                layer.update_corr()

            step()
            sync(device)
            peak = -1.0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                step()
                sync(device)
                peak = torch.cuda.max_memory_allocated(device) / 2**20
            ms = time_ms(step, device, a.seconds)
            ref[(n, b)] = ms
            print(f"{n:>6} {b:>6} {ms:>10.3f} {peak:>9.1f}", flush=True)
            del layer, x, g
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if a.ours:
        print("\nreference's step time / ours (same shapes, same run)")
        print(f"{'size':>6} {'batch':>6} {'mode':>5} {'ours_ms':>10} {'ref_ms':>10} {'speedup':>8}")
        with open(a.ours) as f:
            for line in f:
                parts = line.split()
                if len(parts) < 4 or not parts[0].isdigit():
                    continue
                n, b, mode, ms = int(parts[0]), int(parts[1]), parts[2], float(parts[3])
                if (n, b) in ref:
                    print(f"{n:>6} {b:>6} {mode:>5} {ms:>10.3f} {ref[(n, b)]:>10.3f} "
                          f"{ref[(n, b)] / ms:>8.1f}")


if __name__ == "__main__":
    main()
