"""Checkpoints survive kill -9: a kill can leave temporary files, never a damaged or lost one.

One model large enough that a save takes a noticeable time (a 2048x2048 ternary linear layer with
group size 1: about 37 MiB per file, most of it the int64 corr_accum), no automatic checkpoint
policy and --checkpoint-on-shutdown false, so that only the test's SaveCheckpoint calls write.

Cycle 0 starts the server on a fresh checkpoint folder, creates the model, and trains and saves
four steps synchronously (so valid checkpoints exist, and to time an iteration). Every cycle then trains and saves in a thread (train_step, ExportState recorded
as the state of that step, SaveCheckpoint) and kills the server with SIGKILL after a seeded random
delay: in even cycles anywhere in the first two iterations (scaled to a measured iteration), in odd
cycles inside the first SaveCheckpoint call (anywhere in it, or once the temporary file shows,
within the time it lasted in cycle 0). After
each kill the folder may hold temporary files (".<...>.tmp<...>") besides final files, and every
final file must hold exactly the recorded state of its step. At the next start the server must
remove (and log) those temporary files, skip no file as damaged, and restore the model at the
newest acknowledged save or at the save in flight at the kill, with exactly that step's state.

Environment: TSCALE_CRASH_CYCLES (default 30; at least 20 run), TSCALE_CRASH_SEED,
TSCALE_CRASH_FEATURES (default 2048), TSCALE_CRASH_BUDGET_S (default 200: after 20 cycles no new
cycle starts past this many seconds).
"""

import hashlib
import os
import random
import re
import shutil
import signal
import tempfile
import threading
import time
import unittest

import numpy as np

import tscale
from tscale import safetensors
from server_process import ServerProcess

FEATURES = int(os.environ.get("TSCALE_CRASH_FEATURES", "2048"))
CYCLES = int(os.environ.get("TSCALE_CRASH_CYCLES", "30"))
MIN_CYCLES = 20
SEED = int(os.environ.get("TSCALE_CRASH_SEED", "20240611"))
BUDGET_S = float(os.environ.get("TSCALE_CRASH_BUDGET_S", "200"))
BATCH = 4
MODEL = "crash"
SPEC = {"layers": [{"name": "fc1", "ternary_linear": {
    "in_features": FEATURES, "out_features": FEATURES, "group_size": 1}}]}

FINAL = re.compile(r"^step-(\d{8,})\.safetensors$")


def is_temporary(name):
    return name.startswith(".") and ".tmp" in name


def batch_for(step):
    """The training batch of the update that takes the model from `step` to step + 1."""
    rng = np.random.RandomState(1000 + step)
    x = rng.randn(BATCH, FEATURES).astype(np.float32)
    target = rng.randn(BATCH, FEATURES).astype(np.float32)
    return x, target


def digest(tensors):
    """name -> (dtype, shape, sha256 of the bytes): equal digests mean equal tensors."""
    return {name: (a.dtype.str, tuple(a.shape), hashlib.sha256(a.tobytes()).hexdigest())
            for name, a in tensors.items()}


def state_of(data):
    return digest(safetensors.loads(data)[0])


def differences(want, got):
    names = sorted(set(want) | set(got))
    return [n for n in names if want.get(n) != got.get(n)]


class TemporaryFileWatcher(threading.Thread):
    """Polls a folder during a save: ``window`` is (first, last) time, in seconds from
    ``start_time``, at which a temporary file was seen (None when never)."""

    def __init__(self, folder):
        super().__init__(daemon=True)
        self.folder = folder
        self.start_time = time.monotonic()
        self.window = None
        self._done = threading.Event()

    def run(self):
        while not self._done.is_set():
            try:
                names = os.listdir(self.folder)
            except OSError:
                names = []
            if any(is_temporary(n) for n in names):
                t = time.monotonic() - self.start_time
                self.window = (t, t) if self.window is None else (self.window[0], t)
            time.sleep(0.0005)

    def stop(self):
        self._done.set()
        self.join()


