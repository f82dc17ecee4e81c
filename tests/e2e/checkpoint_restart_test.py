"""Checkpoints across restarts of the real server (--checkpoint-dir and its policies).

- SIGTERM saves every model that changed since its last checkpoint (default on), including an
  update still running at the signal: after a restart each model is back at the same step with
  exactly the same tensors, and an unchanged model is not saved again; with
  --checkpoint-on-shutdown false only the explicit SaveCheckpoint survives.
- Policies: --checkpoint-every-steps with --checkpoint-keep (which files remain, and that each
  background save holds the state of its own step, also when it waits behind another model's
  save); --checkpoint-every-seconds (a changed model is saved, an idle one is not re-saved).
- Damage found at start (a flipped data byte, a truncated file, a wrong crc32c, a header whose
  offsets or shapes lie): the file is skipped and logged, the model comes back from the previous
  checkpoint, RestoreCheckpoint of the damaged file answers DATA_LOSS.
- Stale temporary files are removed and logged at start.
- RestoreCheckpoint into a loaded model (refused past a later checkpoint unless discard_newer,
  which removes it), as a new model (a branch, which keeps the source's checkpoints and survives
  a restart) and into a new one, its errors; FAILED_PRECONDITION without --checkpoint-dir.
- A deleted model stays deleted across a restart (its checkpoints go to the trash, its id is
  free), from_deleted takes it back, and expired trash is removed at start.
- The model ids "." and ".." (allowed by the id check) never reach files outside their folder.
"""

import json
import os
import shutil
import struct
import tempfile
import threading
import time
import unittest

import grpc
import numpy as np

import tscale
from tscale import safetensors
from server_process import ServerProcess

# A small MLP (fc1: 20 rows x 3 groups = 60 groups, an even count) and a one-layer model.
SPEC_MLP = {"layers": [
    {"name": "fc1", "ternary_linear": {"in_features": 24, "out_features": 20, "group_size": 8,
                                       "bias": True}},
    {"name": "act", "activation": {"kind": "RELU"}},
    {"name": "fc2", "ternary_linear": {"in_features": 20, "out_features": 6, "group_size": 8}},
]}
SPEC_ONE = {"layers": [
    {"name": "fc", "ternary_linear": {"in_features": 16, "out_features": 8, "group_size": 4}}]}
# Large state, cheap updates: its checkpoint (~37 MiB, mostly the int64 corr_accum of group
# size 1) takes far longer to write than an update of the small models.
SPEC_BIG = {"layers": [
    {"name": "fc", "ternary_linear": {"in_features": 2048, "out_features": 2048,
                                      "group_size": 1}}]}
# Slow updates from small requests: about 13 GFLOP at batch 512 for 16 KiB of input and as much
# of target, so that a request is received long before its update is done. Small files (group
# size 32: ~2 MiB).
SPEC_SLOW = {"layers": [
    {"name": "fc1", "ternary_linear": {"in_features": 8, "out_features": 2048}},
    {"name": "act1", "activation": {"kind": "RELU"}},
    {"name": "fc2", "ternary_linear": {"in_features": 2048, "out_features": 2048}},
    {"name": "act2", "activation": {"kind": "RELU"}},
    {"name": "fc3", "ternary_linear": {"in_features": 2048, "out_features": 8}}]}
SLOW_BATCH = 512
METADATA_KEYS = ("format", "spec", "step", "crc32c", "compute", "model_id", "server_version",
                 "created")
POLL_S = 0.05


def ckpt_name(step):
    return f"step-{step:08d}"


def batch_for(spec, step, seed=0):
    """The inputs and targets of the update that takes a model from `step` to step + 1."""
    n_in = spec["layers"][0]["ternary_linear"]["in_features"]
    n_out = spec["layers"][-1]["ternary_linear"]["out_features"]
    rng = np.random.RandomState(10_000 * seed + step)
    return (rng.randn(8, n_in).astype(np.float32), rng.randn(8, n_out).astype(np.float32))


