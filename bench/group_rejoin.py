#!/usr/bin/env python3
"""How long a replica group takes to bring back a member that died: per model size.

For each size, starts a group of 2 tscale-server processes on loopback (Gloo), creates one model
of a square ternary linear layer, trains a step, kills rank 1 with SIGKILL and starts it again
empty on the same port. It prints the state's bytes, the seconds from the restart to every rank
serving the group again (the process's start, the store, the new generation, the state's
broadcast), the seconds of the state's sync itself (rank 1's log, "in line after"), and the bytes
rank 1 received (its log, "brought forward"), and checks that the replicas are byte-identical.

    PYTHONPATH=build/python /usr/bin/python3 bench/group_rejoin.py [--server build/bin/tscale-server]
        [--features 256,1024,4096] [--repeats 3]

On one machine the ranks share its cores and loopback: the figures give the shape of the costs,
not a cluster's.
"""

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

import tscale


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Rank:
    def __init__(self, server, rank, store, port):
        self.args = [server, "--listen", f"127.0.0.1:{port}", "--device", "cpu",
                     "--group-size", "2", "--group-rank", str(rank), "--group-store", store,
                     "--group-timeout-seconds", "60"]
        self.address = f"127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile(prefix="group-rejoin-", suffix=".log",
                                               delete=False).name
        self.proc = None

    def start(self):
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()
        os.unlink(self.log)

    def text(self):
        with open(self.log) as f:
            return f.read()


def measure(server, features, repeats):
    store = f"127.0.0.1:{free_port()}"
    ranks = [Rank(server, r, store, free_port()) for r in range(2)]
    rows = []
    try:
        for r in ranks:
            r.start()
        group = tscale.ReplicaGroup([r.address for r in ranks], timeout=600, retry_seconds=120)
        group.wait_ready(timeout=120)
        spec = {"layers": [{"name": "fc", "ternary_linear": {"in_features": features,
                                                             "out_features": features}}]}
        group.create_model("m", spec, seed=1)
        rng = np.random.RandomState(0)
        x = rng.randn(8, features).astype(np.float32)
        y = rng.randn(8, features).astype(np.float32)
        state_bytes = len(group.export_states("m")[0])
        for k in range(repeats):
            group.train_step("m", x, y, expected_step=k)
            ranks[1].kill()
            start = time.monotonic()
            ranks[1].start()
            # The clients connect once it listens (before, gRPC's reconnection backoff would
            # be measured).
            deadline = time.monotonic() + 60
            while "listening on" not in ranks[1].text() and time.monotonic() < deadline:
                time.sleep(0.01)
            group.close()
            group = tscale.ReplicaGroup([r.address for r in ranks], timeout=600,
                                        retry_seconds=120)
            group.wait_ready(timeout=120)
            seconds = time.monotonic() - start
            log = ranks[1].text()
            synced = re.findall(r"in line after ([0-9.e+-]+) s", log)
            received = re.findall(r"brought forward from rank 0 \(step \d+, (\d+) bytes\)", log)
            states = group.export_states("m")
            if states[0] != states[1]:
                raise SystemExit(f"{features}: the replicas differ after the rejoin")
            rows.append((seconds, float(synced[-1]) if synced else float("nan"),
                         int(received[-1]) if received else 0))
        group.close()
    finally:
        for r in ranks:
            r.stop()
    return state_bytes, rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default=os.path.join("build", "bin", "tscale-server"))
    parser.add_argument("--features", default="256,1024,4096")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print("features  state bytes  restart->serving s (median)  sync s (median)  bytes received")
    for features in [int(f) for f in args.features.split(",")]:
        state_bytes, rows = measure(args.server, features, args.repeats)
        serving = float(np.median([r[0] for r in rows]))
        sync = float(np.median([r[1] for r in rows]))
        print(f"{features:8d}  {state_bytes:11d}  {serving:27.3f}  {sync:15.4f}  "
              f"{rows[-1][2]:14d}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
