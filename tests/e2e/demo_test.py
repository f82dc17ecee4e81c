"""Smoke test of the demo: examples/train_digits.py for one epoch against a test server."""

import os
import subprocess
import sys
import tempfile
import unittest

from server_process import REPO, ServerProcess

EXAMPLE = os.path.join(REPO, "client", "python", "examples", "train_digits.py")


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


if __name__ == "__main__":
    unittest.main()
