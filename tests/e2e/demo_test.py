"""Smoke test of the demo: examples/train_digits.py for one epoch against a test server; and the
example's one line when the loss stops going down (a deep model whose outputs stay tiny)."""

import importlib.util
import os
import subprocess
import sys
import tempfile
import unittest

from server_process import REPO, ServerProcess

EXAMPLE = os.path.join(REPO, "client", "python", "examples", "train_digits.py")


def load_example():
    spec = importlib.util.spec_from_file_location("train_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_example(server, *args):
    return subprocess.run([sys.executable, EXAMPLE, "--server", server.address, *args],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300, env=dict(os.environ))


class DemoTest(unittest.TestCase):

    def test_train_digits_one_epoch(self):
        server = ServerProcess().start()
        try:
            with tempfile.TemporaryDirectory() as d:
                png = os.path.join(d, "digits.png")
                proc = subprocess.run(
                    [sys.executable, EXAMPLE, "--server", server.address, "--epochs", "1",
                     "--plot", png, "--model-id", "demo-smoke"],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
                    env=dict(os.environ))
                self.assertEqual(proc.returncode, 0, proc.stdout)
                self.assertIn("untrained", proc.stdout)
                self.assertIn("held-out accuracy: untrained", proc.stdout)
                with open(png, "rb") as f:
                    self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
                self.assertGreater(os.path.getsize(png), 10000)
            with server.client() as client:  # the example cleans up after itself
                self.assertEqual(client.list_models(), [])
        finally:
            status = server.stop()
        self.assertEqual(status, 0, server.log())

    def test_plateau_detector(self):
        """Plateau answers once, when the mean of the last N losses is not 1% below the mean of
        the N before them."""
        Plateau = load_example().Plateau
        learning = Plateau(steps=5)
        for i in range(100):  # 1% lower every step: the windows' means differ by 5%
            self.assertIsNone(learning.update(3.0 * 0.99 ** i), i)
        flat = Plateau(steps=5)
        for _ in range(9):
            self.assertIsNone(flat.update(2.0))
        self.assertEqual(flat.update(2.0), (2.0, 2.0))  # two windows of 5 steps
        for _ in range(20):
            self.assertIsNone(flat.update(2.0))  # said once
        noisy = Plateau(steps=5)
        answers = [noisy.update(2.0 + (0.5 if i % 2 else -0.5)) for i in range(10)]
        self.assertEqual(answers[:9], [None] * 9)
        self.assertIsNotNone(answers[9])  # the means agree within 1% though the steps do not
        never = Plateau(steps=0)
        self.assertEqual([never.update(1.0) for _ in range(10)], [None] * 10)

    def test_says_why_when_the_loss_does_not_move(self):
        """Four hidden layers: the outputs stay tiny, the loss stays near its untrained value, and
        the example says why in one line, and what to try."""
        server = ServerProcess().start()
        try:
            proc = run_example(server, "--layers", "4", "--hidden", "256", "--epochs", "10",
                               "--plateau-steps", "40", "--model-id", "deep")
        finally:
            status = server.stop()
        self.assertEqual(proc.returncode, 0, proc.stdout)
        self.assertEqual(status, 0, server.log())
        lines = [l for l in proc.stdout.splitlines() if l.startswith("plateau:")]
        self.assertEqual(len(lines), 1, proc.stdout)
        for words in ("over the last 40 steps", "too small", "more steps will not help",
                      "fewer --layers", "--group-size", "--hidden"):
            self.assertIn(words, lines[0])


if __name__ == "__main__":
    unittest.main()
