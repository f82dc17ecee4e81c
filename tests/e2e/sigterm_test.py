"""SIGTERM: the server stops accepting, finishes what is in flight, and exits 0; a call still
running when the shutdown grace ends is refused with UNAVAILABLE, nothing applied (not
CANCELLED), so that the clients' retries carry it over to the restarted server."""

import socket
import tempfile
import threading
import time
import unittest

import grpc
import numpy as np

import tscale
from server_process import ServerProcess

# One slow request: a TrainStep on a 4096x4096 layer at batch 1024 (about 70 GFLOP of forward
# and weight gradient; seconds on a small CPU).
FEATURES = 4096
BATCH = 1024
SPEC = {"layers": [{"name": "big", "ternary_linear": {"in_features": FEATURES,
                                                      "out_features": FEATURES}}]}
EXIT_BOUND_S = 120.0


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Small requests, a step of some length: 8 features in and out, 2048 hidden.
SPEC_QUEUED = {"layers": [
    {"name": "fc1", "ternary_linear": {"in_features": 8, "out_features": 2048}},
    {"name": "act", "activation": {"kind": "RELU"}},
    {"name": "fc2", "ternary_linear": {"in_features": 2048, "out_features": 2048}},
    {"name": "act2", "activation": {"kind": "RELU"}},
    {"name": "fc3", "ternary_linear": {"in_features": 2048, "out_features": 8}},
]}


class SigtermTest(unittest.TestCase):

    def setUp(self):
        self.server = ServerProcess().start()
        self.addCleanup(self.server.kill)

    def test_in_flight_request_completes(self):
        x = np.random.RandomState(0).randn(BATCH, FEATURES).astype(np.float32)
        target = np.zeros((BATCH, FEATURES), np.float32)
        with self.server.client(timeout=300, retries=0) as client:
            client.create_model("slow", SPEC, seed=1)
            # Warm up and measure one step, to send the signal well inside the next one.
            t0 = time.monotonic()
            client.train_step("slow", x, target, expected_step=0)
            one_step = time.monotonic() - t0

            result, error = {}, {}

            def slow_call():
                try:
                    result["r"] = client.train_step("slow", x, target, expected_step=1)
                except Exception as e:  # reported below
                    error["e"] = e
                result["done"] = time.monotonic()

            thread = threading.Thread(target=slow_call)
            started = time.monotonic()
            thread.start()
            # The request (32 MiB) must have reached the server; then signal mid-computation.
            time.sleep(min(max(0.3 * one_step, 0.2), 2.0))
            signalled = time.monotonic()
            self.server.terminate()

            # While it drains, the server takes no new connection: a call on a new one fails with
            # UNAVAILABLE. (Right after the signal it may still answer health, NOT_SERVING.) A probe
            # whose connection was accepted just before the listener closed may instead see its
            # call cancelled by gRPC's shutdown (CANCELLED); only one probe can straddle that
            # moment, so the next one, on a connection made after it, must be refused.
            refusals = []
            while thread.is_alive() and not (
                    refusals and refusals[-1].code == grpc.StatusCode.UNAVAILABLE):
                with tscale.Client(self.server.address, timeout=5, retries=0,
                                   options=[("grpc.use_local_subchannel_pool", 1)]) as fresh:
                    try:
                        fresh.health()  # answered: the signal is not handled yet, or just
                    except tscale.Error as e:
                        refusals.append(e)
                time.sleep(0.02)
            codes = [e.code for e in refusals]
            described = [f"{e.code.name}: {e.message}" for e in refusals]
            self.assertLessEqual(codes.count(grpc.StatusCode.CANCELLED), 1, described)
            self.assertTrue(set(codes) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED},
                            described)

            thread.join(timeout=EXIT_BOUND_S)
            self.assertFalse(thread.is_alive(), "the in-flight TrainStep never returned")
            self.assertNotIn("e", error, f"in-flight TrainStep failed: {error.get('e')}\n"
                                         f"server log:\n{self.server.log()}")
            self.assertEqual(result["r"].step, 2)
            self.assertFalse(result["r"].replayed)
            self.assertGreater(result["done"], signalled,
                               f"the request finished before the signal (one step took "
                               f"{one_step:.2f}s, signalled after {signalled - started:.2f}s)")

            status = self.server.wait(timeout=EXIT_BOUND_S)
            self.assertEqual(status, 0, self.server.log())

            # Afterwards: nothing listens.
            with self.assertRaises(tscale.Error) as cm:
                client.get_model("slow")
            self.assertEqual(cm.exception.code, grpc.StatusCode.UNAVAILABLE)

    def test_idle_server_exits_zero(self):
        with self.server.client(retries=0) as client:
            self.assertEqual(client.health(), "SERVING")
        started = time.monotonic()
        self.assertEqual(self.server.stop(timeout=EXIT_BOUND_S), 0, self.server.log())
        self.assertLess(time.monotonic() - started, 30.0)


