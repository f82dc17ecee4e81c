"""Checks of the deployment files: Dockerfile, deploy/k8s, deploy/compose.yaml, Grafana provisioning.

No Docker engine or cluster is needed: the files are parsed and checked against the real binaries
(TSCALE_SERVER_BIN, TSCALE_CLI_BIN), Debian's promtool, the proto and each other. The image's
ENTRYPOINT + CMD and HEALTHCHECK are run as commands against a real server.

Run by ctest as deploy_files (tests/deploy/CMakeLists.txt) with /usr/bin/python3 (python3-yaml).
"""

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import unittest

import yaml

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEPLOY = os.path.join(ROOT, "deploy")
SERVER_BIN = os.environ.get("TSCALE_SERVER_BIN", os.path.join(ROOT, "build", "bin", "tscale-server"))
CLI_BIN = os.environ.get("TSCALE_CLI_BIN", os.path.join(ROOT, "build", "bin", "tscale"))
PROMTOOL = os.environ.get("TSCALE_PROMTOOL", "/usr/bin/promtool")
PROTO = os.path.join(ROOT, "proto", "tscale", "v1", "trainer.proto")


def yaml_files():
    out = []
    for d, _, files in os.walk(DEPLOY):
        out += [os.path.join(d, f) for f in files if f.endswith((".yml", ".yaml"))]
    return sorted(out)


def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def load_one(path):
    docs = load_all(path)
    assert len(docs) == 1, f"{path}: expected one document, got {len(docs)}"
    return docs[0]


def help_flags(binary):
    r = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=60)
    text = r.stdout + r.stderr
    return set(re.findall(r"(?m)^\s*(--[a-z0-9][a-z0-9-]*)", text))


def flags_of(args):
    """The --flags among a list of arguments (--x=y counts as --x)."""
    return {a.split("=", 1)[0] for a in args if isinstance(a, str) and a.startswith("--")}


# ---------------------------------------------------------------------------------------------
# Dockerfile

class Stage:
    def __init__(self, name, base):
        self.name, self.base, self.instructions = name, base, []  # [(KEYWORD, rest)]


def parse_dockerfile(path=os.path.join(ROOT, "Dockerfile")):
    with open(path) as f:
        raw = f.read().split("\n")
    lines, cur = [], ""
    for line in raw:
        s = line.strip()
        if not cur and (not s or s.startswith("#")):
            continue
        if cur and s.startswith("#"):
            continue  # comment inside a continued instruction
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        lines.append(cur + s)
        cur = ""
    if cur:
        lines.append(cur)
    args, stages = {}, []
    for line in lines:
        kw, _, rest = line.partition(" ")
        kw, rest = kw.upper(), rest.strip()
        if kw == "ARG" and not stages:
            name, _, val = rest.partition("=")
            args[name] = val.strip('"')
        elif kw == "FROM":
            parts = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), parts[0])
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(name, base))
        else:
            stages[-1].instructions.append((kw, rest))
    return {s.name: s for s in stages}, stages


def chain(stages_by_name, name):
    """A target's stages, base first (FROM <stage> is followed)."""
    out, s = [], stages_by_name[name]
    while True:
        out.insert(0, s)
        if s.base in stages_by_name:
            s = stages_by_name[s.base]
        else:
            return out


def last(stages_by_name, target, keyword):
    """The effective value of an instruction that overrides (CMD, ENTRYPOINT, USER, HEALTHCHECK)."""
    val = None
    for s in chain(stages_by_name, target):
        for kw, rest in s.instructions:
            if kw == keyword:
                val = rest
    return val


def exec_form(text):
    import json
    return json.loads(text)


def healthcheck_cmd(text):
    m = re.search(r"\bCMD\s+(\[.*\])\s*$", text)
    assert m, f"HEALTHCHECK without an exec-form CMD: {text}"
    return exec_form(m.group(1))


RUNTIME_TARGETS = ("cpu", "cuda")


class DockerfileTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.by_name, cls.stages = parse_dockerfile()

    def test_targets_exist_and_bases(self):
        for t in ("cpu", "cuda", "demo", "cpu-build", "cuda-build"):
            self.assertIn(t, self.by_name)
        self.assertEqual(self.stages[-1].name, "cpu", "plain `docker build .` should build cpu")
        self.assertTrue(chain(self.by_name, "cpu")[0].base.startswith("debian:bookworm"))
        self.assertTrue(self.by_name["cpu-build"].base == "debian:bookworm")
        self.assertRegex(self.by_name["cuda-build"].base, r"^nvidia/cuda:13\.0\.\d+-devel-ubuntu24\.04$")
        self.assertRegex(self.by_name["cuda"].base, r"^nvidia/cuda:13\.0\.\d+-.*ubuntu24\.04$")

    def test_build_stages_run_the_projects_scripts(self):
        for script in ("scripts/install-deps.sh", "scripts/build.sh"):
            self.assertTrue(os.path.exists(os.path.join(ROOT, script)))
        cpu_runs = " ".join(r for k, r in self.by_name["cpu-build"].instructions if k == "RUN")
        i = cpu_runs.find("bash scripts/install-deps.sh")
        j = cpu_runs.find("bash scripts/build.sh")
        self.assertGreaterEqual(i, 0, "cpu-build must run scripts/install-deps.sh")
        self.assertGreater(j, i, "cpu-build must run scripts/build.sh after install-deps.sh")
        self.assertNotRegex(cpu_runs.split("RUN_TESTS")[0], r"\bctest\b", "tests run only on request")
        cuda_runs = " ".join(r for k, r in self.by_name["cuda-build"].instructions if k == "RUN")
        self.assertIn("bash scripts/build.sh", cuda_runs)
        self.assertIn("-DCMAKE_PREFIX_PATH=", cuda_runs)
        self.assertIn("torch.utils.cmake_prefix_path", cuda_runs)
        self.assertIn("80;86;89;90", " ".join(r for k, r in self.by_name["cuda-build"].instructions))

    def test_runtime_stages(self):
        for t in RUNTIME_TARGETS:
            st = chain(self.by_name, t)
            copies = [r for s in st for k, r in s.instructions if k == "COPY"]
            joined = " ".join(copies)
            self.assertRegex(joined, r"--from=\S+-build \S*build/bin/tscale-server")
            self.assertRegex(joined, r"build/bin/tscale(\s|$)")
            self.assertRegex(joined, r"build/python")
            self.assertFalse(any("--from" not in c for c in copies), f"{t}: copies from the context")
            self.assertEqual(last(self.by_name, t, "USER").split(":")[0], "10001")
            expose = " ".join(r for s in st for k, r in s.instructions if k == "EXPOSE").split()
            self.assertEqual(sorted(expose), ["50051", "9090"])
            self.assertEqual(exec_form(last(self.by_name, t, "ENTRYPOINT")), ["tscale-server"])
            self.assertEqual(exec_form(last(self.by_name, t, "CMD")),
                             ["--listen", "0.0.0.0:50051", "--metrics-listen", "0.0.0.0:9090",
                              "--checkpoint-dir", "/var/lib/tscale/checkpoints"])
            self.assertEqual(healthcheck_cmd(last(self.by_name, t, "HEALTHCHECK")),
                             ["tscale", "--server", "127.0.0.1:50051", "--timeout", "3", "health"])
        runtime_runs = " ".join(r for s in chain(self.by_name, "cpu") for k, r in s.instructions
                                if k == "RUN")
        for pkg in ("libgrpc++1.51", "libprotobuf32", "libabsl20220623", "libtorch1.13",
                    "libopenblas0-pthread", "libprometheus-cpp-core1.0", "python3-grpcio",
                    "python3-protobuf", "python3-numpy"):
            self.assertIn(pkg, runtime_runs.split())
        self.assertNotRegex(runtime_runs, r"\S+-dev\b", "the cpu runtime installs no -dev package")
        self.assertNotIn("python3-sklearn", runtime_runs, "sklearn belongs to the demo target only")
        demo_runs = " ".join(r for k, r in self.by_name["demo"].instructions if k == "RUN")
        self.assertIn("python3-sklearn", demo_runs)
        self.assertIn("python3-matplotlib", demo_runs)

    def test_dockerignore(self):
        with open(os.path.join(ROOT, ".dockerignore")) as f:
            entries = {l.strip() for l in f if l.strip() and not l.startswith("#")}
        for e in ("build/", "build-*/", ".gpu-deps/", ".git"):
            self.assertIn(e, entries)


# ---------------------------------------------------------------------------------------------
# YAML, kustomization, flags

