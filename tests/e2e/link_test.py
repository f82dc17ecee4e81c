"""Errors across a real, slow link: the server in its own network namespace, this client in
another, joined by a veth pair whose server side is slowed to 1 Mbit/s (tc tbf), so that a
TrainStep's large answer (want_output) takes seconds to come back.

- a deadline that passes while the answer of an applied TrainStep is on its way: the error says
  the step may have been applied and which step to read; the model is at that step, and sending
  the request again through the client is answered as a replay: applied exactly once;
- with the client's own retries, the retry after such a deadline finds out by itself (the
  server's replay of the step it applied);
- a link that dies while a large request is being written (the client's way in slowed to
  20 Mbit/s, then the link set down): the call ends within its deadline and the client's keepalive
  timeout, not when the kernel gives up on the connection.

Needs root (ip netns, tc); elsewhere the test prints "link_test: skipped:" and why.
"""

import shutil
import subprocess
import threading
import time
import unittest
import uuid

import grpc
import numpy as np

import tscale
from server_process import ErrorAssertions, ServerProcess

IN, OUT, BATCH = 64, 1024, 100  # an output of 400 KB: over 3 s at 1 Mbit/s
SPEC = {"layers": [{"name": "fc", "ternary_linear": {"in_features": IN, "out_features": OUT}}]}
DEADLINE_S = 1.0


def run(*cmd):
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)


