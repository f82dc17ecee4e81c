#!/usr/bin/env python3
"""Training steps per second across a slow link: unary TrainStep, Forward/Backward/
UpdateCorrelation, and TrainStream, FP32 against BF16 on the wire.

The server runs in a network namespace of its own, joined to this one by a veth pair whose two
ends are rate-limited with `tc ... tbf` (--rate); the client reaches it through a small TCP proxy
in this namespace that holds every chunk for --delay-ms each way (these kernels have no netem), so
a round trip costs twice that. Two models: a small one whose compute is far under the round trip
(--small, default 64x64 at batch 16), and a wide one whose steps are bound by the link's bytes
(--wide, default 4096x4096 at batch 256: 8 MB of input and target per FP32 step). Every condition
trains its own fresh model on the same batches, and the script checks that the unary, streamed
and three-call paths end in the same state where they must (FP32), exiting 1 otherwise.

    sudo PYTHONPATH=build/python /usr/bin/python3 bench/link_bench.py
        [--server build/bin/tscale-server] [--delay-ms 5] [--rate 200mbit] [--quick]

Needs root (ip netns, tc); prints "link_bench: skipped: ..." and exits 77 elsewhere.
"""

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import numpy as np

import tscale


def run(*cmd):
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)


class DelayProxy:
    """A TCP proxy on 127.0.0.1 that forwards to `target`, each chunk `delay` seconds late, in
    order, both ways (an asyncio loop on a thread of its own)."""

    def __init__(self, target, delay):
        self._target = target
        self._delay = delay
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        ready.wait(10)

    def _run(self, ready):
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        ready.set()
        self._loop.run_forever()

    async def _accept(self, reader, writer):
        host, port = self._target.rsplit(":", 1)
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            writer.close()
            return
        asyncio.ensure_future(self._pipe(reader, up_writer))
        asyncio.ensure_future(self._pipe(up_reader, writer))

    async def _pipe(self, reader, writer):
        queue = asyncio.Queue()

        async def send():
            while True:
                due, data = await queue.get()
                if data is None:
                    break
                wait = due - self._loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
            writer.close()
        sender = asyncio.ensure_future(send())
        try:
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    break
                queue.put_nowait((self._loop.time() + self._delay, data))
        except (ConnectionError, OSError):
            pass
        queue.put_nowait((0, None))
        try:
            await sender
        except (ConnectionError, OSError):
            pass

    def close(self):
        async def stop():
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._loop.stop()
        asyncio.run_coroutine_threadsafe(stop(), self._loop)
        self._thread.join(5)


class Link:
    """A namespace with the server's end of a veth pair, both ends limited to `rate`."""

    def __init__(self, rate):
        tag = uuid.uuid4().hex[:6]
        self.ns, self.veth = f"tlb{tag}", f"vb{tag}"
        subnet = f"10.233.{int(tag[:2], 16)}"
        self.host, self.peer = f"{subnet}.1", f"{subnet}.2"
        for tool in ("ip", "tc"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"no {tool} command (iproute2)")
        in_ns = ("ip", "netns", "exec", self.ns)
        steps = [
            ("ip", "netns", "add", self.ns),
            ("ip", "link", "add", self.veth + "a", "type", "veth", "peer", "name",
             self.veth + "b"),
            ("ip", "link", "set", self.veth + "b", "netns", self.ns),
            ("ip", "addr", "add", self.host + "/24", "dev", self.veth + "a"),
            ("ip", "link", "set", self.veth + "a", "up"),
            in_ns + ("ip", "addr", "add", self.peer + "/24", "dev", self.veth + "b"),
            in_ns + ("ip", "link", "set", self.veth + "b", "up"),
            in_ns + ("ip", "link", "set", "lo", "up"),
            ("tc", "qdisc", "add", "dev", self.veth + "a", "root", "tbf", "rate", rate,
             "burst", "256kbit", "latency", "100ms"),
            in_ns + ("tc", "qdisc", "add", "dev", self.veth + "b", "root", "tbf", "rate", rate,
                     "burst", "256kbit", "latency", "100ms"),
        ]
        for cmd in steps:
            r = run(*cmd)
            if r.returncode != 0:
                self.close()
                raise RuntimeError(f"'{' '.join(cmd)}' failed: {r.stderr.strip()} (needs root)")
        self.prefix = list(in_ns)

    def close(self):
        run("ip", "netns", "del", self.ns)
        run("ip", "link", "del", self.veth + "a")