class CheckpointTestCase(unittest.TestCase):
    """Fresh checkpoint folders and servers per test; all removed when the test passed."""

    def setUp(self):
        self._dirs, self._servers = [], []

    def failed(self):
        """Whether this test (or one of its subtests) has failed so far."""
        result = getattr(self._outcome, "result", None)
        for test, _ in list(getattr(result, "failures", [])) + list(getattr(result, "errors", [])):
            if test is self or getattr(test, "test_case", None) is self:
                return True
        return False

    def tearDown(self):
        passed = not self.failed()
        for server in self._servers:
            server.kill()
            if passed:
                server.remove_logs()
        for d in self._dirs:
            if passed:
                shutil.rmtree(d, ignore_errors=True)
        if not passed:
            print(f"kept for inspection: {self._dirs}, logs "
                  f"{[n for s in self._servers for n in s.log_names]}")

    def new_dir(self):
        d = tempfile.mkdtemp(prefix="tscale-ckpt-")
        self._dirs.append(d)
        return d

    def new_server(self, *flags):
        server = ServerProcess(*flags)
        self._servers.append(server)
        return server

    def stop(self, server):
        status = server.stop()
        self.assertEqual(status, 0, f"tscale-server exited with {status}; its log:\n"
                                    f"{server.log()}")

    # ------------------------------------------------------------ training and state

    def train(self, client, model_id, spec, steps, states=None, seed=0):
        """`steps` updates with train_step (recording each step's exported tensors in
        `states`); returns the model's step."""
        step = client.get_model(model_id).step
        for _ in range(steps):
            x, target = batch_for(spec, step, seed)
            r = client.train_step(model_id, x, target, expected_step=step)
            self.assertEqual(r.step, step + 1)
            step = r.step
            if states is not None:
                states[step] = self.exported(client, model_id)
        return step

    def train_passes(self, client, model_id, spec, steps, states=None, seed=0):
        """Like train, with Forward(train) / Backward / UpdateCorrelation."""
        step = client.get_model(model_id).step
        for _ in range(steps):
            x, target = batch_for(spec, step, seed)
            y, pass_id, s = client.forward(model_id, x, train=True)
            self.assertEqual(s, step)
            client.backward(model_id, pass_id, (y - target).astype(np.float32))
            step = client.update_correlation(model_id, expected_step=step).step
            if states is not None:
                states[step] = self.exported(client, model_id)
        return step

    def exported(self, client, model_id):
        return safetensors.loads(client.export_state(model_id))[0]

    def assert_tensors_equal(self, want, got, what):
        self.assertEqual(sorted(got), sorted(want), f"{what}: tensor names")
        for name, w in want.items():
            g = got[name]
            self.assertEqual((g.dtype, g.shape), (w.dtype, w.shape), f"{what}: {name}")
            np.testing.assert_array_equal(g, w, err_msg=f"{what}: {name}")

    # ------------------------------------------------------------ files

    def files(self, directory, model_id):
        """{name: (inode, size, mtime_ns)} of the model's folder (empty when it has none)."""
        folder = os.path.join(directory, model_id)
        if not os.path.isdir(folder):
            return {}
        out = {}
        for name in os.listdir(folder):
            st = os.stat(os.path.join(folder, name))
            out[name] = (st.st_ino, st.st_size, st.st_mtime_ns)
        return out

    def steps_on_disk(self, directory, model_id):
        return sorted(int(n[len("step-"):-len(".safetensors")])
                      for n in self.files(directory, model_id)
                      if n.startswith("step-") and n.endswith(".safetensors"))

    def check_file(self, directory, model_id, step, want=None, info=None):
        """The checkpoint file of `step`: its metadata, its CRC, and (given) its tensors and the
        CheckpointInfo that describes it."""
        path = os.path.join(directory, model_id, ckpt_name(step) + ".safetensors")
        with open(path, "rb") as f:
            data = f.read()
        tensors, md = safetensors.loads(data)
        for key in METADATA_KEYS:
            self.assertIn(key, md, f"{path}: metadata")
        self.assertEqual(md["format"], "tscale/1", path)
        self.assertEqual(md["step"], str(step), path)
        self.assertEqual(md["model_id"], model_id, path)
        json.loads(md["spec"])
        crc = safetensors.crc32c_hex(safetensors.data_section(data))
        self.assertEqual(md["crc32c"].lower(), crc, f"{path}: crc32c of the data section")
        if want is not None:
            self.assert_tensors_equal(want, tensors, path)
        if info is not None:
            self.assertEqual((info.model_id, info.name, info.step), (model_id, ckpt_name(step),
                                                                     step))
            self.assertEqual(info.bytes, len(data), path)
            self.assertEqual(info.crc32c.lower(), crc, path)
        return path

    def wait_for_steps(self, client, model_id, want, timeout):
        """Polls ListCheckpoints until its steps are `want`; returns the last list."""
        deadline = time.monotonic() + timeout
        got = None
        while True:
            try:
                got = [c.step for c in client.list_checkpoints(model_id)]
            except tscale.Error as e:
                if e.code != grpc.StatusCode.NOT_FOUND:
                    raise
                got = []
            if got == want or time.monotonic() > deadline:
                return got
            time.sleep(POLL_S)

    def assert_code(self, code, fn, *args, **kwargs):
        with self.assertRaises(tscale.Error) as cm:
            fn(*args, **kwargs)
        self.assertEqual(cm.exception.code, code, cm.exception.message)
        return cm.exception


# ---------------------------------------------------------------- SIGTERM

