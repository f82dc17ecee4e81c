#!/usr/bin/env python3
"""TrainStep of replica groups of 1, 2 and 3 ranks: samples/s and bytes sent per update per rank.

Starts each group as tscale-server processes on loopback (Gloo), creates one model of a
ternary linear layer (default 1024x1024), and times TrainSteps of `--batch` rows per rank through
tscale.ReplicaGroup. Bytes per update come from each rank's /metrics
(tscale_group_exchange_bytes_total), against what a plain ring all-reduce of the float32
gradient would send: 2 (N - 1) / N * 4 * weights.

    PYTHONPATH=build/python /usr/bin/python3 bench/group_step.py [--server build/bin/tscale-server]
        [--sizes 1,2,3] [--features 1024] [--batch 256] [--steps 20]

On one machine the ranks share its cores: the figures give the shape of the costs (the
exchange's share of a step, its bytes), not a cluster's scaling.
"""

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np

import tscale


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(text, name):
    m = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def run_group(server, size, features, batch, steps, warmup):
    store = f"127.0.0.1:{free_port()}"
    procs, addresses, metrics = [], [], []
    logs = []
    try:
        for r in range(size):
            port, mport = free_port(), free_port()
            log = tempfile.NamedTemporaryFile(prefix="group-bench-", suffix=".log", delete=False)
            logs.append(log.name)
            procs.append(subprocess.Popen(
                [server, "--listen", f"127.0.0.1:{port}", "--device", "cpu",
                 "--metrics-listen", f"127.0.0.1:{mport}", "--group-size", str(size),
                 "--group-rank", str(r), "--group-store", store, "--group-timeout-seconds", "60"],
                stdout=log, stderr=subprocess.STDOUT))
            addresses.append(f"127.0.0.1:{port}")
            metrics.append(f"http://127.0.0.1:{mport}/metrics")
        group = tscale.ReplicaGroup(addresses, timeout=600)
        group.wait_ready(timeout=120)
        spec = {"layers": [{"name": "fc", "ternary_linear": {
            "in_features": features, "out_features": features}}]}
        group.create_model("m", spec, seed=1)
        rng = np.random.RandomState(0)
        x = rng.randn(batch * size, features).astype(np.float32)
        y = rng.randn(batch * size, features).astype(np.float32)
        for step in range(warmup):
            group.train_step("m", x, y, expected_step=step)

        def scrape():
            texts = [urllib.request.urlopen(m, timeout=10).read().decode() for m in metrics]
            return ([metric(t, "tscale_group_exchange_bytes_total") for t in texts],
                    [metric(t, "tscale_group_exchange_seconds_sum") for t in texts])
        bytes0, secs0 = scrape()
        start = time.perf_counter()
        for step in range(warmup, warmup + steps):
            group.train_step("m", x, y, expected_step=step)
        elapsed = time.perf_counter() - start
        bytes1, secs1 = scrape()
        group.close()
        sent = [(b1 - b0) / steps for b0, b1 in zip(bytes0, bytes1)]
        exchange = [(s1 - s0) / steps for s0, s1 in zip(secs0, secs1)]
        return {
            "size": size,
            "samples_per_s": batch * size * steps / elapsed,
            "step_ms": 1000 * elapsed / steps,
            "exchange_ms": 1000 * max(exchange),
            "bytes_per_rank": max(sent),
        }
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=60)
        for name in logs:
            os.unlink(name)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", default=os.path.join(here, "..", "build", "bin",
                                                         "tscale-server"))
    parser.add_argument("--sizes", default="1,2,3")
    parser.add_argument("--features", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256, help="rows per rank per step")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    weights = args.features * args.features
    print(f"group_step: {args.features}x{args.features} ternary linear, batch {args.batch} per "
          f"rank, {args.steps} steps, cpu, {os.cpu_count()} cores")
    print(f"{'ranks':>5} {'samples/s':>10} {'step ms':>8} {'exchange ms':>11} "
          f"{'sent B/update/rank':>18} {'ring all-reduce B':>17} {'ratio':>6}")
    for size in (int(s) for s in args.sizes.split(",")):
        r = run_group(args.server, size, args.features, args.batch, args.steps, args.warmup)
        allreduce = 2 * (size - 1) / size * 4 * weights
        ratio = r["bytes_per_rank"] / allreduce if allreduce else 0
        print(f"{size:>5} {r['samples_per_s']:>10.0f} {r['step_ms']:>8.1f} "
              f"{r['exchange_ms']:>11.2f} {r['bytes_per_rank']:>18.0f} {allreduce:>17.0f} "
              f"{ratio:>6.3f}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
