"""The tscale CLI's train: no LibTorch in the CLI, and one line of advice when the loss stalls."""

import json
import os
import subprocess
import tempfile
import unittest

from server_process import SERVER_BIN, ServerTestCase

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


if __name__ == "__main__":
    unittest.main()