class Trainer(threading.Thread):
    """Trains and saves until the server dies under it; records each step's state first."""

    def __init__(self, address, step, states):
        super().__init__(daemon=True)
        self.address = address
        self.step = step
        self.states = states
        self.phase = "connect"
        self.in_flight = None      # the step whose SaveCheckpoint is in flight
        self.acked = []            # steps whose SaveCheckpoint returned OK, in order
        self.saves_attempted = 0
        self.error = None
        self.error_at = None
        self.failure = None        # a wrong answer (not a dead server)

    def run(self):
        client = tscale.Client(self.address, timeout=60, retries=0)
        try:
            while True:
                self.phase = "train"
                x, target = batch_for(self.step)
                r = client.train_step(MODEL, x, target, expected_step=self.step)
                if r.step != self.step + 1 or r.replayed:
                    self.failure = f"train_step from {self.step} gave step {r.step} " \
                                   f"(replayed {r.replayed})"
                    return
                self.step = r.step
                self.phase = "export"
                self.states[self.step] = state_of(client.export_state(MODEL))
                self.phase = "save"
                self.in_flight = self.step
                self.saves_attempted += 1
                info = client.save_checkpoint(MODEL)
                if info.step != self.step or info.name != f"step-{self.step:08d}":
                    self.failure = f"SaveCheckpoint at step {self.step} answered {info}"
                    return
                self.acked.append(self.step)
                self.in_flight = None
        except tscale.Error as e:
            self.error = e
            self.error_at = time.monotonic()
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.failure = f"{type(e).__name__}: {e}"
        finally:
            self.phase = "dead"
            client.close()