def k8s_docs():
    kdir = os.path.join(DEPLOY, "k8s")
    kust = load_one(os.path.join(kdir, "kustomization.yaml"))
    docs = []
    for r in kust["resources"]:
        docs += load_all(os.path.join(kdir, r))
    return docs


def find(docs, kind, name=None):
    out = [d for d in docs if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]
    assert out, f"no {kind} {name or ''}"
    return out


def compose():
    return load_one(os.path.join(DEPLOY, "compose.yaml"))


class YamlTest(unittest.TestCase):
    def test_every_yaml_file_parses(self):
        files = yaml_files()
        self.assertGreaterEqual(len(files), 10, files)
        for p in files:
            with self.subTest(path=os.path.relpath(p, ROOT)):
                self.assertTrue(load_all(p), "empty")

    def test_kustomization_lists_existing_files(self):
        kdir = os.path.join(DEPLOY, "k8s")
        kust = load_one(os.path.join(kdir, "kustomization.yaml"))
        self.assertTrue(kust["resources"])
        for r in kust["resources"]:
            self.assertTrue(os.path.isfile(os.path.join(kdir, r)), r)
        listed = set(kust["resources"]) | {"kustomization.yaml"}
        present = {f for f in os.listdir(kdir) if f.endswith((".yaml", ".yml"))}
        self.assertEqual(present - listed, set(), "k8s files the kustomization does not list")
        kinds = {d["kind"] for d in k8s_docs()}
        self.assertLessEqual({"StatefulSet", "Service", "PodMonitor", "NetworkPolicy"}, kinds)
        self.assertNotIn("Secret", kinds, "the server takes no TLS or token flags yet")


class FlagsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server_flags = help_flags(SERVER_BIN)
        cls.cli_flags = help_flags(CLI_BIN)
        assert "--listen" in cls.server_flags and "--server" in cls.cli_flags

    def server_arg_lists(self):
        """(where, args) of every place that passes arguments to tscale-server."""
        out = []
        by_name, _ = parse_dockerfile()
        for t in RUNTIME_TARGETS:
            out.append((f"Dockerfile {t} CMD", exec_form(last(by_name, t, "CMD"))))
            out.append((f"Dockerfile {t} ENTRYPOINT", exec_form(last(by_name, t, "ENTRYPOINT"))[1:]))
        for d in k8s_docs():
            spec = d.get("spec", {}).get("template", {}).get("spec", {})
            for c in spec.get("containers", []):
                if c["image"].split(":")[0].endswith("tscale"):
                    out.append((f"k8s {d['metadata']['name']}/{c['name']}",
                                list(c.get("command", [])[1:]) + list(c.get("args", []))))
        for name, svc in compose()["services"].items():
            if "tscale" in str(svc.get("image", "")) and "entrypoint" not in svc:
                cmd = svc.get("command", [])
                out.append((f"compose {name}", shlex.split(cmd) if isinstance(cmd, str) else cmd))
        return out

    def test_server_flags_exist(self):
        lists = self.server_arg_lists()
        self.assertGreaterEqual(len(lists), 5)
        for where, args in lists:
            with self.subTest(where=where):
                unknown = flags_of(args) - self.server_flags
                self.assertFalse(unknown, f"{where}: flags tscale-server --help does not list")

    def test_no_tls_or_token_flags_yet(self):
        for where, args in self.server_arg_lists():
            for a in args:
                self.assertFalse(str(a).startswith(("--tls", "--auth-token")), f"{where}: {a}")

    def test_healthcheck_cli_options_exist(self):
        by_name, _ = parse_dockerfile()
        for t in RUNTIME_TARGETS:
            cmd = healthcheck_cmd(last(by_name, t, "HEALTHCHECK"))
            self.assertEqual(cmd[0], "tscale")
            self.assertFalse(flags_of(cmd) - self.cli_flags, cmd)


# ---------------------------------------------------------------------------------------------
# Kubernetes

def proto_service():
    with open(PROTO) as f:
        text = f.read()
    pkg = re.search(r"(?m)^package\s+([\w.]+)\s*;", text).group(1)
    svc = re.search(r"(?m)^service\s+(\w+)", text).group(1)
    return f"{pkg}.{svc}"


class KubernetesTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.docs = k8s_docs()
        cls.sts = find(cls.docs, "StatefulSet", "tscale")[0]
        cls.pod = cls.sts["spec"]["template"]["spec"]
        cls.c = cls.pod["containers"][0]
        cm = {}
        for d in cls.docs:
            if d["kind"] == "ConfigMap":
                cm.update(d.get("data", {}))
        # $(VAR) in args: the container's env / envFrom ConfigMaps.
        env = {e["name"]: e.get("value") for e in cls.c.get("env", [])}
        for ef in cls.c.get("envFrom", []):
            names = [d["metadata"]["name"] for d in cls.docs if d["kind"] == "ConfigMap"]
            assert ef["configMapRef"]["name"] in names, ef
        cls.args = [re.sub(r"\$\((\w+)\)", lambda m: str(env.get(m.group(1), cm.get(m.group(1)))), a)
                    for a in cls.c["args"]]

    def flag(self, name, default=None):
        a = self.args
        for i, x in enumerate(a):
            if x == name:
                return a[i + 1]
            if x.startswith(name + "="):
                return x.split("=", 1)[1]
        return default

    def test_statefulset_basics(self):
        self.assertEqual(self.sts["spec"]["replicas"], 1)
        self.assertEqual(self.c["image"], "tscale:cuda")
        for k in ("requests", "limits"):
            r = self.c["resources"][k]
            self.assertEqual(int(r["nvidia.com/gpu"]), 1)
            self.assertIn("cpu", r)
            self.assertIn("memory", r)
        self.assertEqual(self.flag("--listen"), "0.0.0.0:50051")
        self.assertEqual(self.flag("--metrics-listen"), "0.0.0.0:9090")
        self.assertEqual(self.flag("--checkpoint-every-seconds"), "300")
        self.assertNotIn("None", " ".join(self.args), "unresolved $(VAR)")
        ckdir = self.flag("--checkpoint-dir")
        claims = {t["metadata"]["name"] for t in self.sts["spec"]["volumeClaimTemplates"]}
        mounts = {m["mountPath"]: m["name"] for m in self.c["volumeMounts"]}
        self.assertIn(ckdir, mounts)
        self.assertIn(mounts[ckdir], claims)
        headless = find(self.docs, "Service", self.sts["spec"]["serviceName"])[0]
        self.assertEqual(headless["spec"]["clusterIP"], "None")

    def test_probes_target_the_grpc_port_and_served_services(self):
        port = int(self.flag("--listen").rsplit(":", 1)[1])
        named = {p["name"]: p["containerPort"] for p in self.c["ports"]}
        self.assertEqual(named["grpc"], port)
        self.assertEqual(named["metrics"], int(self.flag("--metrics-listen").rsplit(":", 1)[1]))
        served = {"", proto_service()}  # grpc.health.v1 answers for "" and the trainer
        self.assertEqual(proto_service(), "tscale.v1.TernaryTrainer")
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            if probe not in self.c:
                self.assertNotEqual(probe, "readinessProbe")
                continue
            g = self.c[probe]["grpc"]
            self.assertEqual(g["port"], port, probe)
            self.assertIn(g.get("service", ""), served, probe)
        self.assertEqual(self.c["readinessProbe"]["grpc"]["service"], "tscale.v1.TernaryTrainer")
        self.assertEqual(self.c["livenessProbe"]["grpc"].get("service", ""), "")

    def test_grace_period_exceeds_shutdown_grace(self):
        grace = int(self.flag("--shutdown-grace-seconds", "30"))
        self.assertGreater(self.pod["terminationGracePeriodSeconds"], grace + 30,
                           "no room left for the shutdown checkpoint")

    def test_security_context(self):
        psc, csc = self.pod["securityContext"], self.c["securityContext"]
        self.assertTrue(psc.get("runAsNonRoot") or csc.get("runAsNonRoot"))
        self.assertEqual(csc.get("runAsUser", psc.get("runAsUser")), 10001)
        self.assertEqual(psc["fsGroup"], 10001)
        self.assertTrue(csc["readOnlyRootFilesystem"])
        self.assertFalse(csc["allowPrivilegeEscalation"])
        self.assertEqual(csc["capabilities"]["drop"], ["ALL"])
        self.assertEqual(csc.get("seccompProfile", psc.get("seccompProfile"))["type"], "RuntimeDefault")

    def test_services_podmonitor_networkpolicy(self):
        labels = self.sts["spec"]["template"]["metadata"]["labels"]
        for svc in find(self.docs, "Service"):
            for k, v in svc["spec"]["selector"].items():
                self.assertEqual(labels.get(k), v)
            ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
            self.assertEqual(ports, {"grpc": 50051, "metrics": 9090})
        pm = find(self.docs, "PodMonitor")[0]
        self.assertEqual(pm["apiVersion"], "monitoring.coreos.com/v1")
        ep = pm["spec"]["podMetricsEndpoints"][0]
        self.assertEqual((ep["port"], ep["path"], ep["interval"]), ("metrics", "/metrics", "15s"))
        np_ = find(self.docs, "NetworkPolicy")[0]
        rules = {r["ports"][0]["port"]: r["from"] for r in np_["spec"]["ingress"]}
        self.assertEqual(set(rules), {50051, 9090})
        self.assertEqual(rules[50051][0]["podSelector"]["matchLabels"], {"tscale-client": "true"})
        self.assertEqual(rules[9090][0]["podSelector"]["matchLabels"],
                         {"app.kubernetes.io/name": "prometheus"})