class GraceOverTest(unittest.TestCase):
    """--shutdown-grace-seconds 0: calls that have not applied when SIGTERM comes are refused
    with UNAVAILABLE ("nothing was applied"), never CANCELLED; the server restarted on the same
    port from its checkpoints holds each model at the step its answer said, and the refused
    requests then apply once.

    The server runs requests on one worker thread, so TrainSteps of many models sent at once run
    one after another: when the first is answered the others are still queued, whatever the
    machine's speed, and SIGTERM comes then. The requests are small, so that by then the server
    has received them all (a call still arriving at shutdown is cancelled by gRPC itself)."""

    def test_calls_refused_at_shutdown_are_unavailable_and_apply_nothing(self):
        port = free_port()
        checkpoints = tempfile.TemporaryDirectory()
        self.addCleanup(checkpoints.cleanup)
        server = ServerProcess("--listen", f"127.0.0.1:{port}", "--checkpoint-dir",
                               checkpoints.name, "--shutdown-grace-seconds", "0",
                               "--worker-threads", "1")
        server.start()
        self.addCleanup(server.remove_logs)
        self.addCleanup(server.kill)
        models = [f"m{i}" for i in range(16)]
        rng = np.random.RandomState(3)
        x = rng.randn(512, 8).astype(np.float32)
        target = np.zeros((512, 8), np.float32)
        results = {}
        answered = threading.Event()
        with server.client(timeout=300, retries=0) as client:
            for m in models:
                client.create_model(m, SPEC_QUEUED, seed=2)

            def call(model_id):
                try:
                    results[model_id] = client.train_step(model_id, x, target, expected_step=0)
                except tscale.Error as e:
                    results[model_id] = e
                answered.set()
            threads = [threading.Thread(target=call, args=(m,)) for m in models]
            for t in threads:
                t.start()
            self.assertTrue(answered.wait(300), "no TrainStep was answered in 300 s")
            server.terminate()
            for t in threads:
                t.join(timeout=EXIT_BOUND_S)
                self.assertFalse(t.is_alive(), "a TrainStep never returned")
        self.assertEqual(server.wait(timeout=EXIT_BOUND_S), 0, server.log())
        refused = [m for m in models if isinstance(results[m], tscale.Error)]
        for m in refused:
            e = results[m]
            self.assertEqual(e.code, grpc.StatusCode.UNAVAILABLE,
                             f"{m}: {e.code.name}: {e.message}\n{server.log()}")
            self.assertIn("nothing was applied", e.message)
            self.assertNotIn("may have been applied", e.message)
        self.assertTrue(refused, "every TrainStep finished before the signal")
        print(f"\nsigterm_test: {len(refused)} of {len(models)} queued TrainSteps refused at "
              f"SIGTERM with UNAVAILABLE, the rest applied")

        server.start()  # the same port, the same checkpoints
        with server.client(timeout=300, retries=0) as client:
            for m in models:
                want = 0 if m in refused else 1
                self.assertEqual(client.get_model(m).step, want, m)
            for m in refused:
                r = client.train_step(m, x, target, expected_step=0)
                self.assertEqual((r.step, r.replayed), (1, False), m)
        self.assertEqual(server.stop(timeout=EXIT_BOUND_S), 0, server.log())


if __name__ == "__main__":
    unittest.main()
