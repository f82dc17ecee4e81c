"""Runs the real tscale-server binary for end-to-end tests.

Environment (set by tests/e2e/CMakeLists.txt; defaults for running by hand from tests/e2e):
  TSCALE_SERVER_BIN  the server binary (default ../../build/bin/tscale-server)
  TSCALE_TEST_DATA   tests/data (default ../data)
  TSCALE_TEST_DEVICE the --device the servers get (default "cpu": the golden vectors are exact
                     on the CPU; "" leaves the server's own default)
  TSCALE_KEEP_LOGS   when set, servers' log files are never removed (their paths are printed)
"""

import atexit
import os
import re
import signal
import subprocess
import tempfile
import time
import unittest

import numpy as np

import tscale

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SERVER_BIN = os.environ.get("TSCALE_SERVER_BIN") or os.path.join(REPO, "build", "bin",
                                                                 "tscale-server")
TEST_DATA = os.environ.get("TSCALE_TEST_DATA") or os.path.join(REPO, "tests", "data")
DEVICE = os.environ.get("TSCALE_TEST_DEVICE", "cpu")

_LISTENING = re.compile(r"tscale-server: listening on (\S+)")
_live = set()

# The server's checkpoint lines at start (stderr), one per file or model.
_CKPT_SKIPPED = re.compile(r"^tscale-server: checkpoint: skipped (\S+): (.*?)\s*$", re.M)
_CKPT_RESTORED = re.compile(
    r"^tscale-server: checkpoint: restored model '(.*)' from (\S+) \(step (\d+)\)\s*$", re.M)
_CKPT_REMOVED = re.compile(
    r"^tscale-server: checkpoint: removed stale temporary file (\S+?)\s*$", re.M)


class CheckpointLog:
    """The checkpoint lines of one server log: ``skipped`` [(path, reason)], ``restored``
    {model_id: (path, step)}, ``removed`` [path], and ``before_listening`` (True when every such
    line precedes the listening line, as the server promises)."""

    def __init__(self, text):
        self.text = text
        self.skipped = [(m.group(1), m.group(2)) for m in _CKPT_SKIPPED.finditer(text)]
        self.restored = {m.group(1): (m.group(2), int(m.group(3)))
                         for m in _CKPT_RESTORED.finditer(text)}
        self.removed = [m.group(1) for m in _CKPT_REMOVED.finditer(text)]
        listening = _LISTENING.search(text)
        ends = [m.end() for r in (_CKPT_SKIPPED, _CKPT_RESTORED, _CKPT_REMOVED)
                for m in r.finditer(text)]
        self.before_listening = listening is not None and all(
            e <= listening.start() for e in ends)