# ---------------------------------------------------------------------------------------------
# Compose, Prometheus, Grafana

class ComposeTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.c = compose()
        cls.s = cls.c["services"]

    def mounts(self, service):
        out = {}
        for v in self.s[service].get("volumes", []):
            src, dst = v.split(":")[:2]
            out[dst] = src
        return out

    def test_services(self):
        t = self.s["tscale"]
        self.assertEqual(t["build"], {"context": "..", "target": "cpu"})
        self.assertLessEqual({"50051:50051", "9090:9090"}, set(map(str, t["ports"])))
        ck = t["command"][t["command"].index("--checkpoint-dir") + 1]
        vol = self.mounts("tscale")[ck]
        self.assertIn(vol, self.c["volumes"], "checkpoints on a named volume")
        self.assertTrue(self.s["prometheus"]["image"].startswith("prom/prometheus"))
        self.assertTrue(self.s["grafana"]["image"].startswith("grafana/grafana"))
        d = self.s["demo"]
        self.assertEqual(d["profiles"], ["demo"])
        cmd = d["entrypoint"] + d["command"]
        self.assertIn("--server", cmd)
        self.assertEqual(cmd[cmd.index("--server") + 1], "tscale:50051")
        self.assertTrue(cmd[1].endswith("train_digits.py"))

    def test_demo_options_exist(self):
        d = self.s["demo"]
        # ctest sets PYTHONPATH to the build's python/ (the tscale_python target).
        env = dict(os.environ)
        env.setdefault("PYTHONPATH", os.path.join(os.path.dirname(SERVER_BIN), "..", "python"))
        r = subprocess.run(["/usr/bin/python3",
                            os.path.join(ROOT, "client/python/examples/train_digits.py"), "--help"],
                           capture_output=True, text=True, env=env, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)
        known = set(re.findall(r"(--[a-z][a-z0-9-]*)", r.stdout))
        self.assertFalse(flags_of(d["command"]) - known)

    def test_prometheus_config_passes_promtool(self):
        m = self.mounts("prometheus")
        cfg_in = "/etc/prometheus/prometheus.yml"
        cfg_src = os.path.normpath(os.path.join(DEPLOY, m[cfg_in]))
        self.assertEqual(cfg_src, os.path.join(DEPLOY, "compose", "prometheus.yml"))
        cfg = load_one(cfg_src)
        self.assertEqual(cfg["global"]["scrape_interval"], "5s")
        job = cfg["scrape_configs"][0]
        self.assertEqual(job["job_name"], "tscale")
        self.assertEqual(job["static_configs"][0]["targets"], ["tscale:9090"])
        project = load_one(os.path.join(DEPLOY, "prometheus", "prometheus.yml"))
        self.assertEqual(cfg["rule_files"], project["rule_files"])
        # Every rule file, as the container sees it, is the project's rules.yml.
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(cfg_src, os.path.join(tmp, "prometheus.yml"))
            for rf in cfg["rule_files"]:
                in_container = os.path.normpath(os.path.join(os.path.dirname(cfg_in), rf))
                self.assertIn(in_container, m, f"rule file {rf} is not mounted")
                src = os.path.normpath(os.path.join(DEPLOY, m[in_container]))
                self.assertEqual(src, os.path.join(DEPLOY, "prometheus", "rules.yml"))
                shutil.copy(src, os.path.join(tmp, rf))
            r = subprocess.run([PROMTOOL, "check", "config", os.path.join(tmp, "prometheus.yml")],
                               capture_output=True, text=True, timeout=60)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            self.assertIn("rule files found", r.stdout + r.stderr)

    def test_grafana_provisioning(self):
        m = self.mounts("grafana")
        ds_dir = os.path.normpath(os.path.join(DEPLOY, m["/etc/grafana/provisioning/datasources"]))
        db_dir = os.path.normpath(os.path.join(DEPLOY, m["/etc/grafana/provisioning/dashboards"]))
        ds = load_one(os.path.join(ds_dir, "prometheus.yml"))["datasources"]
        self.assertEqual(len(ds), 1)
        self.assertEqual((ds[0]["uid"], ds[0]["type"], ds[0]["url"], ds[0]["isDefault"]),
                         ("prometheus", "prometheus", "http://prometheus:9090", True))
        prov = load_one(os.path.join(db_dir, "tscale.yml"))["providers"][0]
        path_in = prov["options"]["path"]
        self.assertIn(path_in, m, "the dashboards folder the provider reads is not mounted")
        src = os.path.normpath(os.path.join(DEPLOY, m[path_in]))
        self.assertTrue(os.path.isfile(os.path.join(src, "tscale.json")))
        self.assertEqual(src, os.path.join(DEPLOY, "grafana", "dashboards"))
        env = self.s["grafana"]["environment"]
        self.assertEqual(str(env["GF_AUTH_ANONYMOUS_ENABLED"]).lower(), "true")
        self.assertEqual(env["GF_AUTH_ANONYMOUS_ORG_ROLE"], "Viewer")
        home = env.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
        if home:
            self.assertTrue(home.startswith(path_in + "/"))
            self.assertTrue(os.path.isfile(os.path.join(src, home[len(path_in) + 1:])))
        import json
        with open(os.path.join(src, "tscale.json")) as f:
            dash = json.load(f)
        dsvar = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
        self.assertEqual(dsvar[0]["query"], ds[0]["type"])