def start_server(server, link, log):
    proc = subprocess.Popen(link.prefix + [server, "--listen", f"{link.peer}:0", "--device",
                                           "cpu"], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with open(log.name) as f:
            m = re.search(r"listening on (\S+)", f.read())
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"tscale-server exited with {proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError("tscale-server did not listen within 60 s")


def spec(features):
    return {"layers": [{"name": "fc", "ternary_linear": {"in_features": features,
                                                         "out_features": features}}]}


def measure(address, features, batch, steps, wire):
    """steps/s of the three paths on fresh models, and their final states."""
    rng = np.random.RandomState(1)
    data = [(rng.randn(batch, features).astype(np.float32),
             rng.randn(batch, features).astype(np.float32)) for _ in range(steps)]
    out = {}
    with tscale.Client(address, timeout=600, wire_dtype=wire) as c:
        for path in ("unary", "fbu", "stream"):
            name = f"{path}-{wire}-{features}"
            c.create_model(name, spec(features), seed=3)
            c.train_step(name, *data[0], expected_step=0)  # warm-up (connection, allocation)
            start = time.monotonic()
            if path == "unary":
                for k, (x, y) in enumerate(data[1:], start=1):
                    c.train_step(name, x, y, expected_step=k)
            elif path == "fbu":
                for k, (x, y) in enumerate(data[1:], start=1):
                    f = c.forward(name, x, train=True)
                    c.backward(name, f.pass_id, ((f.output - y) * (2.0 / y.size)).astype(np.float32))
                    c.update_correlation(name, expected_step=k)
            else:
                for _ in c.train_stream(name, data[1:], expected_step=1):
                    pass
            seconds = time.monotonic() - start
            out[path] = ((steps - 1) / seconds, tscale.safetensors.loads(
                c.export_state(name))[0])
            c.delete_model(name)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default=os.path.join("build", "bin", "tscale-server"))
    parser.add_argument("--delay-ms", type=float, default=5.0)
    parser.add_argument("--rate", default="200mbit")
    parser.add_argument("--small", default="64x16", help="FEATURESxBATCH of the small model")
    parser.add_argument("--wide", default="4096x256", help="FEATURESxBATCH of the wide model")
    parser.add_argument("--quick", action="store_true", help="fewer steps (the test's run)")
    args = parser.parse_args()
    try:
        link = Link(args.rate)
    except RuntimeError as e:
        print(f"link_bench: skipped: {e}")
        return 77
    log = tempfile.NamedTemporaryFile(prefix="link-bench-", suffix=".log", delete=False)
    proc, proxy = None, None
    failed = False
    try:
        proc, address = start_server(args.server, link, log)
        proxy = DelayProxy(address, args.delay_ms / 1000.0)
        print(f"link: {args.rate} each way, {args.delay_ms:g} ms each way "
              f"({2 * args.delay_ms:g} ms round trip) through a delaying proxy")
        print(f"{'model':>16} {'wire':>5} {'unary steps/s':>14} {'F/B/U steps/s':>14} "
              f"{'stream steps/s':>15} {'stream/unary':>13}")
        results = {}
        for label, shape, steps in (("small", args.small, 40 if args.quick else 200),
                                    ("wide", args.wide, 3 if args.quick else 6)):
            features, batch = (int(v) for v in shape.split("x"))
            for wire in ("fp32", "bf16"):
                r = measure(proxy.address, features, batch, steps, wire)
                results[(label, wire)] = r
                print(f"{f'{features}x{features} b{batch}':>16} {wire:>5} "
                      f"{r['unary'][0]:14.1f} {r['fbu'][0]:14.1f} {r['stream'][0]:15.1f} "
                      f"{r['stream'][0] / r['unary'][0]:13.2f}")
                sys.stdout.flush()
                # FP32: the three paths apply the same updates (the Forward/Backward path's
                # gradient is MSE's, computed here in float32 the same way).
                states = [r[p][1] for p in ("unary", "stream")]
                if any(a.keys() != b.keys() or any(not np.array_equal(a[k], b[k]) for k in a)
                       for a, b in zip(states, states[1:])):
                    print(f"link_bench: {label} {wire}: the streamed state differs from the "
                          f"unary one")
                    failed = True
        for label in ("small", "wide"):
            fp32, bf16 = results[(label, "fp32")], results[(label, "bf16")]
            print(f"{label}: BF16/FP32 steps/s: unary {bf16['unary'][0] / fp32['unary'][0]:.2f}, "
                  f"F/B/U {bf16['fbu'][0] / fp32['fbu'][0]:.2f}, "
                  f"stream {bf16['stream'][0] / fp32['stream'][0]:.2f}")
    finally:
        if proxy is not None:
            proxy.close()
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        link.close()
        os.unlink(log.name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
