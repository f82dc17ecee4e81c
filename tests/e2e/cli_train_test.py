"""The tscale CLI's train: no LibTorch in the CLI, one line of advice when the loss stalls, a
training run that rides through a server restart (SIGTERM mid-step, the server back on the same
port from its checkpoints: every step applied exactly once), and, when it cannot, the step it
stopped at."""

import json
import os
import socket
import subprocess
import tempfile
import time
import unittest

import tscale
from server_process import SERVER_BIN, ServerProcess, ServerTestCase

CLI = os.path.join(os.path.dirname(SERVER_BIN), "tscale")


def mlp(hidden_layers, width=128):
    layers, n_in = [], 32
    for i in range(hidden_layers):
        layers.append({"name": f"fc{i}", "ternary_linear": {"in_features": n_in,
                                                             "out_features": width}})
        layers.append({"name": f"act{i}", "activation": {"kind": "RELU"}})
        n_in = width
    layers.append({"name": "head", "ternary_linear": {"in_features": n_in, "out_features": 10}})
    return {"layers": layers}


class CliTrainTest(ServerTestCase):

    def cli(self, *args):
        return subprocess.run([CLI, "--server", self.server.address, *args], capture_output=True,
                              text=True, timeout=300)

    def test_the_cli_links_no_libtorch(self):
        if not os.path.exists(CLI):
            self.skipTest(f"no tscale CLI at {CLI}")
        libs = subprocess.run(["ldd", CLI], capture_output=True, text=True).stdout
        self.assertNotIn("libtorch", libs)
        self.assertNotIn("libc10", libs)

    def test_a_stalled_loss_says_why_in_one_line(self):
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(mlp(6), f)
        self.addCleanup(os.unlink, f.name)
        r = self.cli("create", "deep", "--spec", f.name, "--seed", "1")
        self.assertEqual(r.returncode, 0, r.stderr)
        r = self.cli("train", "deep", "--steps", "150", "--batch", "16", "--loss", "ce")
        self.assertEqual(r.returncode, 0, r.stderr)
        advice = [l for l in r.stdout.splitlines() if l.startswith("train: the loss has stopped")]
        self.assertEqual(len(advice), 1, r.stdout)
        for words in ("only the per-group scales learn", "shallower model", "group_size",
                      "What the learning rule can and cannot learn"):
            self.assertIn(words, advice[0])
        self.assertIn("train: the loss has stopped", r.stderr)  # said when it happened, too


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Steps of a few tenths of a second on a small CPU: the signal lands inside one.
WIDE = {"layers": [{"name": "fc", "ternary_linear": {"in_features": 1024,
                                                     "out_features": 1024}}]}


class CliRestartTest(unittest.TestCase):
    """The CLI (the C++ client's retries) across a restart of the server."""

    def setUp(self):
        if not os.path.exists(CLI):
            self.skipTest(f"no tscale CLI at {CLI}")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        checkpoints = tempfile.TemporaryDirectory()
        self.addCleanup(checkpoints.cleanup)
        # No grace: the step computing at SIGTERM is refused (UNAVAILABLE, nothing applied).
        self.server = ServerProcess("--listen", self.address, "--checkpoint-dir",
                                    checkpoints.name, "--shutdown-grace-seconds", "0")
        self.server.start()
        self.addCleanup(self.server.remove_logs)
        self.addCleanup(self.server.kill)
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(WIDE, f)
        self.addCleanup(os.unlink, f.name)
        r = subprocess.run([CLI, "--server", self.address, "create", "m", "--spec", f.name],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)

    def train(self, steps, *options):
        return subprocess.Popen([CLI, "--server", self.address, *options, "train", "m", "--steps",
                                 str(steps), "--batch", "512"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def wait_for_step(self, step, proc):
        """Until the model has reached `step` (60 s at most)."""
        with tscale.Client(self.address, timeout=10, retries=0) as c:
            deadline = time.monotonic() + 60
            while c.get_model("m").step < step and time.monotonic() < deadline:
                self.assertIsNone(proc.poll(), "train ended early")
                time.sleep(0.02)
            self.assertGreaterEqual(c.get_model("m").step, step)

    def step_now(self):
        with tscale.Client(self.address, timeout=10, retries=0) as c:
            return c.get_model("m").step

    def test_train_rides_through_a_restart(self):
        proc = self.train(30, "--retry-seconds", "60")
        try:
            self.wait_for_step(5, proc)
            self.assertEqual(self.server.stop(timeout=120), 0, self.server.log())
            time.sleep(1.0)  # down for a while: the CLI retries meanwhile
            self.server.start()
            out, err = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        self.assertEqual(proc.returncode, 0, err)
        self.assertRegex(err, r"attempt \d+ failed \(UNAVAILABLE\); retrying in")
        # Every one of the 30 steps applied once: none lost, none twice.
        self.assertIn("trained m: 30 steps (step 0 -> 30)", out)
        self.assertEqual(self.step_now(), 30)

    def test_train_says_the_last_step_applied_when_it_stops(self):
        proc = self.train(30, "--retry-seconds", "1")
        try:
            self.wait_for_step(3, proc)
            self.assertEqual(self.server.stop(timeout=120), 0, self.server.log())
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        self.assertEqual(proc.returncode, 1, err)
        self.server.start()
        step = self.step_now()  # what the server had applied, from its checkpoint
        self.assertIn(f"train: stopped after {step} of 30 steps: the last step applied brought m "
                      f"to step {step}; the failed one (expected_step {step}) was not applied",
                      err)
        self.assertIn("tscale: train: UNAVAILABLE: ", err)


if __name__ == "__main__":
    unittest.main()