class CheckpointCrashTest(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="tscale-ckpt-crash-")
        self.model_dir = os.path.join(self.dir, MODEL)
        self.server = ServerProcess("--checkpoint-dir", self.dir,
                                    "--checkpoint-on-shutdown", "false")
        self.addCleanup(self.cleanup)

    def cleanup(self):
        self.server.kill()
        if getattr(self, "passed", False):
            self.server.remove_logs()
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            print(f"kept for inspection: checkpoint dir {self.dir}, server logs "
                  f"{self.server.log_names}")

    # ------------------------------------------------------------------ helpers

    def folder(self):
        """(final files {step: name}, temporary files [name]); anything else fails."""
        finals, temps = {}, []
        for name in sorted(os.listdir(self.model_dir)):
            m = FINAL.match(name)
            if m:
                finals[int(m.group(1))] = name
            elif is_temporary(name):
                temps.append(name)
            else:
                self.fail(f"unexpected file {name!r} in {self.model_dir}")
        return finals, temps

    def verify_final_files(self, states, verified):
        """Every final file parses and holds exactly the recorded state of its step (each file
        version read once: `verified` maps name -> (inode, size, mtime))."""
        finals, _ = self.folder()
        count = 0
        for step, name in finals.items():
            path = os.path.join(self.model_dir, name)
            st = os.stat(path)
            key = (st.st_ino, st.st_size, st.st_mtime_ns)
            if verified.get(name) == key:
                continue
            with open(path, "rb") as f:
                data = f.read()
            try:
                tensors, md = safetensors.loads(data)
            except ValueError as e:
                self.fail(f"{path}: a final checkpoint file does not parse after kill -9: {e}")
            self.assertEqual(md.get("format"), "tscale/1", path)
            self.assertEqual(md.get("step"), str(step), path)
            self.assertEqual(md.get("model_id"), MODEL, path)
            self.assertIn(step, states, f"{path}: a file of a step never trained")
            diff = differences(states[step], digest(tensors))
            self.assertFalse(diff, f"{path}: tensors differ from the recorded state of step "
                                   f"{step}: {diff}")
            verified[name] = key
            count += 1
        return count

    # ------------------------------------------------------------------ the test

    def test_kill_minus_9_during_saves(self):
        started = time.monotonic()
        rng = random.Random(SEED)
        states = {}          # step -> digest of the state recorded just before its save
        verified = {}
        stats = dict(cycles=0, saves_attempted=0, saves_acked=0, kills_in_save=0,
                     restores_verified=0, restored_unacked=0, corrupt_loads=0, stale_tmp_seen=0,
                     stale_tmp_removed=0, files_verified=0)

        # Cycle 0: valid checkpoints, the timing of a train+save iteration, and when (from the
        # start of the SaveCheckpoint call) the temporary file exists.
        self.server.start()
        with self.server.client(retries=0) as c:
            c.create_model(MODEL, SPEC, seed=7)
            save_s, iter_s, tmp_windows = [], [], []
            step = 0
            for _ in range(4):
                t0 = time.monotonic()
                x, target = batch_for(step)
                step = c.train_step(MODEL, x, target, expected_step=step).step
                states[step] = state_of(c.export_state(MODEL))
                watcher = TemporaryFileWatcher(self.model_dir)
                t1 = watcher.start_time = time.monotonic()
                watcher.start()
                info = c.save_checkpoint(MODEL)
                t2 = time.monotonic()
                watcher.stop()
                stats["saves_attempted"] += 1
                stats["saves_acked"] += 1
                self.assertEqual((info.model_id, info.name, info.step),
                                 (MODEL, f"step-{step:08d}", step))
                self.assertEqual(info.bytes, os.path.getsize(
                    os.path.join(self.model_dir, info.name + ".safetensors")))
                save_s.append(t2 - t1)
                iter_s.append(t2 - t0)
                if watcher.window is not None:
                    tmp_windows.append(watcher.window)
        last_acked = step
        # Kill moments, by cycle: anywhere in the first two iterations of the thread's loop
        # (even cycles), anywhere in its first SaveCheckpoint call (cycles 1, 5, 9, ...), or
        # once its temporary file shows, within the time it lasted in cycle 0's saves (cycles 3,
        # 7, 11, ...).
        max_delay = min(max(0.4, 2.0 * float(np.median(iter_s))), 3.0)
        save_time = float(np.median(save_s))
        if tmp_windows:
            tmp_window = (float(np.median([w[0] for w in tmp_windows])),
                          float(np.median([w[1] for w in tmp_windows])))
        else:  # never seen: too short to poll; the whole save instead
            tmp_window = (0.0, save_time)
        print(f"checkpoint crash: {FEATURES}x{FEATURES} group size 1, "
              f"{info.bytes / 2**20:.1f} MiB per checkpoint; save {save_time * 1e3:.0f} ms "
              f"(temporary file from {tmp_window[0] * 1e3:.0f} to {tmp_window[1] * 1e3:.0f} ms), "
              f"train+export+save {np.median(iter_s) * 1e3:.0f} ms; kill delay "
              f"0-{max_delay * 1e3:.0f} ms, or 0-{1.2 * save_time * 1e3:.0f} ms into a save",
              flush=True)

        restart_needed = False  # cycle 0's server is still up
        temps_after_kill = []
        in_flight = None
        cycle = 0
        while cycle < CYCLES:
            if cycle >= MIN_CYCLES and time.monotonic() - started > BUDGET_S:
                break
            # ---- restart and verify
            if restart_needed:
                self.server.start()
                step = self.check_restart(states, last_acked, in_flight, temps_after_kill,
                                          stats, f"cycle {cycle}")
                last_acked = step  # the restored file is on disk: the newest one
            restart_needed = True

            # ---- train and save in a thread; kill -9 at a random moment
            trainer = Trainer(self.server.address, step, states)
            trainer.start()
            if cycle % 2 == 1:  # at a random moment of the first save
                deadline = time.monotonic() + 60
                while trainer.phase not in ("save", "dead") and time.monotonic() < deadline:
                    time.sleep(0.001)
                if cycle % 4 == 1:
                    delay = rng.uniform(0.0, 1.2 * save_time)
                else:  # once the temporary file shows, within the time it lasted in cycle 0
                    seen = time.monotonic() + 2 * save_time + 1.0
                    while time.monotonic() < seen and trainer.phase == "save" and not any(
                            is_temporary(n) for n in os.listdir(self.model_dir)):
                        time.sleep(0.0005)
                    delay = rng.uniform(0.0, tmp_window[1] - tmp_window[0])
            else:               # at a random moment of the first two iterations
                delay = rng.uniform(0.0, max_delay)
            time.sleep(delay)
            phase = trainer.phase
            killed_at = time.monotonic()
            status = self.server.sigkill()
            self.assertEqual(status, -signal.SIGKILL, f"cycle {cycle}: exit status {status}")
            trainer.join(timeout=60)
            self.assertFalse(trainer.is_alive(), f"cycle {cycle}: the training thread hangs")
            self.assertIsNone(trainer.failure, f"cycle {cycle}: {trainer.failure}")
            if trainer.error is not None:
                self.assertGreaterEqual(
                    trainer.error_at, killed_at,
                    f"cycle {cycle}: a call failed before the kill: {trainer.error}\n"
                    f"{self.server.log()}")
            stats["saves_attempted"] += trainer.saves_attempted
            stats["saves_acked"] += len(trainer.acked)
            stats["kills_in_save"] += phase == "save"
            if trainer.acked:
                last_acked = trainer.acked[-1]
            in_flight = trainer.in_flight
            step = trainer.step

            # ---- the folder after the kill
            finals, temps_after_kill = self.folder()
            stats["stale_tmp_seen"] += len(temps_after_kill)
            self.assertIn(last_acked, finals,
                          f"cycle {cycle}: the acknowledged save of step {last_acked} is not on "
                          f"disk: {sorted(finals)}")
            stats["files_verified"] += self.verify_final_files(states, verified)
            # Recorded states older than any file on disk are no longer needed.
            for s in [s for s in states if s < min(finals)]:
                del states[s]
            cycle += 1
            stats["cycles"] = cycle

        # The last restart, then a clean stop that writes nothing (on-shutdown false).
        self.server.start()
        self.check_restart(states, last_acked, in_flight, temps_after_kill, stats, "final start")
        before = self.folder()
        self.assertEqual(self.server.stop(), 0, self.server.log())
        self.assertEqual(self.folder(), before, "SIGTERM wrote with --checkpoint-on-shutdown "
                                                "false")

        elapsed = time.monotonic() - started
        print(f"checkpoint crash summary: cycles={stats['cycles']} "
              f"saves_attempted={stats['saves_attempted']} saves_acked={stats['saves_acked']} "
              f"kills_inside_save={stats['kills_in_save']} "
              f"restores_verified={stats['restores_verified']} "
              f"(at an unacknowledged save: {stats['restored_unacked']}) "
              f"corrupt_loads={stats['corrupt_loads']} "
              f"stale_tmp_seen={stats['stale_tmp_seen']} "
              f"stale_tmp_removed={stats['stale_tmp_removed']} "
              f"final_files_verified={stats['files_verified']} elapsed={elapsed:.1f}s",
              flush=True)
        self.assertGreaterEqual(stats["cycles"], MIN_CYCLES)
        self.assertEqual(stats["corrupt_loads"], 0)
        self.assertEqual(stats["restores_verified"], stats["cycles"])
        self.passed = True

    def check_restart(self, states, last_acked, in_flight, temps, stats, where):
        """After a start: temporary files gone and logged, nothing skipped, the model restored at
        the newest acknowledged save (or the one in flight at the kill) with its exact state.
        Returns the restored step."""
        log = self.server.checkpoint_log()
        text = log.text
        stats["corrupt_loads"] += len(log.skipped)
        self.assertEqual(log.skipped, [], f"{where}: a kill left a file the server skips "
                                          f"(a damaged final file):\n{text}")
        removed = {os.path.basename(p) for p in log.removed}
        for name in temps:
            self.assertIn(name, removed, f"{where}: stale temporary file {name} not reported "
                                         f"removed:\n{text}")
        stats["stale_tmp_removed"] += len(log.removed)
        _, temps_now = self.folder()
        self.assertEqual(temps_now, [], f"{where}: temporary files left after start")
        self.assertTrue(log.before_listening, f"{where}: checkpoint lines after listening:\n"
                                              f"{text}")

        self.assertIn(MODEL, log.restored, f"{where}: model not restored:\n{text}")
        path, step = log.restored[MODEL]
        self.assertEqual(os.path.basename(path), f"step-{step:08d}.safetensors", where)
        allowed = {last_acked} | ({in_flight} if in_flight is not None else set())
        self.assertIn(step, allowed, f"{where}: restored step {step}; the newest acknowledged "
                                     f"save is {last_acked}, in flight {in_flight}")
        with self.server.client(retries=0) as c:
            self.assertEqual(c.get_model(MODEL).step, step, where)
            got = state_of(c.export_state(MODEL))
        diff = differences(states[step], got)
        self.assertFalse(diff, f"{where}: restored state of step {step} differs in {diff}")
        stats["restores_verified"] += 1
        stats["restored_unacked"] += step != last_acked
        return step


if __name__ == "__main__":
    unittest.main()
