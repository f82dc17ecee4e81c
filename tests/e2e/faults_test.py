"""Faults around the real tscale-server binary: client processes killed in the middle of
ImportState and ExportState streams, checkpoint writes that fail (a file-size limit standing in
for a full disk, a read-only folder), and the server killed with SIGKILL in the middle of
requests.

- A client killed mid-stream: the server stays up, nothing of the import is kept (the id stays
  free), the exported model is unchanged, and the next import and export work.
- A failing checkpoint write: SaveCheckpoint fails with a clear status naming the file, no
  temporary file is left, the previous checkpoint stays valid (its CRC checks, RestoreCheckpoint
  loads it), training goes on, and a later save succeeds once writes work again.
- SIGKILL with a large TrainStep and an ImportState in flight: a restart on the same
  --checkpoint-dir restores the last checkpoint, exactly (step and every tensor).
  (checkpoint_crash_test kills the server during saves; this kills it during other requests,
  with steps applied after the last checkpoint.)
"""

import os
import resource
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unittest

import grpc
import numpy as np

import tscale
from tscale import safetensors
from server_process import ServerProcess

SPEC_BIG = {"layers": [{"name": "fc", "ternary_linear": {"in_features": 1024,
                                                         "out_features": 1024,
                                                         "group_size": 1}}]}


def train(client, model_id, steps, batch=8, features=1024, seed=0):
    rng = np.random.default_rng(seed)
    step = client.get_model(model_id).step
    for _ in range(steps):
        x = rng.standard_normal((batch, features)).astype(np.float32)
        y = rng.integers(0, 10, batch)
        r = client.train_step(model_id, x, y, loss="cross_entropy", expected_step=step)
        assert r.step == step + 1 and not r.replayed, r
        step = r.step
    return step


def crc_ok(path):
    with open(path, "rb") as f:
        data = f.read()
    meta = safetensors.read_metadata(data)
    return meta.get("crc32c") == safetensors.crc32c_hex(safetensors.data_section(data))


# A client in a process of its own, killed by the test in the middle of its stream.
_CHILD = textwrap.dedent("""
    import sys, time
    import grpc
    from tscale.v1 import trainer_pb2, trainer_pb2_grpc
    address, what, model_id, path = sys.argv[1:5]
    channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1),
                                                      ("grpc.max_receive_message_length", -1)])
    stub = trainer_pb2_grpc.TernaryTrainerStub(channel)
    if what == "import":
        data = open(path, "rb").read()
        def requests():
            yield trainer_pb2.ImportStateRequest(
                header=trainer_pb2.ImportHeader(model_id=model_id))
            for i, off in enumerate(range(0, len(data), 256 << 10)):
                yield trainer_pb2.ImportStateRequest(data=data[off:off + (256 << 10)])
                print("sent", i, flush=True)
                time.sleep(0.05)
            print("all sent", flush=True)
            time.sleep(3600)   # never ends the stream
        stub.ImportState(requests())
    else:
        stream = stub.ExportState(trainer_pb2.ExportStateRequest(model_id=model_id))
        next(stream)
        print("got a chunk", flush=True)
        time.sleep(3600)       # never reads the rest
""")


class ClientKilledMidStreamTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.server = ServerProcess().start()
        cls.client = cls.server.client()
        cls.client.create_model("big", SPEC_BIG, seed=1)
        train(cls.client, "big", 2)
        cls.state = cls.client.export_state("big")
        assert len(cls.state) > 8 << 20
        cls.dir = tempfile.TemporaryDirectory(prefix="tscale-faults-")
        cls.path = os.path.join(cls.dir.name, "big.safetensors")
        with open(cls.path, "wb") as f:
            f.write(cls.state)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        status = cls.server.stop()
        cls.dir.cleanup()
        if status != 0:
            raise AssertionError(f"tscale-server exited with {status}; its log:\n"
                                 f"{cls.server.log()}")
        cls.server.remove_logs()

    def kill_child_after(self, what, model_id, line):
        """Runs the child client and kills it (SIGKILL) once it printed a line starting with
        `line`; returns the lines it printed."""
        child = subprocess.Popen([sys.executable, "-c", _CHILD, self.server.address, what,
                                  model_id, self.path],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                out = child.stdout.readline()
                if not out:
                    break
                lines.append(out.strip())
                if out.startswith(line):
                    break
        finally:
            child.kill()
            child.wait()
            child.stdout.close()
        self.assertTrue(any(l.startswith(line) for l in lines), f"the child printed {lines}")
        return lines

    def assert_intact(self, model_id):
        self.assertEqual(self.client.health(), "SERVING")
        with self.assertRaises(tscale.Error) as e:
            self.client.get_model(model_id)
        self.assertEqual(e.exception.code, grpc.StatusCode.NOT_FOUND,
                         f"a killed client's import left a model {model_id!r}")
        self.assertEqual([m.model_id for m in self.client.list_models()], ["big"])
        self.assertEqual(self.client.export_state("big"), self.state)
        info = self.client.import_state(model_id, self.state)
        self.assertEqual(info.step, 2)
        self.assertEqual(self.client.export_state(model_id)[-1000:], self.state[-1000:])
        self.client.delete_model(model_id)

    def test_import_client_killed_after_part_of_the_file(self):
        for chunk in (0, 5, 20):
            self.kill_child_after("import", "half", f"sent {chunk}")
            self.assert_intact("half")

    def test_import_client_killed_after_the_whole_file(self):
        # The whole file went out but the stream never ended: the client is gone, so nothing
        # may be imported.
        self.kill_child_after("import", "whole", "all sent")
        time.sleep(0.5)
        self.assert_intact("whole")

    def test_export_client_killed_after_one_chunk(self):
        for _ in range(3):
            self.kill_child_after("export", "big", "got a chunk")
            self.assert_intact("copy")


class CheckpointWriteErrorTest(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.TemporaryDirectory(prefix="tscale-faults-")
        # The server itself ignores SIGXFSZ: past RLIMIT_FSIZE, write() fails with EFBIG and the
        # save fails, instead of the signal killing the process.
        self.server = ServerProcess(
            "--checkpoint-dir", self.dir.name, "--checkpoint-on-shutdown", "false")
        self.server.start()
        self.client = self.server.client()
        self.client.create_model("m", SPEC_BIG, seed=3)
        self.model_dir = os.path.join(self.dir.name, "m")

    def tearDown(self):
        self.client.close()
        status = self.server.stop()
        self.dir.cleanup()
        self.assertEqual(status, 0, f"tscale-server exited with {status}; its log:\n"
                                    f"{self.server.log()}")
        self.server.remove_logs()

    def files(self):
        return sorted(os.listdir(self.model_dir))

    def check_failed_save(self, step, want_in_message, want_code):
        with self.assertRaises(tscale.Error) as e:
            self.client.save_checkpoint("m")
        err = e.exception
        self.assertEqual(err.code, want_code, err)
        self.assertIn(self.model_dir, err.message)
        self.assertIn(f"step-{step:08d}", err.message)
        self.assertIn(want_in_message, err.message)
        # No temporary file, no file of the failed step; the previous one is intact.
        self.assertEqual(self.files(), ["step-00000002.safetensors"])
        self.assertTrue(crc_ok(os.path.join(self.model_dir, "step-00000002.safetensors")))
        self.assertEqual([c.name for c in self.client.list_checkpoints("m")], ["step-00000002"])
        return err

    def saved_then_failing(self, break_writes, restore_writes, want_in_message, want_code):
        train(self.client, "m", 2)
        saved = self.client.save_checkpoint("m")
        self.assertEqual(saved.step, 2)
        state2 = self.client.export_state("m")
        train(self.client, "m", 1, seed=1)
        break_writes()
        try:
            err = self.check_failed_save(3, want_in_message, want_code)
            print(f"checkpoint write error: {err.code.name}: {err.message}")
            # Training goes on meanwhile, and a second save fails the same way.
            self.assertEqual(train(self.client, "m", 2, seed=2), 5)
            self.check_failed_save(5, want_in_message, want_code)
        finally:
            restore_writes()
        # Writes work again: the next save succeeds, beside the old one.
        self.assertEqual(self.client.save_checkpoint("m").step, 5)
        self.assertEqual(self.files(), ["step-00000002.safetensors", "step-00000005.safetensors"])
        self.assertTrue(crc_ok(os.path.join(self.model_dir, "step-00000005.safetensors")))
        # The old checkpoint still loads, exactly (discarding the later one, as asked).
        info = self.client.restore_checkpoint("m", "step-00000002", discard_newer=True)
        self.assertEqual(info.step, 2)
        self.assertEqual(self.client.export_state("m"), state2)
        self.assertEqual(train(self.client, "m", 1), 3)

    def test_file_size_limit(self):
        # A full disk as the server sees it: write() fails (EFBIG) part way through the file.
        pid = self.server.pid
        limit = 64 << 10   # the checkpoint is ~9 MiB
        self.saved_then_failing(
            lambda: resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY)),
            lambda: resource.prlimit(pid, resource.RLIMIT_FSIZE,
                                     (resource.RLIM_INFINITY, resource.RLIM_INFINITY)),
            os.strerror(27),   # EFBIG: "File too large": out of room, like a full disk
            grpc.StatusCode.RESOURCE_EXHAUSTED)

    def test_read_only_folder(self):
        if os.geteuid() == 0:
            self.skipTest("running as root, whom a read-only folder does not stop; "
                          "test_file_size_limit covers the failing write")
        self.saved_then_failing(
            lambda: os.chmod(self.model_dir, 0o555),
            lambda: os.chmod(self.model_dir, 0o755),
            os.strerror(13),   # EACCES: not a lack of room
            grpc.StatusCode.INTERNAL)