class ShutdownTest(CheckpointTestCase):

    def test_sigterm_loses_no_completed_update(self):
        d = self.new_dir()
        server = self.new_server("--checkpoint-dir", d).start()
        with server.client() as c:
            c.create_model("alpha", SPEC_MLP, seed=1)
            c.create_model("beta", SPEC_ONE, seed=2)
            self.train_passes(c, "alpha", SPEC_MLP, 1)
            c.save_checkpoint("alpha")      # an explicit save at step 1; then two more updates
            self.assertEqual(self.train_passes(c, "alpha", SPEC_MLP, 2), 3)
            self.assertEqual(self.train(c, "beta", SPEC_ONE, 5), 5)
            want = {m: self.exported(c, m) for m in ("alpha", "beta")}
        self.stop(server)
        self.assertEqual(self.steps_on_disk(d, "alpha"), [1, 3])
        self.assertEqual(self.steps_on_disk(d, "beta"), [5])
        self.check_file(d, "alpha", 3, want["alpha"])
        self.check_file(d, "beta", 5, want["beta"])

        server.start()
        log = server.checkpoint_log()
        self.assertEqual(log.skipped, [], log.text)
        self.assertEqual({m: s for m, (_, s) in log.restored.items()}, {"alpha": 3, "beta": 5},
                         log.text)
        self.assertTrue(log.before_listening, log.text)
        with server.client() as c:
            self.assertEqual({m.model_id: m.step for m in c.list_models()},
                             {"alpha": 3, "beta": 5})
            for m in ("alpha", "beta"):
                self.assert_tensors_equal(want[m], self.exported(c, m), f"{m} after restart")
            # The restored models train on.
            self.assertEqual(self.train(c, "beta", SPEC_ONE, 1), 6)
            self.assertEqual(self.train_passes(c, "alpha", SPEC_MLP, 1), 4)
            want = {m: self.exported(c, m) for m in ("alpha", "beta")}
        self.stop(server)
        self.assertEqual(self.steps_on_disk(d, "alpha"), [1, 3, 4])
        self.assertEqual(self.steps_on_disk(d, "beta"), [5, 6])

        # A restart, then SIGTERM with no update: nothing is written again.
        server.start()
        with server.client() as c:
            for m in ("alpha", "beta"):
                self.assert_tensors_equal(want[m], self.exported(c, m), f"{m} after restart 2")
        files = {m: self.files(d, m) for m in ("alpha", "beta")}
        self.stop(server)
        self.assertEqual({m: self.files(d, m) for m in ("alpha", "beta")}, files,
                         "SIGTERM re-saved models whose step did not change")

    def test_sigterm_saves_the_update_in_flight(self):
        """Updates still running when SIGTERM comes complete, and the shutdown save holds them.

        The server runs requests on one worker thread, so the updates of several models, sent at
        once, run one after another: when the first is answered the others are still queued or
        running, each taking as long as the first, whatever the machine's speed. SIGTERM comes
        then. The requests are small (SPEC_SLOW), so that by then the server has received them
        all: a call still arriving when the server shuts down is cancelled, not run."""
        d = self.new_dir()
        server = self.new_server("--checkpoint-dir", d, "--worker-threads", "1").start()
        models = [f"slow{i}" for i in range(6)]
        x = np.random.RandomState(20).randn(SLOW_BATCH, 8).astype(np.float32)
        target = np.zeros((SLOW_BATCH, 8), np.float32)
        with server.client(retries=0) as c:
            for m in models:
                c.create_model(m, SPEC_SLOW, seed=16)
            results, done = {}, {}
            answered = threading.Event()

            def in_flight(model_id):
                try:
                    results[model_id] = c.train_step(model_id, x, target, expected_step=0)
                except tscale.Error as e:
                    results[model_id] = e
                done[model_id] = time.monotonic()
                answered.set()

            threads = [threading.Thread(target=in_flight, args=(m,)) for m in models]
            for thread in threads:
                thread.start()
            self.assertTrue(answered.wait(300), "no update was answered in 300 s")
            signalled = time.monotonic()
            server.terminate()
            for thread in threads:
                thread.join(timeout=300)
                self.assertFalse(thread.is_alive())
            for m in models:
                self.assertNotIsInstance(results[m], tscale.Error, f"{m}: {results[m]}\n"
                                                                   f"{server.log()}")
                self.assertEqual(results[m].step, 1, m)
            self.assertGreater(max(done.values()), signalled,
                               "every update finished before the signal")
        self.assertEqual(server.wait(120), 0, server.log())
        server.stop()
        for m in models:
            self.assertEqual(self.steps_on_disk(d, m), [1], f"{m}\n{server.log()}")

        server.start()
        with server.client() as c:
            c.create_model("twin", SPEC_SLOW, seed=16)
            c.train_step("twin", x, target, expected_step=0)
            twin = self.exported(c, "twin")
            for m in models:
                self.assertEqual(c.get_model(m).step, 1, m)
                self.assert_tensors_equal(twin, self.exported(c, m),
                                          f"{m} restored after the update in flight at SIGTERM")
            c.delete_model("twin")
        self.stop(server)

    def test_no_save_on_shutdown_when_off(self):
        d = self.new_dir()
        server = self.new_server("--checkpoint-dir", d, "--checkpoint-on-shutdown",
                                 "false").start()
        states = {}
        with server.client() as c:
            c.create_model("m", SPEC_ONE, seed=3)
            c.create_model("unsaved", SPEC_ONE, seed=4)
            self.train(c, "m", SPEC_ONE, 2, states)
            info = c.save_checkpoint("m")
            self.check_file(d, "m", 2, states[2], info)
            self.assertEqual(self.train(c, "m", SPEC_ONE, 2), 4)
            self.train(c, "unsaved", SPEC_ONE, 1)
        self.stop(server)
        self.assertEqual(self.steps_on_disk(d, "m"), [2])
        self.assertEqual(self.steps_on_disk(d, "unsaved"), [])

        server.start()
        log = server.checkpoint_log()
        self.assertEqual({m: s for m, (_, s) in log.restored.items()}, {"m": 2}, log.text)
        with server.client() as c:
            self.assertEqual(c.get_model("m").step, 2)
            self.assert_tensors_equal(states[2], self.exported(c, "m"), "m after restart")
            self.assert_code(grpc.StatusCode.NOT_FOUND, c.get_model, "unsaved")
        self.stop(server)