# ---------------------------------------------------------------------------------------------
# The image's ENTRYPOINT + CMD and HEALTHCHECK as commands

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EntrypointTest(unittest.TestCase):
    def test_cmd_and_healthcheck(self):
        by_name, _ = parse_dockerfile()
        entry = exec_form(last(by_name, "cpu", "ENTRYPOINT"))
        cmd = exec_form(last(by_name, "cpu", "CMD"))
        health = healthcheck_cmd(last(by_name, "cpu", "HEALTHCHECK"))
        bins = {"tscale-server": SERVER_BIN, "tscale": CLI_BIN}
        grpc_port, metrics_port = free_port(), free_port()
        with tempfile.TemporaryDirectory() as tmp:
            ckdir = os.path.join(tmp, "checkpoints")
            os.mkdir(ckdir)
            args = []
            for a in cmd:
                a = re.sub(r":50051$", f":{grpc_port}", a)
                a = re.sub(r":9090$", f":{metrics_port}", a)
                args.append(ckdir if a == "/var/lib/tscale/checkpoints" else a)
            self.assertEqual(len(args), len(cmd))
            self.assertNotEqual(args, cmd)
            hc = [bins.get(health[0], health[0])] + [
                a.replace(":50051", f":{grpc_port}") for a in health[1:]]
            log = open(os.path.join(tmp, "server.log"), "w+")
            proc = subprocess.Popen([bins[entry[0]]] + entry[1:] + args,
                                    stdout=log, stderr=subprocess.STDOUT)
            try:
                deadline = time.time() + 60
                while True:
                    log.seek(0)
                    text = log.read()
                    if "tscale-server: listening on" in text:
                        break
                    self.assertIsNone(proc.poll(), f"server exited: {text}")
                    self.assertLess(time.time(), deadline, f"no listening line: {text}")
                    time.sleep(0.1)
                r = subprocess.run(hc, capture_output=True, text=True, timeout=30)
                self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
                proc.send_signal(signal.SIGTERM)
                self.assertEqual(proc.wait(timeout=60), 0)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                log.close()
            r = subprocess.run(hc, capture_output=True, text=True, timeout=30)
            self.assertNotEqual(r.returncode, 0, "healthcheck passed against a stopped server")


if __name__ == "__main__":
    unittest.main(verbosity=2)