class SlowLinkTest(ErrorAssertions, unittest.TestCase):

    def setUp(self):
        tag = uuid.uuid4().hex[:6]
        self.ns = f"tsl{tag}"
        self.veth = f"vl{tag}"
        # A private /24 of its own (the group test uses 10.231.x.0/30, link_bench 10.233.x.0/24).
        subnet = f"10.232.{int(tag[:2], 16)}"
        self.host, self.peer = f"{subnet}.1", f"{subnet}.2"
        for tool in ("ip", "tc"):
            if shutil.which(tool) is None:
                self.skip(f"no {tool} command (iproute2)")
        self.addCleanup(self.remove_namespace)
        in_ns = ("ip", "netns", "exec", self.ns)
        for cmd in (
                ("ip", "netns", "add", self.ns),
                ("ip", "link", "add", self.veth + "a", "type", "veth", "peer", "name",
                 self.veth + "b"),
                ("ip", "link", "set", self.veth + "b", "netns", self.ns),
                ("ip", "addr", "add", self.host + "/24", "dev", self.veth + "a"),
                ("ip", "link", "set", self.veth + "a", "up"),
                in_ns + ("ip", "addr", "add", self.peer + "/24", "dev", self.veth + "b"),
                in_ns + ("ip", "link", "set", self.veth + "b", "up"),
                in_ns + ("ip", "link", "set", "lo", "up")):
            r = run(*cmd)
            if r.returncode != 0:
                self.skip(f"'{' '.join(cmd)}' failed: {r.stderr.strip()} (needs root)")
        self.server = ServerProcess("--listen", f"{self.peer}:0", prefix=in_ns)
        self.server.start()
        self.addCleanup(self.server.remove_logs)
        self.addCleanup(self.server.kill)
        # Slow the server's way out: answers crawl, requests do not.
        shape = in_ns + ("tc", "qdisc", "add", "dev", self.veth + "b", "root", "tbf", "rate",
                         "1mbit", "burst", "32kbit", "latency", "400ms")
        r = run(*shape)
        if r.returncode != 0:
            self.skip(f"'{' '.join(shape)}' failed: {r.stderr.strip()}")
        rng = np.random.RandomState(0)
        self.x = rng.randn(BATCH, IN).astype(np.float32)
        self.y = rng.randn(BATCH, OUT).astype(np.float32)

    def skip(self, why):
        print(f"link_test: skipped: {why}", flush=True)
        self.skipTest(why)

    def remove_namespace(self):
        # Deleting the namespace deletes the veth pair with it.
        run("ip", "netns", "del", self.ns)
        run("ip", "link", "del", self.veth + "a")

    def test_a_deadline_cutting_a_train_steps_answer(self):
        self.assertEqual(self.server.address.rsplit(":", 1)[0], self.peer)
        # Without retries: the error says what is unknown and how to find out.
        with tscale.Client(self.server.address, timeout=60, retries=0) as c:
            c.create_model("m", SPEC, seed=1)
            with self.assertError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                  "TrainStep with expected_step 0 may have been applied",
                                  "read the model's step (get_model): 1 means it was, 0 that it "
                                  "was not",
                                  "the server answers it as a replay"):
                c.train_step("m", self.x, self.y, expected_step=0, want_output=True,
                             timeout=DEADLINE_S)
            # It was: the answer, not the request, was what the deadline cut.
            self.assertEqual(c.get_model("m").step, 1)
            again = c.train_step("m", self.x, self.y, expected_step=0, want_output=True)
            self.assertEqual((again.step, again.replayed, again.output), (1, True, None))
            self.assertEqual(c.get_model("m").step, 1)
        # With the client's own retries, the retry after the deadline finds out by itself: the
        # first attempt applied the step, its answer missed the deadline, and the retry, with the
        # same expected_step, got the server's replay.
        with tscale.Client(self.server.address, timeout=60) as c:
            self.assertEqual(c.get_model("m").step, 1)
            r = c.train_step("m", self.x, self.y, expected_step=1, want_output=True,
                             timeout=DEADLINE_S)
            self.assertEqual((r.step, r.replayed, r.output), (2, True, None))
            self.assertEqual(c.get_model("m").step, 2)

    def test_a_link_that_dies_while_a_request_is_written(self):
        # A Forward of 64 MB is on its way when the link goes down: the client's socket buffer
        # stays full and no acknowledgement comes. The call must still end, within its deadline
        # and the client's keepalive timeout (20 s), not when the kernel gives up on the
        # connection a quarter of an hour later.
        with tscale.Client(self.server.address, timeout=60, retries=0) as c:
            c.create_model("big", {"layers": [{"name": "fc", "ternary_linear": {
                "in_features": 1024, "out_features": 16}}]}, seed=1)
            # 16 MB, and the client's way in slowed to 20 Mbit/s: the request takes over 6 s to
            # write, so that the link surely goes down while it is being written.
            x = np.random.RandomState(1).randn(4096, 1024).astype(np.float32)
            shape = ("tc", "qdisc", "add", "dev", self.veth + "a", "root", "tbf", "rate",
                     "20mbit", "burst", "64kbit", "latency", "400ms")
            r = run(*shape)
            if r.returncode != 0:
                self.skip(f"'{' '.join(shape)}' failed: {r.stderr.strip()}")
            outcome = {}

            def forward():
                start = time.monotonic()
                try:
                    c.forward("big", x, timeout=DEADLINE_S * 5)
                    outcome["error"] = None
                except tscale.Error as e:
                    outcome["error"] = e
                outcome["seconds"] = time.monotonic() - start
            t = threading.Thread(target=forward, daemon=True)
            t.start()
            time.sleep(1.0)
            r = run("ip", "link", "set", self.veth + "a", "down")
            self.assertEqual(r.returncode, 0, r.stderr)
            t.join(DEADLINE_S * 5 + 20 + 15)
            self.assertFalse(t.is_alive(), "the call outlived its deadline and the keepalive "
                             "timeout")
            self.assertIsNotNone(outcome["error"], "the Forward crossed a link that was down")
            self.assertIn(outcome["error"].code,
                          (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE))
            print(f"\nlink_test: link down mid-request: the call ended after "
                  f"{outcome['seconds']:.1f} s with {outcome['error'].code.name} (deadline "
                  f"{DEADLINE_S * 5:.0f} s)", flush=True)


if __name__ == "__main__":
    unittest.main()
