"""The deployment's Prometheus files against a real server and a real Prometheus.

Starts tscale-server (--metrics-listen, --checkpoint-dir, --metrics-max-layers) and Debian's
/usr/bin/prometheus with a configuration made from deploy/prometheus/prometheus.yml (the target
replaced by the server's metrics address; scrape and evaluation every second; the project's
rules.yml). Two models train from the Python client (TrainStep, Forward/Backward/
UpdateCorrelation, retries that replay, calls that fail, checkpoint saves and restores, one
restore of a damaged file) while the checks ask Prometheus's HTTP API:

- every metric family of server/metrics/metrics.h has series with exactly the expected labels,
  and their values agree with what the server's API reports;
- the rules loaded with health ok, every recording rule has data, and the alerts for a damaged
  checkpoint and for server errors (DATA_LOSS) become active;
- every query of every panel of deploy/grafana/dashboards/tscale.json, and of its template
  variables, returns series (one line per panel is printed with the count).

Needs /usr/bin/prometheus (Debian package prometheus; scripts/install-deps.sh installs it).
"""

import atexit
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import unittest
import urllib.error
import urllib.parse
import urllib.request

import grpc
import numpy as np

import tscale
from tscale.v1 import trainer_pb2
from server_process import REPO, ServerProcess

PROMETHEUS_BIN = os.environ.get("TSCALE_PROMETHEUS_BIN", "/usr/bin/prometheus")
PROMETHEUS_YML = os.path.join(REPO, "deploy", "prometheus", "prometheus.yml")
DASHBOARD_JSON = os.path.join(REPO, "deploy", "grafana", "dashboards", "tscale.json")
WAIT_S = 90.0  # bound of every wait for data

# --metrics-max-layers: "mlp" has 4 layers that learn (its RMSNorm is frozen, its drift 0 by
# construction, and not exported), so its last one is omitted.
MAX_LAYERS = 3
FROZEN_LAYERS = {"block0.norm"}
MLP_SPEC = {"layers": [
    {"name": "fc1", "ternary_linear": {"in_features": 64, "out_features": 96}},
    {"name": "act1", "activation": {"kind": "RELU"}},
    {"name": "block0", "residual": {"layers": [
        {"name": "norm", "ternary_rms_norm": {"dim": 96}},
        {"name": "up", "ternary_linear": {"in_features": 96, "out_features": 128}},
        {"name": "act", "activation": {"kind": "GELU"}},
        {"name": "down", "ternary_linear": {"in_features": 128, "out_features": 96}},
    ]}},
    {"name": "fc2", "ternary_linear": {"in_features": 96, "out_features": 10}},
]}
LIN_SPEC = {"layers": [
    {"name": "fc", "ternary_linear": {"in_features": 32, "out_features": 8, "group_size": 8,
                                      "bias": True}},
]}
MODELS = ("mlp", "lin")

DRIFT_LE = ["-3.96", "-3", "-2", "-1", "-0.5", "-0.25", "-0.125", "0", "0.125", "0.25", "0.5",
            "1", "2", "3", "3.96", "+Inf"]

# Metric name -> the labels of each of its series (besides job and instance).
FAMILIES = {
    "tscale_layer_scale_drift_bucket": {"model", "layer", "le"},
    "tscale_layer_scale_drift_sum": {"model", "layer"},
    "tscale_layer_scale_drift_count": {"model", "layer"},
    "tscale_layer_saturated_ratio": {"model", "layer"},
    "tscale_model_step": {"model"},
    "tscale_model_pending_passes": {"model"},
    "tscale_model_pending_bytes": {"model"},
    "tscale_model_persistent_bytes": {"model"},
    "tscale_model_device_bytes": {"model", "device"},
    "tscale_model_info": {"model", "device", "compute"},
    "tscale_models": set(),
    "tscale_updates_total": {"model", "source"},
    "tscale_updates_replayed_total": {"model"},
    "tscale_rpc_duration_seconds_bucket": {"method", "code", "le"},
    "tscale_rpc_duration_seconds_sum": {"method", "code"},
    "tscale_rpc_duration_seconds_count": {"method", "code"},
    "tscale_rpc_errors_total": {"method", "code"},
    "tscale_checkpoint_duration_seconds_bucket": {"operation", "le"},
    "tscale_checkpoint_duration_seconds_sum": {"operation"},
    "tscale_checkpoint_duration_seconds_count": {"operation"},
    "tscale_checkpoint_failures_total": {"operation"},
    "tscale_checkpoint_last_success_timestamp_seconds": {"model"},
    "tscale_metrics_layers_omitted_total": set(),
    "tscale_metrics_layers_omitted": set(),
    "tscale_metrics_collect_duration_seconds": set(),
    "tscale_build_info": {"version"},
    # The standard process series.
    "process_cpu_seconds_total": set(),
    "process_resident_memory_bytes": set(),
    "process_virtual_memory_bytes": set(),
    "process_open_fds": set(),
    "process_max_fds": set(),
    "process_start_time_seconds": set(),
}