# ---------------------------------------------------------------- automatic policies

class PolicyTest(CheckpointTestCase):

    def test_every_steps_with_keep(self):
        d = self.new_dir()
        server = self.new_server("--checkpoint-dir", d, "--checkpoint-every-steps", "3",
                                 "--checkpoint-keep", "2", "--checkpoint-on-shutdown",
                                 "false").start()
        with server.client() as c:
            c.create_model("m", SPEC_MLP, seed=5)
            # Ten updates back to back: each background save must hold the state of the step
            # that triggered it, however far training has gone on meanwhile.
            self.assertEqual(self.train(c, "m", SPEC_MLP, 10), 10)
            got = self.wait_for_steps(c, "m", [6, 9], timeout=10.0)
            self.assertEqual(got, [6, 9], "checkpoints after 10 updates with "
                                          "--checkpoint-every-steps 3 --checkpoint-keep 2")
            time.sleep(0.5)
            self.assertEqual(sorted(self.files(d, "m")),
                             ["step-00000006.safetensors", "step-00000009.safetensors"],
                             "the folder holds exactly the two newest checkpoints")
            # The same model again (same seed, same inputs) gives each step's state.
            states = {}
            c.create_model("twin", SPEC_MLP, seed=5)
            self.train(c, "twin", SPEC_MLP, 10, states)
            self.assert_tensors_equal(states[10], self.exported(c, "m"), "twin at step 10")
            listed = c.list_checkpoints("m")
            self.assertEqual([i.step for i in listed], [6, 9])
            for info in listed:
                self.check_file(d, "m", info.step, states[info.step], info)
        self.stop(server)

    def test_every_steps_while_another_model_saves(self):
        """The background saves of one model may wait behind another model's save; each must
        still be a checkpoint of the step that triggered it (3, 6, 9), not of whatever step the
        model has reached when its turn comes."""
        d = self.new_dir()
        server = self.new_server("--checkpoint-dir", d, "--checkpoint-every-steps", "3",
                                 "--checkpoint-keep", "0", "--checkpoint-on-shutdown",
                                 "false").start()
        with server.client() as c:
            c.create_model("big", SPEC_BIG, seed=14)
            c.create_model("m", SPEC_ONE, seed=15)
            self.assertEqual(self.train(c, "big", SPEC_BIG, 3), 3)  # a ~37 MiB save starts
            self.assertEqual(self.train(c, "m", SPEC_ONE, 10), 10)
            self.assertEqual(self.wait_for_steps(c, "big", [3], timeout=20.0), [3])
            got = self.wait_for_steps(c, "m", [3, 6, 9], timeout=10.0)
            self.assertEqual(got, [3, 6, 9], "checkpoints of a model trained 10 steps with "
                                             "--checkpoint-every-steps 3 while another model's "
                                             "save was under way")
            states = {}
            c.create_model("twin", SPEC_ONE, seed=15)
            self.train(c, "twin", SPEC_ONE, 10, states)
            for info in c.list_checkpoints("m"):
                self.check_file(d, "m", info.step, states[info.step], info)
        self.stop(server)

    def test_every_seconds(self):
        d = self.new_dir()
        server = self.new_server("--checkpoint-dir", d, "--checkpoint-every-seconds", "1",
                                 "--checkpoint-on-shutdown", "false").start()
        states = {}
        with server.client() as c:
            c.create_model("m", SPEC_ONE, seed=6)
            self.assertEqual(self.train(c, "m", SPEC_ONE, 4, states), 4)
            trained = time.monotonic()
            deadline = trained + 3.5
            newest = None
            while time.monotonic() < deadline:
                steps = self.steps_on_disk(d, "m")
                newest = steps[-1] if steps else None
                if newest == 4:
                    break
                time.sleep(POLL_S)
            self.assertEqual(newest, 4, f"no checkpoint of step 4 within 3.5 s of the last "
                                        f"update: {self.steps_on_disk(d, 'm')}")
            print(f"every-seconds 1: checkpoint of the latest step after "
                  f"{time.monotonic() - trained:.2f} s", flush=True)
            time.sleep(0.3)  # let a save already under way finish
            listed = c.list_checkpoints("m")
            self.assertEqual(listed[-1].step, 4)
            self.check_file(d, "m", 4, states[4], listed[-1])
            before = self.files(d, "m")
            time.sleep(2.2)
            self.assertEqual(self.files(d, "m"), before, "an idle model was saved again")
            self.assertEqual([i.step for i in c.list_checkpoints("m")],
                             [i.step for i in listed])
            # A new update is saved again within the period.
            self.assertEqual(self.train(c, "m", SPEC_ONE, 1, states), 5)
            got = self.wait_for_steps(c, "m", [i.step for i in listed] + [5], timeout=3.5)
            self.assertEqual(got[-1:], [5])
        self.stop(server)


# ---------------------------------------------------------------- damage and stale files