class KilledMidRequestTest(unittest.TestCase):

    def kill_in_flight(self, server, batch, features, import_state):
        """Starts a TrainStep of `batch` rows on "big" and a slow ImportState of a new model,
        kills the server with SIGKILL half a second later, and returns how each call ended."""
        outcome = {}
        x = np.random.default_rng(batch).standard_normal((batch, features)).astype(np.float32)
        y = np.arange(batch) % features
        with server.client() as c:
            step = c.get_model("big").step

        def big_step():
            with server.client(retries=0) as c:
                try:
                    c.train_step("big", x, y, loss="cross_entropy", expected_step=step)
                    outcome["train"] = "ok"
                except tscale.Error as e:
                    outcome["train"] = e.code

        def slow_import():
            with server.client(retries=0) as c:
                def chunks():
                    yield tscale.trainer_pb2.ImportStateRequest(
                        header=tscale.trainer_pb2.ImportHeader(model_id="incoming"))
                    for off in range(0, len(import_state), 1 << 20):
                        yield tscale.trainer_pb2.ImportStateRequest(
                            data=import_state[off:off + (1 << 20)])
                        time.sleep(0.5)
                try:
                    c._stub.ImportState(chunks(), timeout=60)
                    outcome["import"] = "ok"
                except grpc.RpcError as e:
                    outcome["import"] = e.code()

        threads = [threading.Thread(target=big_step), threading.Thread(target=slow_import)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        self.assertEqual(server.sigkill(), -signal.SIGKILL)
        for t in threads:
            t.join(120)
        self.assertEqual(outcome.get("import"), grpc.StatusCode.UNAVAILABLE, outcome)
        return outcome

    def assert_restored(self, server, saved):
        """Every model is back at its checkpoint, exactly, and nothing else is there."""
        log = server.checkpoint_log()
        self.assertEqual(log.skipped, [])
        self.assertEqual({m: s for m, (_, s) in log.restored.items()}, {"big": 2, "small": 1})
        with server.client() as c:
            self.assertEqual(sorted(m.model_id for m in c.list_models()), ["big", "small"])
            for m, step in (("big", 2), ("small", 1)):
                self.assertEqual(c.get_model(m).step, step)
                got, _ = safetensors.loads(c.export_state(m))
                want, _ = safetensors.loads(saved[m])
                self.assertEqual(sorted(got), sorted(want))
                for name in want:
                    np.testing.assert_array_equal(got[name], want[name], err_msg=name)

    def test_restart_restores_the_last_checkpoint(self):
        with tempfile.TemporaryDirectory(prefix="tscale-faults-") as ckpt:
            features = 2048
            spec = {"layers": [{"name": "fc", "ternary_linear": {"in_features": features,
                                                                 "out_features": features}}]}
            server = ServerProcess("--checkpoint-dir", ckpt)
            server.start()
            try:
                with server.client() as c:
                    c.create_model("big", spec, seed=5)
                    c.create_model("small", SPEC_BIG, seed=6)
                    train(c, "big", 2, features=features)
                    train(c, "small", 1)
                    self.assertEqual(c.save_checkpoint("big").step, 2)
                    self.assertEqual(c.save_checkpoint("small").step, 1)
                    saved = {m: c.export_state(m) for m in ("big", "small")}
                    # Steps after the checkpoints, lost with the process.
                    train(c, "big", 1, features=features, seed=1)
                    train(c, "small", 2, seed=1)
                    small_state = c.export_state("small")

                # A TrainStep large enough to take a while, and an import, in flight at the kill.
                # Should the step end before the kill, the next attempt makes it twice as large.
                batch, cut = 4096, False
                for _ in range(3):
                    outcome = self.kill_in_flight(server, batch, features, small_state)
                    server.start()
                    self.assert_restored(server, saved)
                    if outcome.get("train") == grpc.StatusCode.UNAVAILABLE:
                        cut = True
                        break
                    batch *= 2
                self.assertTrue(cut, f"every TrainStep ended before the kill: {outcome}")
                print(f"killed with a TrainStep of batch {batch} and an import in flight; "
                      "restored both models at their checkpoints")
                with server.client() as c:
                    # Training goes on from the checkpoint.
                    self.assertEqual(train(c, "big", 1, features=features), 3)
                self.assertEqual(server.stop(), 0)
            finally:
                server.kill()
                server.remove_logs()


if __name__ == "__main__":
    unittest.main()