# Dashboard variables as the checks substitute them (Grafana's multi-value format for $model).
SUBSTITUTIONS = {
    "$__rate_interval": "30s",
    "$__interval": "5s",
    "$__range": "5m",
}

_live = set()


@atexit.register
def _kill_leftovers():
    for proc in list(_live):
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, fn, timeout=WAIT_S, interval=0.25):
    """Polls fn() until it returns a truthy value (returned) or timeout (AssertionError naming
    what and fn's last result or exception)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = fn()
            if last:
                return last
        except (AssertionError, OSError, ValueError, KeyError) as e:
            last = e
        if time.monotonic() >= deadline:
            raise AssertionError(f"waited {timeout:.0f} s for {what}; last: {last!r}")
        time.sleep(interval)


def project_config(metrics_address):
    """deploy/prometheus/prometheus.yml for the test: the target replaced by the server's metrics
    address, every interval and timeout 1s, rule_files as absolute paths. The file is edited as
    text (there is no YAML module in Debian's python3 here); every edit must apply, so that a
    change of the file's shape fails here rather than being tested half."""
    with open(PROMETHEUS_YML) as f:
        text = f.read()
    base = os.path.dirname(PROMETHEUS_YML)
    if not re.search(r"^\s*-\s*job_name:\s*['\"]?tscale['\"]?\s*$", text, re.M):
        raise AssertionError(f"{PROMETHEUS_YML}: no scrape job named tscale (the rules use it)")
    text, n = re.subn(r"^(\s*)(scrape_interval|evaluation_interval|scrape_timeout):\s*\S+",
                      r"\1\2: 1s", text, flags=re.M)
    if n < 2:
        raise AssertionError(f"{PROMETHEUS_YML}: expected scrape_interval and "
                             f"evaluation_interval settings, found {n}")
    text, n = re.subn(r"targets:\s*\[[^\]]*\]", f'targets: ["{metrics_address}"]', text)
    if n != 1:
        raise AssertionError(f"{PROMETHEUS_YML}: expected one `targets: [...]`, found {n}")
    rule_files = []

    def absolute(m):
        path = m.group(2).strip("'\"")
        path = path if os.path.isabs(path) else os.path.join(base, path)
        rule_files.append(path)
        return f"{m.group(1)}{path}"
    block = re.search(r"^rule_files:\s*\n((?:[ \t]+-[^\n]*\n|[ \t]*#[^\n]*\n)+)", text, re.M)
    if block is None:
        raise AssertionError(f"{PROMETHEUS_YML}: no rule_files list")
    items = re.sub(r"^([ \t]+-[ \t]*)([^\s#]+)", absolute, block.group(1), flags=re.M)
    text = text[:block.start(1)] + items + text[block.end(1):]
    for path in rule_files:
        if not os.path.exists(path):
            raise AssertionError(f"{PROMETHEUS_YML}: rule file {path} does not exist")
    return text, rule_files


class Prometheus:
    """Debian's prometheus on 127.0.0.1:<free port>, its TSDB and log in a folder."""

    def __init__(self, config_text, folder):
        self.folder = folder
        self.config = os.path.join(folder, "prometheus.yml")
        with open(self.config, "w") as f:
            f.write(config_text)
        self.log_name = os.path.join(folder, "prometheus.log")
        self.proc = None
        self.url = None

    def start(self):
        for attempt in range(3):  # the free port may be taken before prometheus binds it
            port = free_port()
            self.url = f"http://127.0.0.1:{port}"
            with open(self.log_name, "w") as log:
                self.proc = subprocess.Popen(
                    [PROMETHEUS_BIN, f"--config.file={self.config}",
                     f"--storage.tsdb.path={os.path.join(self.folder, 'data')}",
                     f"--web.listen-address=127.0.0.1:{port}"],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    cwd=self.folder)
            _live.add(self.proc)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                        if r.status == 200:
                            return self
                except (urllib.error.URLError, OSError):
                    pass
                time.sleep(0.2)
            self.kill()
            if "address already in use" not in self.log():
                break
        raise AssertionError(f"{PROMETHEUS_BIN} did not become ready at {self.url} (exit status "
                             f"{self.proc.returncode}); its log:\n{self.log()}")

    def log(self):
        with open(self.log_name, errors="replace") as f:
            return f.read()

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            _live.discard(self.proc)

    def api(self, path, **params):
        """GET /api/v1/<path> with params (a list value repeats the key); returns "data"."""
        query = urllib.parse.urlencode(params, doseq=True)
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{url}: HTTP {e.code}: {e.read().decode(errors='replace')}")
        if body.get("status") != "success":
            raise AssertionError(f"{url}: {body}")
        return body["data"]

    def query(self, expr):
        """The instant vector of expr now: a list of (labels, value)."""
        data = self.api("query", query=expr)
        if data["resultType"] != "vector":
            raise AssertionError(f"{expr}: expected a vector, got {data['resultType']}")
        return [(r["metric"], float(r["value"][1])) for r in data["result"]]

    def series(self, match):
        return self.api("series", **{"match[]": match, "start": time.time() - 3600})


class Trainer(threading.Thread):
    """Keeps both models training until stop(): TrainStep on each, and every few rounds a
    Forward/Backward/UpdateCorrelation on "mlp"."""

    def __init__(self, client, steps):
        super().__init__(daemon=True)
        self.client = client
        self.steps = steps  # model -> its step, kept current
        self.rounds = 0
        self.error = None
        self._halt = threading.Event()
        self._rng = np.random.RandomState(7)

    def run(self):
        try:
            while not self._halt.is_set():
                self.rounds += 1
                x = self._rng.randn(16, 64).astype(np.float32)
                r = self.client.train_step("mlp", x, np.arange(16) % 10, loss="cross_entropy",
                                           expected_step=self.steps["mlp"])
                self.steps["mlp"] = r.step
                x = self._rng.randn(16, 32).astype(np.float32)
                r = self.client.train_step("lin", x, np.tanh(x[:, :8]), loss="mse",
                                           expected_step=self.steps["lin"])
                self.steps["lin"] = r.step
                if self.rounds % 4 == 0:
                    self.steps["mlp"] = forward_backward_update(self.client, "mlp",
                                                                self.steps["mlp"], self._rng)
                self._halt.wait(0.02)
        except Exception as e:  # reported by the test that stops the thread
            self.error = e

    def stop(self):
        self._halt.set()
        self.join(timeout=60)


def forward_backward_update(client, model, step, rng, passes=2):
    """passes training passes of one step, then the update; returns the new step."""
    for _ in range(passes):
        y, pass_id, pass_step = client.forward(model, rng.randn(8, 64).astype(np.float32),
                                               train=True)
        assert pass_step == step, (pass_step, step)
        client.backward(model, pass_id, np.sign(y).astype(np.float32))
    r = client.update_correlation(model, expected_step=step)
    assert r.step == step + 1 and not r.replayed, r
    return r.step


def expand(expr, values):
    """A dashboard query with its variables substituted: values maps a template variable's name
    to its regex (as Grafana formats a multi-value variable), then Grafana's built-ins."""
    for name, value in values.items():
        expr = expr.replace("${%s}" % name, value)
        expr = re.sub(r"\$%s\b" % re.escape(name), lambda _: value, expr)
    for name, value in SUBSTITUTIONS.items():
        expr = expr.replace(name, value)
    if "$" in expr:
        raise AssertionError(f"unsubstituted variable in {expr!r}")
    return expr


def regex_of(values):
    """Grafana's multi-value format for a Prometheus regex: (a|b), the regex's special
    characters escaped with a backslash, itself escaped for the PromQL string (block0\\\\.up)."""
    return "(" + "|".join(re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\\\1", v)
                          for v in values) + ")"


def all_panels(panels):
    for p in panels:
        yield p
        yield from all_panels(p.get("panels", []))


class PrometheusE2ETest(unittest.TestCase):
    server = prometheus = trainer = client = None

    @classmethod
    def setUpClass(cls):
        if not os.path.exists(PROMETHEUS_BIN):
            raise AssertionError(f"no {PROMETHEUS_BIN}: install Debian's package prometheus "
                                 f"(scripts/install-deps.sh)")
        cls.tmp = tempfile.mkdtemp(prefix="tscale-prometheus-e2e-")
        try:
            cls._set_up()
        except BaseException:
            cls._tear_down()
            raise

    @classmethod
    def _set_up(cls):
        cls.checkpoint_dir = os.path.join(cls.tmp, "checkpoints")
        # A replica group of one, so that the dashboard's group panels have their series too.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            store_port = s.getsockname()[1]
        cls.server = ServerProcess("--metrics-listen", "127.0.0.1:0",
                                   "--checkpoint-dir", cls.checkpoint_dir,
                                   "--metrics-max-layers", str(MAX_LAYERS),
                                   "--group-size", "1", "--group-rank", "0",
                                   "--group-store", f"127.0.0.1:{store_port}").start()
        m = re.search(r"tscale-server: metrics on http://(\S+)/metrics", cls.server.log())
        if m is None:
            raise AssertionError(f"no metrics line in the server's log:\n{cls.server.log()}")
        cls.metrics_address = m.group(1)
        config, cls.rule_files = project_config(cls.metrics_address)
        cls.prometheus = Prometheus(config, cls.tmp).start()
        prom = cls.prometheus
        # rate() and increase() need a sample before the events they count.
        wait_for("the first scrape of the server", lambda: prom.query(
            'up{job="tscale"} == 1 and on (instance) tscale_checkpoint_failures_total'))

        cls.client = cls.server.client(retries=0)
        c = cls.client
        rng = np.random.RandomState(0)
        c.create_model("mlp", MLP_SPEC, seed=1)
        c.create_model("lin", LIN_SPEC, seed=2)
        steps = {"mlp": 0, "lin": 0}
        for _ in range(5):
            steps["mlp"] = c.train_step("mlp", rng.randn(16, 64).astype(np.float32),
                                        np.arange(16) % 10, loss="cross_entropy",
                                        expected_step=steps["mlp"]).step
            x = rng.randn(16, 32).astype(np.float32)
            steps["lin"] = c.train_step("lin", x, np.tanh(x[:, :8]), loss="mse",
                                        expected_step=steps["lin"]).step
        steps["mlp"] = forward_backward_update(c, "mlp", steps["mlp"], rng)
        # Retries of updates already applied: answered, counted as replayed.
        replay = c.update_correlation("mlp", expected_step=steps["mlp"] - 1)
        assert replay.replayed and replay.step == steps["mlp"], replay
        x = rng.randn(16, 32).astype(np.float32)
        first = c.train_step("lin", x, np.tanh(x[:, :8]), expected_step=steps["lin"])
        again = c.train_step("lin", x, np.tanh(x[:, :8]), expected_step=steps["lin"])
        assert again.replayed and again.step == first.step, again
        steps["lin"] = first.step

        # Calls that fail, one code each (the clients' mistakes).
        def fails(code, fn, *args, **kwargs):
            try:
                fn(*args, **kwargs)
            except tscale.Error as e:
                assert e.code == code, (fn.__name__, e)
                return
            raise AssertionError(f"{fn.__name__}{args}: expected {code}, it succeeded")
        fails(grpc.StatusCode.INVALID_ARGUMENT, c.forward, "mlp", np.zeros((2, 63), np.float32))
        fails(grpc.StatusCode.NOT_FOUND, c.get_model, "no-such-model")
        fails(grpc.StatusCode.FAILED_PRECONDITION, c.update_correlation, "mlp", steps["mlp"] + 5)
        fails(grpc.StatusCode.ALREADY_EXISTS, c.create_model, "lin", LIN_SPEC)

        # Checkpoints: saves, a restore, and restores of a damaged file (DATA_LOSS).
        c.save_checkpoint("mlp")
        c.save_checkpoint("lin")
        x = rng.randn(16, 32).astype(np.float32)
        steps["lin"] = c.train_step("lin", x, np.tanh(x[:, :8]), expected_step=steps["lin"]).step
        damaged = c.save_checkpoint("lin")
        path = os.path.join(cls.checkpoint_dir, "lin", damaged.name + ".safetensors")
        with open(path, "r+b") as f:
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([last[0] ^ 0xFF]))
        fails(grpc.StatusCode.DATA_LOSS, c.restore_checkpoint, "lin", name=damaged.name)
        # The first error of a (method, code) creates its series: only the next one is an
        # increase that rate() sees.
        wait_for("the DATA_LOSS series scraped", lambda: prom.query(
            'tscale_rpc_errors_total{method="RestoreCheckpoint",code="DATA_LOSS"}'))
        fails(grpc.StatusCode.DATA_LOSS, c.restore_checkpoint, "lin", name=damaged.name)
        info = c.restore_checkpoint("mlp")
        assert info.step == steps["mlp"], info

        # A still moment: the scraped values must agree with what the API reports.
        cls.api_models = {m: c.get_model(m) for m in MODELS}
        cls.api_stats = {m: c.scale_stats(m) for m in MODELS}

        def scraped_now():
            got = {r[0]["model"]: r[1] for r in prom.query("tscale_model_step")}
            # A scrape after the last change: the restore's duration is in.
            restores = prom.query('tscale_checkpoint_duration_seconds_count'
                                  '{operation="restore"}')
            return got == {m: float(steps[m]) for m in MODELS} and restores and \
                restores[0][1] == 3.0
        wait_for("a scrape of the settled models", scraped_now)
        cls.snapshot = {name: prom.query(name) for name in FAMILIES}

        cls.trainer = Trainer(cls.server.client(retries=0), steps)
        cls.trainer.start()
        # Data for rate() over windows of seconds: several scrapes while training goes on.
        start_steps = dict(steps)
        wait_for("five scrapes of training", lambda: all(
            r[1] >= start_steps[r[0]["model"]] + 1
            for r in prom.query("tscale_model_step")) and prom.query(
            'count_over_time(tscale_model_step{model="mlp"}[30s]) >= 5'))

    @classmethod
    def tearDownClass(cls):
        cls._tear_down()

    @classmethod
    def _tear_down(cls):
        trainer_error = None
        if cls.trainer is not None:
            cls.trainer.stop()
            trainer_error = cls.trainer.error
        if cls.client is not None:
            cls.client.close()
        if cls.prometheus is not None:
            cls.prometheus.kill()
        status = None
        if cls.server is not None:
            status = cls.server.stop()
        if status not in (None, 0):
            print(f"tscale-server exited with {status}; its log:\n{cls.server.log()}")
        keep = os.environ.get("TSCALE_KEEP_LOGS")
        if keep:
            print(f"prometheus e2e folder kept: {cls.tmp}")
        else:
            shutil.rmtree(cls.tmp, ignore_errors=True)
            if cls.server is not None:
                cls.server.remove_logs()
        if trainer_error is not None:
            raise AssertionError(f"the training thread failed: {trainer_error!r}")
        if status not in (None, 0):
            raise AssertionError(f"tscale-server exited with {status}")

    # ------------------------------------------------------------------ the metrics

    def test_every_family_has_series_with_its_labels(self):
        prom = self.prometheus
        for name, labels in FAMILIES.items():
            with self.subTest(metric=name):
                series = prom.series(name)
                self.assertTrue(series, f"{name}: no series")
                for s in series:
                    self.assertEqual(set(s) - {"__name__", "job", "instance"}, labels,
                                     f"{name}: labels of {s}")
                    self.assertEqual(s["job"], "tscale")
                    self.assertEqual(s["instance"], self.metrics_address)
                    for label in labels:
                        self.assertNotEqual(s[label], "", f"{name}: empty {label} in {s}")

        def values(name, label, **where):
            return {s[label] for s in prom.series(name)
                    if all(s.get(k) == v for k, v in where.items())}
        for name in ("tscale_model_step", "tscale_model_pending_passes",
                     "tscale_model_persistent_bytes", "tscale_model_info",
                     "tscale_layer_scale_drift_count", "tscale_updates_total",
                     "tscale_checkpoint_last_success_timestamp_seconds"):
            self.assertEqual(values(name, "model"), set(MODELS), name)
        self.assertEqual(values("tscale_updates_replayed_total", "model"), set(MODELS))
        self.assertEqual(values("tscale_updates_total", "source", model="mlp"),
                         {"train_step", "update_correlation"})
        # Both sources exist for every model (at zero until their first update).
        self.assertEqual(values("tscale_updates_total", "source", model="lin"),
                         {"train_step", "update_correlation"})
        self.assertEqual(values("tscale_layer_scale_drift_bucket", "le"), set(DRIFT_LE))
        methods = values("tscale_rpc_duration_seconds_count", "method")
        self.assertLessEqual({"CreateModel", "GetModel", "Forward", "Backward",
                              "UpdateCorrelation", "TrainStep", "SaveCheckpoint",
                              "RestoreCheckpoint", "GetScaleStats"}, methods)
        self.assertLessEqual({"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION",
                              "ALREADY_EXISTS", "DATA_LOSS"},
                             values("tscale_rpc_duration_seconds_count", "code"))
        # The errors that happened; server-side codes exist at zero for every method, so that
        # rate() sees their first event.
        errors = {(r[0]["method"], r[0]["code"])
                  for r in prom.query("tscale_rpc_errors_total > 0")}
        self.assertEqual(errors, {("Forward", "INVALID_ARGUMENT"), ("GetModel", "NOT_FOUND"),
                                  ("UpdateCorrelation", "FAILED_PRECONDITION"),
                                  ("CreateModel", "ALREADY_EXISTS"),
                                  ("RestoreCheckpoint", "DATA_LOSS")})
        zero = {(r[0]["method"], r[0]["code"])
                for r in prom.query("tscale_rpc_errors_total == 0")}
        self.assertIn(("TrainStep", "INTERNAL"), zero)
        for name in ("tscale_checkpoint_duration_seconds_count",
                     "tscale_checkpoint_failures_total"):
            self.assertEqual(values(name, "operation"), {"save", "restore"}, name)
        self.assertEqual(values("tscale_model_info", "device"), {"cpu"})

    def test_values_agree_with_the_api(self):
        snap = {name: rows for name, rows in self.snapshot.items()}

        def by(name, *labels):
            return {tuple(r[0][k] for k in labels): r[1] for r in snap[name]}
        for m in MODELS:
            info = self.api_models[m]
            self.assertEqual(by("tscale_model_step", "model")[(m,)], info.step)
            self.assertEqual(by("tscale_model_persistent_bytes", "model")[(m,)],
                             info.persistent_bytes)
            self.assertEqual(by("tscale_model_pending_passes", "model")[(m,)],
                             info.pending_passes)
            self.assertEqual(by("tscale_model_pending_bytes", "model")[(m,)], info.pending_bytes)
            self.assertGreater(by("tscale_model_device_bytes", "model", "device")[(m, "cpu")], 0)
            self.assertEqual(by("tscale_model_info", "model", "device", "compute")[
                (m, info.device, trainer_pb2.ComputeType.Name(info.compute))], 1)
            # The first --metrics-max-layers layers, with the API's own statistics.
            stats = self.api_stats[m].layers
            shown = [l for l in stats if l.layer not in FROZEN_LAYERS][:MAX_LAYERS]
            counts = by("tscale_layer_scale_drift_count", "model", "layer")
            self.assertEqual({k[1] for k in counts if k[0] == m}, {l.layer for l in shown}, m)
            buckets = by("tscale_layer_scale_drift_bucket", "model", "layer", "le")
            sums = by("tscale_layer_scale_drift_sum", "model", "layer")
            saturated = by("tscale_layer_saturated_ratio", "model", "layer")
            for layer in shown:
                key = (m, layer.layer)
                self.assertEqual(counts[key], layer.groups, key)
                self.assertAlmostEqual(sums[key], layer.drift_mean * layer.groups, places=6)
                self.assertAlmostEqual(saturated[key], layer.saturated_fraction, places=9)
                cumulative = np.cumsum(list(layer.bucket_count))
                self.assertEqual([buckets[key + (le,)] for le in DRIFT_LE],
                                 [float(v) for v in cumulative], key)
                self.assertEqual([float(le) for le in DRIFT_LE], list(layer.bucket_upper))
        self.assertEqual(by("tscale_models", )[()], len(MODELS))
        # mlp has 4 drift layers, one over the cap: the counter grows by 1 per scrape.
        self.assertGreater(snap["tscale_metrics_layers_omitted_total"][0][1], 0)
        self.assertEqual(snap["tscale_metrics_layers_omitted"][0][1], 1)
        self.assertEqual(by("tscale_checkpoint_failures_total", "operation"),
                         {("save",): 0.0, ("restore",): 2.0})
        self.assertEqual(by("tscale_checkpoint_duration_seconds_count", "operation"),
                         {("save",): 3.0, ("restore",): 3.0})
        self.assertEqual(by("tscale_updates_replayed_total", "model"),
                         {("mlp",): 1.0, ("lin",): 1.0})
        now = time.time()
        for (m,), t in by("tscale_checkpoint_last_success_timestamp_seconds", "model").items():
            self.assertLess(abs(now - t), 600, m)
        self.assertEqual(by("tscale_rpc_errors_total", "method", "code")[
            ("RestoreCheckpoint", "DATA_LOSS")], 2.0)

    # ------------------------------------------------------------------ the rules

    def test_rules_loaded_and_healthy(self):
        def loaded():
            groups = self.prometheus.api("rules")["groups"]
            rules = [r for g in groups for r in g["rules"]]
            return rules if rules and all(r.get("lastEvaluation", "").startswith("2") and
                                          not r["lastEvaluation"].startswith("0001")
                                          for r in rules) else None
        rules = wait_for("every rule evaluated", loaded)
        files = {g["file"] for g in self.prometheus.api("rules")["groups"]}
        self.assertEqual(files, set(self.rule_files))
        print(f"\n{len(rules)} rules:")
        for r in rules:
            name = r["name"]
            print(f"  {r['type']:9} {name:45} health={r['health']}"
                  + (f" state={r['state']}" if r["type"] == "alerting" else ""))
            self.assertEqual(r["health"], "ok", f"{name}: {r.get('lastError')}")
            if r["type"] == "alerting":
                self.assertIn("severity", r["labels"], name)
                self.assertIn("summary", r["annotations"], name)
                self.assertIn("description", r["annotations"], name)
        self.assertTrue(any(r["type"] == "recording" for r in rules))
        self.assertTrue(any(r["type"] == "alerting" for r in rules))

    def test_recording_rules_have_data(self):
        groups = self.prometheus.api("rules")["groups"]
        names = [r["name"] for g in groups for r in g["rules"] if r["type"] == "recording"]
        self.assertIn("tscale:layer_scale_drift:p50", names)
        self.assertIn("tscale:model_step:rate1m", names)
        self.assertIn("tscale:rpc_duration_seconds:p99", names)
        self.assertIn("tscale:rpc_errors:ratio_rate5m", names)
        print()
        for name in names:
            rows = wait_for(f"data of {name}", lambda: self.prometheus.query(name))
            print(f"  {name:45} {len(rows)} series")
        steps = wait_for("a positive step rate of both models", lambda: {
            r[0]["model"]: r[1] for r in self.prometheus.query("tscale:model_step:rate1m > 0")
            if r[0]["model"] in MODELS}.keys() == set(MODELS))
        self.assertTrue(steps)
        # Drift quantiles per exported layer of each model.
        p50 = self.prometheus.query("tscale:layer_scale_drift:p50")
        self.assertEqual(len({(r[0]["model"], r[0]["layer"]) for r in p50}),
                         MAX_LAYERS + len(self.api_stats["lin"].layers))
        for labels, value in p50:
            self.assertTrue(-4 <= value <= 4, (labels, value))

    def test_alerts_fire_on_the_damaged_checkpoint(self):
        def active(name, state):
            return [a for a in self.prometheus.api("alerts")["alerts"]
                    if a["labels"]["alertname"] == name and a["state"] == state]
        restore = wait_for("TscaleCheckpointRestoreFailed firing",
                           lambda: active("TscaleCheckpointRestoreFailed", "firing"))
        self.assertEqual(restore[0]["labels"]["operation"], "restore")
        self.assertEqual(restore[0]["labels"]["severity"], "warning")
        errors = wait_for("TscaleHighServerErrorRate pending",
                          lambda: active("TscaleHighServerErrorRate", "pending"))
        self.assertEqual({a["labels"]["method"] for a in errors}, {"RestoreCheckpoint"})
        # Nothing else: the target is up, training progresses, saves succeed.
        others = {a["labels"]["alertname"] for a in self.prometheus.api("alerts")["alerts"]}
        self.assertEqual(others, {"TscaleCheckpointRestoreFailed", "TscaleHighServerErrorRate"})

    # ------------------------------------------------------------------ the dashboard

    def _dashboard(self):
        with open(DASHBOARD_JSON) as f:
            return json.load(f)

    def _variables(self, dashboard):
        """Each query variable's values, as Grafana would list them, in order."""
        values = {}
        for var in dashboard["templating"]["list"]:
            if var["type"] != "query":
                continue
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", q.strip())
            self.assertIsNotNone(m, f"variable {var['name']}: {q}")
            selector = expand(m.group(1), {k: regex_of(v) for k, v in values.items()})
            got = self.prometheus.api(f"label/{m.group(2)}/values", **{
                "match[]": selector, "start": time.time() - 600})
            self.assertTrue(got, f"variable {var['name']}: no values for {q}")
            values[var["name"]] = got
        return values

    def test_dashboard_structure(self):
        d = self._dashboard()
        self.assertEqual(d["schemaVersion"], 38)
        self.assertTrue(d["uid"])
        names = {v["name"]: v for v in d["templating"]["list"]}
        self.assertEqual(names["datasource"]["type"], "datasource")
        self.assertEqual(names["datasource"]["query"], "prometheus")
        for var in ("model", "layer"):
            self.assertTrue(names[var]["multi"] and names[var]["includeAll"], var)
        panels = list(all_panels(d["panels"]))
        ids = [p["id"] for p in panels]
        self.assertEqual(len(ids), len(set(ids)), "panel ids repeat")
        for p in panels:
            g = p["gridPos"]
            self.assertLessEqual(g["x"] + g["w"], 24, p["title"])
            if p["type"] == "row":
                continue
            self.assertEqual(p["datasource"], {"type": "prometheus", "uid": "${datasource}"},
                             p["title"])
            self.assertTrue(p.get("targets"), p["title"])
            refs = [t["refId"] for t in p["targets"]]
            self.assertEqual(len(refs), len(set(refs)), p["title"])

    def test_dashboard_variables(self):
        values = self._variables(self._dashboard())
        print()
        for name, v in values.items():
            print(f"  ${name}: {', '.join(v)}")
        self.assertEqual(set(values["model"]), set(MODELS))
        expected_layers = {l.layer for m in MODELS
                           for l in [x for x in self.api_stats[m].layers
                                     if x.layer not in FROZEN_LAYERS][:MAX_LAYERS]}
        self.assertEqual(set(values["layer"]), expected_layers)

    def test_every_dashboard_query_returns_series(self):
        d = self._dashboard()
        values = self._variables(d)
        # As when a user picks every model and layer one by one (the "All" of allValue .* is
        # looser); repeated panels run once per value of their variable.
        selected = {name: regex_of(v) for name, v in values.items()}
        print(f"\n  $model={selected['model']} $layer={selected['layer']} "
              + " ".join(f"{k}={v}" for k, v in SUBSTITUTIONS.items()))
        empty = []
        for p in all_panels(d["panels"]):
            if p["type"] == "row":
                continue
            runs = [("", selected)]
            if p.get("repeat"):
                runs = [(f" [{p['repeat']}={v}]", dict(selected, **{p["repeat"]: regex_of([v])}))
                        for v in values[p["repeat"]]]
            for suffix, subst in runs:
                counts = []
                for t in p["targets"]:
                    expr = expand(t["expr"], subst)
                    rows = self.prometheus.query(expr)
                    nan = sum(1 for _, v in rows if math.isnan(v))
                    counts.append(f"{t['refId']}: {len(rows)} series"
                                  + (f" ({nan} NaN)" if nan else ""))
                    if not rows:
                        empty.append(f"{p['title']}{suffix} {t['refId']}: {expr}")
                print(f"  {p['type']:10} {p['title'] + suffix:62} {'; '.join(counts)}")
        self.assertEqual(empty, [], "queries without data")


if __name__ == "__main__":
    unittest.main()