def rewrite_header(data, edit):
    """The file with its JSON header edited by edit(header_dict), re-serialised and padded with
    spaces to the original header length (so the data section stays where it was)."""
    (n,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(data[8:8 + n].decode("utf-8"))
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    if len(text) > n:
        raise AssertionError(f"edited header has {len(text)} bytes, more than the {n} it had")
    return data[:8] + text + b" " * (n - len(text)) + data[8 + n:]


def damage_flip_data_byte(data):
    (n,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(data[8:8 + n].decode("utf-8"))
    begin, end = header["fc1.corr_accum"]["data_offsets"]
    pos = 8 + n + (begin + end) // 2
    out = bytearray(data)
    out[pos] ^= 0x10
    return bytes(out)


def damage_truncate(data):
    (n,) = struct.unpack_from("<Q", data, 0)
    return data[:8 + n + (len(data) - 8 - n) // 2]


def damage_wrong_crc(data):
    def edit(h):
        crc = h["__metadata__"]["crc32c"]
        h["__metadata__"]["crc32c"] = f"{int(crc, 16) ^ 0x5a5a5a5a:08x}"
    return rewrite_header(data, edit)


def damage_header_offsets(data):
    """fc1.corr_accum claims 8 bytes fewer than its shape needs (a hole before the next)."""
    def edit(h):
        h["fc1.corr_accum"]["data_offsets"][1] -= 8
    return rewrite_header(data, edit)


def damage_header_shape(data):
    """fc1.E's shape [60] becomes [30, 2]: the same bytes, so parse and CRC pass; the state does
    not fit the spec (the reference's load_state_dict refuses it too)."""
    def edit(h):
        (g,) = h["fc1.E"]["shape"]
        h["fc1.E"]["shape"] = [g // 2, 2]
    return rewrite_header(data, edit)


class DamageTest(CheckpointTestCase):

    def run_damage(self, damage):
        d = self.new_dir()
        flags = ("--checkpoint-dir", d, "--checkpoint-on-shutdown", "false")
        server = self.new_server(*flags).start()
        states = {}
        with server.client() as c:
            c.create_model("m", SPEC_MLP, seed=7)
            for step in (1, 2, 3):
                self.train(c, "m", SPEC_MLP, 1, states)
                self.check_file(d, "m", step, states[step], c.save_checkpoint("m"))
        self.stop(server)

        path = os.path.join(d, "m", ckpt_name(3) + ".safetensors")
        with open(path, "rb") as f:
            data = f.read()
        damaged = damage(data)
        self.assertNotEqual(damaged, data)
        with open(path, "wb") as f:
            f.write(damaged)

        server.start()
        log = server.checkpoint_log()
        skipped = {os.path.realpath(p): reason for p, reason in log.skipped}
        self.assertIn(os.path.realpath(path), skipped,
                      f"the damaged file is not reported skipped:\n{log.text}")
        self.assertTrue(skipped[os.path.realpath(path)].strip(), "skipped without a reason")
        print(f"{damage.__name__}: skipped: {skipped[os.path.realpath(path)]}", flush=True)
        self.assertEqual(len(log.skipped), 1, log.text)
        self.assertIn("m", log.restored, log.text)
        rpath, rstep = log.restored["m"]
        self.assertEqual((os.path.basename(rpath), rstep), (ckpt_name(2) + ".safetensors", 2),
                         log.text)
        with server.client() as c:
            self.assertEqual(c.get_model("m").step, 2)
            self.assert_tensors_equal(states[2], self.exported(c, "m"), "restored from step 2")
            e = self.assert_code(grpc.StatusCode.DATA_LOSS, c.restore_checkpoint, "m",
                                 ckpt_name(3))
            print(f"{damage.__name__}: RestoreCheckpoint: {e.message}", flush=True)
            # The failed restore changed nothing.
            self.assertEqual(c.get_model("m").step, 2)
            self.assert_tensors_equal(states[2], self.exported(c, "m"), "after DATA_LOSS")
            listed = [i.step for i in c.list_checkpoints("m")]
            self.assertEqual(listed, sorted(listed))
            self.assertTrue({1, 2} <= set(listed), listed)
            # No name: the newest valid one, step 2 (its history continues from there, so the
            # damaged later file goes); the valid ones restore by name.
            self.assertEqual(c.restore_checkpoint("m").step, 2)
            self.assert_tensors_equal(states[2], self.exported(c, "m"), "restored newest")
            self.assertEqual([i.step for i in c.list_checkpoints("m")], [1, 2])
            # Back past step 2 only when asked to discard it.
            self.assert_code(grpc.StatusCode.FAILED_PRECONDITION, c.restore_checkpoint, "m",
                             ckpt_name(1))
            self.assertEqual(c.restore_checkpoint("m", ckpt_name(1), discard_newer=True).step, 1)
            self.assert_tensors_equal(states[1], self.exported(c, "m"), "restored step 1")
        self.stop(server)

    def test_flipped_data_byte(self):
        self.run_damage(damage_flip_data_byte)

    def test_truncated_file(self):
        self.run_damage(damage_truncate)

    def test_wrong_crc_in_metadata(self):
        self.run_damage(damage_wrong_crc)

    def test_header_offsets_lie(self):
        self.run_damage(damage_header_offsets)

    def test_header_shape_lie(self):
        self.run_damage(damage_header_shape)

    def test_stale_temporary_files_removed(self):
        d = self.new_dir()
        flags = ("--checkpoint-dir", d, "--checkpoint-on-shutdown", "false")
        server = self.new_server(*flags).start()
        states = {}
        with server.client() as c:
            c.create_model("m", SPEC_ONE, seed=8)
            self.train(c, "m", SPEC_ONE, 1, states)
            c.save_checkpoint("m")
        self.stop(server)
        folder = os.path.join(d, "m")
        with open(os.path.join(folder, ckpt_name(1) + ".safetensors"), "rb") as f:
            good = f.read()
        planted = {
            os.path.join(folder, ".step-00000002.safetensors.tmp"): good[:len(good) // 2],
            os.path.join(folder, ".step-00000007.safetensors.tmp.12345"): b"",
            os.path.join(folder, ".tmp-step-00000009"): good,  # complete, but never renamed
        }
        for p, content in planted.items():
            with open(p, "wb") as f:
                f.write(content)

        server.start()
        log = server.checkpoint_log()
        removed = {os.path.realpath(p) for p in log.removed}
        for p in planted:
            self.assertIn(os.path.realpath(p), removed, f"{p} not reported removed:\n{log.text}")
            self.assertFalse(os.path.exists(p), f"{p} still there")
        self.assertEqual(log.skipped, [], log.text)
        self.assertTrue(log.before_listening, log.text)
        self.assertEqual(sorted(os.listdir(folder)), [ckpt_name(1) + ".safetensors"])
        with server.client() as c:
            self.assertEqual(c.get_model("m").step, 1)
            self.assert_tensors_equal(states[1], self.exported(c, "m"), "restored")
        self.stop(server)

    def test_folder_with_only_a_temporary_file(self):
        """A kill during a model's first save leaves a folder holding only a temporary file: the
        server still starts, removes it, and restores nothing for that id."""
        d = self.new_dir()
        os.makedirs(os.path.join(d, "ghost"))
        tmp = os.path.join(d, "ghost", ".step-00000001.safetensors.tmp")
        with open(tmp, "wb") as f:
            f.write(b"\0" * 100)
        server = self.new_server("--checkpoint-dir", d).start()
        log = server.checkpoint_log()
        self.assertIn(os.path.realpath(tmp), {os.path.realpath(p) for p in log.removed},
                      log.text)
        self.assertFalse(os.path.exists(tmp))
        self.assertNotIn("ghost", log.restored)
        with server.client() as c:
            self.assert_code(grpc.StatusCode.NOT_FOUND, c.get_model, "ghost")
            self.assertEqual(c.list_models(), [])
            c.create_model("ghost", SPEC_ONE, seed=9)  # no checkpoint holds the id
        self.stop(server)


# ---------------------------------------------------------------- RestoreCheckpoint

class RestoreTest(CheckpointTestCase):

    def test_restore_checkpoint(self):
        d = self.new_dir()
        server = self.new_server("--checkpoint-dir", d, "--checkpoint-on-shutdown",
                                 "false").start()
        states = {}
        with server.client() as c:
            self.assert_code(grpc.StatusCode.NOT_FOUND, c.save_checkpoint, "nope")
            self.assert_code(grpc.StatusCode.NOT_FOUND, c.list_checkpoints, "nope")
            self.assert_code(grpc.StatusCode.NOT_FOUND, c.restore_checkpoint, "nope")
            c.create_model("m", SPEC_MLP, seed=10)
            self.assert_code(grpc.StatusCode.NOT_FOUND, c.list_checkpoints, "m")
            self.train_passes(c, "m", SPEC_MLP, 2, states)
            info2 = c.save_checkpoint("m")
            self.check_file(d, "m", 2, states[2], info2)
            self.train_passes(c, "m", SPEC_MLP, 2, states)
            info4 = c.save_checkpoint("m")
            self.check_file(d, "m", 4, states[4], info4)
            self.assertEqual(self.train_passes(c, "m", SPEC_MLP, 1, states), 5)
            listed = c.list_checkpoints("m")
            self.assertEqual([(i.name, i.step, i.bytes, i.crc32c) for i in listed],
                             [(i.name, i.step, i.bytes, i.crc32c) for i in (info2, info4)])

            # No name: the newest valid one (the model had moved on to step 5).
            info = c.restore_checkpoint("m")
            self.assertEqual((info.model_id, info.step), ("m", 4))
            self.assert_tensors_equal(states[4], self.exported(c, "m"), "restored newest")

            # By name, into the loaded model, back past a later checkpoint: refused, naming the
            # ways on; history is never dropped unasked (trainer.proto, RestoreCheckpointRequest).
            spec = c.get_model("m").spec
            e = self.assert_code(grpc.StatusCode.FAILED_PRECONDITION, c.restore_checkpoint, "m",
                                 ckpt_name(2))
            for word in (ckpt_name(4), "new_model_id", "discard_newer"):
                self.assertIn(word, e.message)
            self.assertEqual(c.get_model("m").step, 4)
            self.assertEqual(self.steps_on_disk(d, "m"), [2, 4])

            # As a new model (a branch): "m" keeps its model and its checkpoints; the branch
            # starts at step 2 with a checkpoint of its own and trains on exactly as "m" did.
            info = c.restore_checkpoint("m", ckpt_name(2), new_model_id="b")
            self.assertEqual((info.model_id, info.step), ("b", 2))
            self.assert_tensors_equal(states[2], self.exported(c, "b"), "branch at step 2")
            self.assertEqual(c.get_model("m").step, 4)
            self.assertEqual(self.steps_on_disk(d, "m"), [2, 4])
            self.assertEqual(self.steps_on_disk(d, "b"), [2])
            self.assertEqual(self.train_passes(c, "b", SPEC_MLP, 1), 3)
            self.assert_tensors_equal(states[3], self.exported(c, "b"), "branch at step 3")
            c.save_checkpoint("b")
            self.assertEqual(self.steps_on_disk(d, "m"), [2, 4])
            for taken in ("b", "m"):
                self.assert_code(grpc.StatusCode.ALREADY_EXISTS if taken == "b" else
                                 grpc.StatusCode.INVALID_ARGUMENT, c.restore_checkpoint, "m",
                                 new_model_id=taken)
            c.delete_model("b", delete_checkpoints=True)

            # With discard_newer it goes back to step 2 and trains on exactly as before. Its
            # history continues from there: the later checkpoint is removed.
            info = c.restore_checkpoint("m", ckpt_name(2), discard_newer=True)
            self.assertEqual((info.model_id, info.step), ("m", 2))
            self.assertEqual(info.spec, spec)
            self.assertEqual(c.get_model("m").step, 2)
            self.assert_tensors_equal(states[2], self.exported(c, "m"), "restored step 2")
            self.assertEqual([i.step for i in c.list_checkpoints("m")], [2])
            self.assertEqual(self.steps_on_disk(d, "m"), [2])
            self.assertEqual(self.train_passes(c, "m", SPEC_MLP, 1), 3)
            self.assert_tensors_equal(states[3], self.exported(c, "m"), "step 3 after restore")
            self.check_file(d, "m", 3, states[3], c.save_checkpoint("m"))
            self.assertEqual(c.restore_checkpoint("m").step, 3)

            # Errors change nothing.
            self.assert_code(grpc.StatusCode.NOT_FOUND, c.restore_checkpoint, "m",
                             ckpt_name(99))
            for bad in ("../x", "a/b", "step-12ab", "../m/step-00000002"):
                e = self.assert_code(grpc.StatusCode.INVALID_ARGUMENT, c.restore_checkpoint,
                                     "m", bad)
                self.assertIn("name", e.message)
            self.assertEqual(c.get_model("m").step, 3)
            self.assertEqual(self.steps_on_disk(d, "m"), [2, 3])

            # Deleted, its checkpoints move to the trash of deleted models: the id is free (a
            # restart does not bring the model back: DeletedModelTest), and from_deleted takes
            # them back on purpose.
            c.delete_model("m")
            self.assert_code(grpc.StatusCode.NOT_FOUND, c.get_model, "m")
            self.assertEqual(self.steps_on_disk(d, "m"), [])
            self.assert_code(grpc.StatusCode.NOT_FOUND, c.list_checkpoints, "m")
            trash = os.listdir(os.path.join(d, ".deleted"))
            self.assertEqual(len(trash), 1)
            self.assertTrue(trash[0].startswith("m@"), trash)
            info = c.restore_checkpoint("m", from_deleted=True)
            self.assertEqual((info.model_id, info.step), ("m", 3))
            self.assert_tensors_equal(states[3], self.exported(c, "m"), "re-created at step 3")
            self.assertEqual(self.steps_on_disk(d, "m"), [2, 3])
            self.assertEqual(os.listdir(os.path.join(d, ".deleted")), [])

            # delete_checkpoints removes the files too; then the id is free.
            c.delete_model("m", delete_checkpoints=True)
            self.assertEqual(self.steps_on_disk(d, "m"), [])
            self.assert_code(grpc.StatusCode.NOT_FOUND, c.list_checkpoints, "m")
            c.create_model("m", SPEC_ONE, seed=11)
        self.stop(server)

    def test_deleted_model_stays_deleted_and_branches_survive_a_restart(self):
        d = self.new_dir()
        server = self.new_server("--checkpoint-dir", d).start()
        with server.client() as c:
            c.create_model("gone", SPEC_ONE, seed=20)
            self.train(c, "gone", SPEC_ONE, 2)
            c.save_checkpoint("gone")
            c.create_model("kept", SPEC_ONE, seed=21)
            kept = {}
            for _ in range(2):
                self.train(c, "kept", SPEC_ONE, 1)
                kept[c.save_checkpoint("kept").step] = self.exported(c, "kept")
            c.restore_checkpoint("kept", ckpt_name(1), new_model_id="branch")
            c.delete_model("gone")
        self.stop(server)

        server = self.new_server("--checkpoint-dir", d).start()
        with server.client() as c:
            self.assertEqual(sorted((m.model_id, m.step) for m in c.list_models()),
                             [("branch", 1), ("kept", 2)])
            self.assertEqual(self.steps_on_disk(d, "kept"), [1, 2])
            self.assert_tensors_equal(kept[1], self.exported(c, "branch"), "branch restarted")
            self.assert_tensors_equal(kept[2], self.exported(c, "kept"), "kept restarted")
            # "gone" stayed deleted, its id is free, and it can still be brought back.
            self.assert_code(grpc.StatusCode.NOT_FOUND, c.get_model, "gone")
            c.create_model("gone", SPEC_ONE, seed=22)
            c.delete_model("gone")
            self.assertEqual(c.restore_checkpoint("gone", from_deleted=True).step, 2)
            c.delete_model("gone")
        self.stop(server)

        # Past --deleted-retention-hours the trash is emptied at start (here: a deletion dated
        # 1970), and logged.
        trash = os.path.join(d, ".deleted")
        (entry,) = os.listdir(trash)
        os.rename(os.path.join(trash, entry), os.path.join(trash, "gone@1000"))
        server = self.new_server("--checkpoint-dir", d, "--deleted-retention-hours", "1").start()
        with server.client() as c:
            self.assertEqual(os.listdir(trash), [])
            self.assert_code(grpc.StatusCode.NOT_FOUND, c.restore_checkpoint, "gone",
                             from_deleted=True)
        self.stop(server)
        self.assertIn("removed the checkpoints of deleted model 'gone'", server.log())

    def test_without_checkpoint_dir(self):
        server = self.new_server().start()
        with server.client() as c:
            c.create_model("m", SPEC_ONE, seed=12)
            self.train(c, "m", SPEC_ONE, 1)
            e = self.assert_code(grpc.StatusCode.FAILED_PRECONDITION, c.save_checkpoint, "m")
            self.assertIn("checkpoint-dir", e.message)
            self.assert_code(grpc.StatusCode.FAILED_PRECONDITION, c.list_checkpoints, "m")
            self.assert_code(grpc.StatusCode.FAILED_PRECONDITION, c.restore_checkpoint, "m")
        self.stop(server)


# ---------------------------------------------------------------- paths

class PathSafetyTest(CheckpointTestCase):
    """Model ids name folders: "." and ".." must not reach the checkpoint folder itself or its
    parent (the id check allows [A-Za-z0-9_.-], which admits both)."""

    def test_dot_ids_stay_inside_the_checkpoint_dir(self):
        parent = self.new_dir()
        d = os.path.join(parent, "ckpt")
        server = self.new_server("--checkpoint-dir", d).start()
        with server.client() as c:
            c.create_model("m", SPEC_ONE, seed=17)
            self.train(c, "m", SPEC_ONE, 1)
            good = os.path.join(d, "m", ckpt_name(1) + ".safetensors")
            self.assertEqual(c.save_checkpoint("m").step, 1)
            # Canaries: a valid checkpoint in the parent and in the root, and plain files.
            canaries = [os.path.join(parent, ckpt_name(1) + ".safetensors"),
                        os.path.join(d, ckpt_name(1) + ".safetensors"),
                        # (names sorting before "ckpt" and "m")
                        os.path.join(parent, "a-notes.txt"), os.path.join(d, "a-keep.txt")]
            for path in canaries:
                shutil.copy(good, path)
            before = {p: sorted(os.listdir(p)) for p in (parent, d)}

            with open(good, "rb") as f:
                good_bytes = f.read()
            for bad in ("..", "."):
                calls = [
                    ("CreateModel", lambda: c.create_model(bad, SPEC_ONE, seed=18)),
                    ("ImportState", lambda: c.import_state(bad, good_bytes)),
                    ("SaveCheckpoint", lambda: c.save_checkpoint(bad)),
                    ("ListCheckpoints", lambda: c.list_checkpoints(bad)),
                    ("RestoreCheckpoint", lambda: c.restore_checkpoint(bad)),
                    ("RestoreCheckpoint(name)", lambda: c.restore_checkpoint(bad, ckpt_name(1))),
                    ("DeleteModel(delete_checkpoints)",
                     lambda: c.delete_model(bad, delete_checkpoints=True)),
                ]
                answers = {}
                for name, call in calls:
                    try:
                        call()
                        answers[name] = "OK"
                    except tscale.Error as e:
                        answers[name] = f"{e.code.name}: {e.message}"
                with self.subTest(model_id=bad):
                    after = {p: sorted(os.listdir(p)) for p in (parent, d)}
                    self.assertEqual(after, before, f"model id {bad!r} changed files outside "
                                                    f"its folder; answers: {answers}")
                    for name, answer in answers.items():
                        want = "INVALID_ARGUMENT" if name in ("CreateModel", "ImportState") \
                            else None
                        if want:
                            self.assertTrue(answer.startswith(want),
                                            f"{name}({bad!r}): {answer}; answers: {answers}")
                        else:
                            self.assertNotEqual(answer, "OK",
                                                f"{name}({bad!r}) succeeded; answers: {answers}")
            for path in canaries:
                self.assertTrue(os.path.exists(path), f"{path} was removed")
            self.assertEqual([m.model_id for m in c.list_models()], ["m"])
        self.stop(server)


if __name__ == "__main__":
    unittest.main()
