"""TrainStream through a real tscale-server: steps sent without waiting apply in order, each as a
TrainStep would (the same losses and state as unary TrainSteps), a failing step ends the stream
with its status and nothing after it applies, the window is a flag reported in ServerInfo, and a
client whose stream breaks (the server restarted from its checkpoints) resumes from the model's
step with no update lost or doubled."""

import os
import shutil
import socket
import tempfile
import threading
import time
import unittest

import grpc
import numpy as np

import tscale
from server_process import ErrorAssertions, ServerProcess

SPEC = {"layers": [
    {"name": "fc1", "ternary_linear": {"in_features": 16, "out_features": 32}},
    {"name": "act", "activation": {"kind": "RELU"}},
    {"name": "fc2", "ternary_linear": {"in_features": 32, "out_features": 8}},
]}


def batches(n, seed=0, rows=8):
    rng = np.random.RandomState(seed)
    return [(rng.randn(rows, 16).astype(np.float32), rng.randn(rows, 8).astype(np.float32))
            for _ in range(n)]


def tensors(state):
    """The tensors of a state file (its metadata names the model)."""
    return {k: v.tobytes() for k, v in tscale.safetensors.loads(state)[0].items()}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TrainStreamTest(ErrorAssertions, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = ServerProcess("--stream-window", "3").start()
        cls.client = cls.server.client()

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        cls.server.stop()
        cls.server.remove_logs()

    def test_steps_equal_unary_train_steps(self):
        self.client.create_model("s", SPEC, seed=4)
        self.client.create_model("u", SPEC, seed=4)
        data = batches(20)
        streamed = list(self.client.train_stream("s", data, expected_step=0))
        unary = [self.client.train_step("u", x, y, expected_step=k)
                 for k, (x, y) in enumerate(data)]
        self.assertEqual([r.step for r in streamed], list(range(1, 21)))
        self.assertEqual([r.loss for r in streamed], [r.loss for r in unary])
        self.assertEqual(tensors(self.client.export_state("s")),
                         tensors(self.client.export_state("u")))
        self.assertEqual(self.client.server_info().stream_window, 3)
        # expected_step left out: the model's step is read first.
        more = list(self.client.train_stream("s", batches(2, seed=1)))
        self.assertEqual([r.step for r in more], [21, 22])

    def test_a_failing_step_ends_the_stream_and_nothing_after_it_applies(self):
        self.client.create_model("f", SPEC, seed=5)
        data = batches(10)
        data[4] = (np.zeros((8, 15), np.float32), data[4][1])  # the wrong input width
        got = []
        with self.assertRaises(tscale.Error) as cm:
            for r in self.client.train_stream("f", data, expected_step=0):
                got.append(r.step)
        self.assertEqual(cm.exception.code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("input", cm.exception.message)
        self.assertIn("expected_step 4", cm.exception.message)
        self.assertEqual(got, [1, 2, 3, 4])
        self.assertEqual(self.client.get_model("f").step, 4)
        # A stale expected_step fails the same way as TrainStep's.
        with self.assertRaises(tscale.Error) as cm:
            list(self.client.train_stream("f", batches(1), expected_step=2))
        self.assertEqual(cm.exception.code, grpc.StatusCode.FAILED_PRECONDITION)
        self.assertEqual(self.client.get_model("f").step, 4)

    def test_the_window_flag_is_checked(self):
        with self.assertRaises(RuntimeError) as cm:
            ServerProcess("--stream-window", "0").start()
        self.assertIn("--stream-window: expected 1 to 1024 steps, got 0", str(cm.exception))


class ResumeTest(unittest.TestCase):
    def test_a_stream_resumes_after_a_server_restart(self):
        """The server is stopped (SIGTERM, a checkpoint every step) and started again on the
        same port while a client streams 40 steps: the client resumes from the model's step and
        the model ends at step 40, equal to 40 unary TrainSteps of the same batches."""
        folder = tempfile.mkdtemp(prefix="tscale-stream-")
        port = free_port()
        server = ServerProcess("--listen", f"127.0.0.1:{port}", "--checkpoint-dir", folder,
                               "--checkpoint-every-steps", "1").start()
        twin = ServerProcess().start()
        try:
            with server.client() as c:
                c.create_model("r", SPEC, seed=9)
            data = batches(40, seed=3)
            results = []
            restarted = threading.Event()

            def restart():
                server.stop()
                server.start()
                restarted.set()

            spanned = []

            def paced():  # slow enough that the restart falls inside the stream
                for k, item in enumerate(data):
                    if k == 10:
                        threading.Thread(target=restart).start()
                    if k >= 10:
                        time.sleep(0.15)
                    if k == len(data) - 1:
                        spanned.append(restarted.is_set())
                    yield item
            with tscale.Client(f"127.0.0.1:{port}", retry_seconds=60, timeout=60) as c:
                for r in c.train_stream("r", paced(), expected_step=0):
                    results.append(r)
                self.assertTrue(restarted.wait(60))
                self.assertEqual(spanned, [True], "the server was back only after the stream")
                self.assertEqual(c.get_model("r").step, 40)
                state = c.export_state("r")
            self.assertEqual([r.step for r in results], list(range(1, 41)))
            with twin.client() as t:
                t.create_model("r", SPEC, seed=9)
                for k, (x, y) in enumerate(data):
                    t.train_step("r", x, y, expected_step=k)
                self.assertEqual(tensors(t.export_state("r")), tensors(state))
            lost = sum(np.isnan(r.loss) for r in results)
            print(f"\nstream_test: 40 steps across a server restart: model at step 40, equal to "
                  f"40 unary steps; {lost} answers lost in the break (applied, loss unknown)")
        finally:
            for s in (server, twin):
                if s.running():
                    s.stop()
                s.remove_logs()
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    unittest.main()