@atexit.register
def _kill_leftovers():
    for proc in list(_live):
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class ServerProcess:
    """One tscale-server process on 127.0.0.1:0. start() waits for the listening line and for
    health SERVING; stop() sends SIGTERM and returns the exit status; kill() is the last resort;
    sigkill() is kill -9 as a test step (it returns the exit status). start() again after the
    process ended runs a new one with the same flags (a new port and a new log file).
    The server's stdout and stderr go to a log file per run (``log()`` reads the current one;
    ``remove_logs()`` deletes them all)."""

    def __init__(self, *args, device=DEVICE, start_timeout=120.0, popen_kwargs=None,
                 client_kwargs=None, prefix=()):
        self.args = list(args)
        # A command the server runs under, e.g. ("ip", "netns", "exec", "NAME").
        self.prefix = list(prefix)
        # tscale.Client arguments for the readiness check and client(): TLS options for a
        # server started with --tls-cert (health needs no token).
        self.client_kwargs = dict(client_kwargs or {})
        self.device = device
        self.start_timeout = start_timeout
        # Extra subprocess.Popen arguments, e.g. preexec_fn and restore_signals for resource
        # limits and signal dispositions the server should inherit.
        self.popen_kwargs = dict(popen_kwargs or {})
        self.proc = None
        self.address = None
        self._log = None
        self.log_names = []  # every run's log file, oldest first

    @property
    def pid(self):
        return self.proc.pid if self.proc is not None else None

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def start(self, ready=True):
        """Starts the server and waits for its listening line, then (ready) for health SERVING;
        a rank of a replica group is SERVING only once every rank has started."""
        if not os.path.exists(SERVER_BIN):
            raise unittest.SkipTest(f"no server binary at {SERVER_BIN} (TSCALE_SERVER_BIN)")
        if self.running():
            raise RuntimeError(f"tscale-server (pid {self.pid}) is still running")
        cmd = self.prefix + [SERVER_BIN, "--listen", "127.0.0.1:0"]
        if self.device:
            cmd += ["--device", self.device]
        cmd += self.args
        self.address = None
        if self._log is not None:
            self._log.close()  # an earlier run's (the file stays)
        self._log = tempfile.NamedTemporaryFile(prefix="tscale-server-", suffix=".log",
                                                delete=False)
        self.log_names.append(self._log.name)
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, **self.popen_kwargs)
        _live.add(self.proc)
        try:
            self.address = self._wait_listening(cmd)
            if ready:
                self.wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

    def wait_ready(self):
        with tscale.Client(self.address, timeout=5, **self.client_kwargs) as client:
            client.wait_ready(timeout=self.start_timeout)

    def _wait_listening(self, cmd):
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            m = _LISTENING.search(self.log())
            if m:
                return m.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"{' '.join(cmd)} exited with {self.proc.returncode} before "
                                   f"listening; its log:\n{self.log()}")
            time.sleep(0.05)
        raise RuntimeError(f"{' '.join(cmd)}: no listening line after {self.start_timeout} s; "
                           f"its log:\n{self.log()}")

    def client(self, **kwargs):
        kwargs.setdefault("timeout", 120)
        return tscale.Client(self.address, **{**self.client_kwargs, **kwargs})

    def log(self):
        if self._log is None:
            return ""
        with open(self._log.name, "r", errors="replace") as f:
            return f.read()

    def checkpoint_log(self):
        """The checkpoint lines of the current run's log (a CheckpointLog)."""
        return CheckpointLog(self.log())

    def remove_logs(self):
        """Deletes the log files of every run (not while running; kept with TSCALE_KEEP_LOGS)."""
        if self.running():
            return
        if os.environ.get("TSCALE_KEEP_LOGS"):
            for name in self.log_names:
                print(f"tscale-server log kept: {name}")
            return
        for name in self.log_names:
            try:
                os.unlink(name)
            except OSError:
                pass

    def terminate(self):
        """Sends SIGTERM (returns at once)."""
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout=60.0):
        """The exit status; kills the process and raises AssertionError if it outlives timeout."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"tscale-server did not exit within {timeout} s of SIGTERM; "
                                 f"its log:\n{self.log()}") from None

    def stop(self, timeout=60.0):
        """SIGTERM, then the exit status (None when it was not running)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.terminate()
        try:
            return self.wait(timeout)
        finally:
            self._cleanup()

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._cleanup()

    def sigkill(self, timeout=60.0):
        """kill -9 now; waits for the process to end and returns its exit status (-9 when the
        signal killed it, or the status it had already exited with)."""
        if self.proc is None:
            raise RuntimeError("tscale-server was never started")
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            status = self.proc.wait(timeout=timeout)
        finally:
            self._cleanup()
        return status

    def _cleanup(self):
        if self.proc is not None:
            _live.discard(self.proc)
        if self._log is not None and self.proc is not None and self.proc.poll() is not None:
            self._log.close()


class ErrorAssertions:
    """assertError for unittest.TestCase subclasses."""

    def assertError(self, code, *substrings):
        """A context manager: the block must raise tscale.Error with that code and a message
        holding every substring."""
        test = self

        class _Check:
            def __enter__(self):
                return self

            def __exit__(self, exc_type, exc, tb):
                if exc_type is None:
                    test.fail(f"expected tscale.Error {code.name}, nothing was raised")
                if not issubclass(exc_type, tscale.Error):
                    return False
                test.assertEqual(exc.code, code, f"message: {exc.message}")
                for s in substrings:
                    test.assertIn(s, exc.message)
                self.error = exc
                return True
        return _Check()


class ServerTestCase(ErrorAssertions, unittest.TestCase):
    """A test class sharing one server; ``server_args`` are extra flags. The server must exit 0
    on SIGTERM at the end (tearDownClass fails otherwise)."""

    server_args = ()

    @classmethod
    def setUpClass(cls):
        cls.server = ServerProcess(*cls.server_args).start()
        cls.client = cls.server.client()

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        log_name = cls.server._log.name if cls.server._log else None
        status = cls.server.stop()
        if status != 0:
            raise AssertionError(f"tscale-server exited with {status}; its log:\n"
                                 f"{cls.server.log()}")
        if log_name and os.path.exists(log_name):
            os.unlink(log_name)

    def assert_state_equal(self, want, got, what):
        """Two states (name -> numpy array) with the same names, dtypes, shapes and values."""
        self.assertEqual(sorted(got), sorted(want), f"{what}: tensor names")
        for name, w in want.items():
            g = got[name]
            self.assertEqual(g.dtype, w.dtype, f"{what}: {name} dtype")
            self.assertEqual(g.shape, w.shape, f"{what}: {name} shape")
            np.testing.assert_array_equal(g, w, err_msg=f"{what}: {name}")
