"""Checks of the deployment files: Dockerfile, deploy/k8s, deploy/compose.yaml,
deploy/compose-group.yaml, Grafana provisioning.

No Docker engine or cluster is needed: the files are parsed and checked against the real binaries
(TSCALE_SERVER_BIN, TSCALE_CLI_BIN), Debian's promtool, the proto and each other. deploy/k8s is
rendered by a small emulation of kustomize (checked against `kubectl kustomize` where kubectl is
installed) in five variants: base (plaintext), the default (TLS + tokens), with components/mtls,
with components/group (a replica group) and with both, with test certificates and tokens as the
Secret files. The image's ENTRYPOINT + CMD and HEALTHCHECK, each variant's server arguments and
probes (the group variant's as a group of processes, each with its pod's host name where a UTS
namespace can be made), compose's server and demo launcher, and compose-group's ranks are run as
commands against real servers.

Run by ctest as deploy_files (tests/deploy/CMakeLists.txt) with /usr/bin/python3 (python3-yaml).
"""

import contextlib
import copy
import json
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
import urllib.request

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


def parse_dockerfile(path=None):
    """({stage name: Stage}, [the stages of Dockerfile in order]). Without a path: the stages of
    both files, Dockerfile (cpu, demo) and Dockerfile.cuda (cuda)."""
    if path is None:
        by_name, stages = parse_dockerfile(os.path.join(ROOT, "Dockerfile"))
        cuda, _ = parse_dockerfile(os.path.join(ROOT, "Dockerfile.cuda"))
        assert not set(cuda) & set(by_name), "a stage named in both files"
        by_name.update(cuda)
        return by_name, stages
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
        # The classic builder walks every stage before the target: none of NVIDIA's in Dockerfile.
        self.assertFalse([s.name for s in self.stages if "cuda" in (s.name or "") + s.base])
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
        # The CUDA build is the README's: scripts/build.sh against the wheel's LibTorch.
        self.assertIn("bash scripts/build.sh --torch-from-python", cuda_runs)
        self.assertIn("PYTHON=/opt/torch/bin/python", cuda_runs)
        with open(os.path.join(ROOT, "scripts", "build.sh")) as f:
            self.assertIn("torch.utils.cmake_prefix_path", f.read())
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
                             ["tscale", "--server", "127.0.0.1:50051", "--timeout", "3",
                              "--retry-seconds", "0", "health"])
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

    def test_fixes_found_by_building(self):
        for f in ("Dockerfile", "Dockerfile.cuda"):
            with open(os.path.join(ROOT, f)) as fh:
                text = fh.read()
            # A syntax line makes BuildKit fetch a frontend image: offline builds fail.
            self.assertNotRegex(text, r"(?im)^#\s*syntax\s*=", f)
        users = 0
        for st in self.by_name.values():
            runs = " ".join(r for k, r in st.instructions if k == "RUN")
            if "useradd" not in runs:
                continue
            users += 1
            # The group first, with the gid the image runs as (USER 10001:10001), so it has a name.
            g = re.search(r"groupadd [^&]*--gid 10001 tscale", runs)
            u = re.search(r"useradd [^&]*--uid 10001 --gid 10001 ", runs)
            self.assertTrue(g and u and g.start() < u.start(), f"{st.name}: {runs}")
        self.assertEqual(users, 2)  # cpu-runtime and cuda
        for st in ("cpu-build", "cuda-build"):
            runs = " ".join(r for k, r in self.by_name[st].instructions if k == "RUN")
            # Without RUN_TESTS: only the targets the image ships, no tests.
            shipped = runs.split("else", 1)[1]
            self.assertIn('TARGETS="tscale-server tscale tscale_python"', shipped, st)
            self.assertIn("-DTSCALE_BUILD_TESTS=OFF", shipped, st)
        self.assertIn("install-deps.sh --build-only", " ".join(
            r for k, r in self.by_name["cpu-build"].instructions if k == "RUN").split("else")[1])

    def test_dockerignore(self):
        with open(os.path.join(ROOT, ".dockerignore")) as f:
            entries = {l.strip() for l in f if l.strip() and not l.startswith("#")}
        for e in ("build/", "build-*/", ".gpu-deps/", ".git"):
            self.assertIn(e, entries)


# ---------------------------------------------------------------------------------------------
# Kustomize, emulated for what deploy/k8s uses (no cluster, kubectl optional)

K8S = os.path.join(DEPLOY, "k8s")
# Components that deploy/k8s/kustomization.yaml leaves out and the operator adds (deploy/README.md).
OPTIONAL_COMPONENTS = ("components/mtls", "components/group")
# The rendered variants with components/group: the StatefulSet's pods form one replica group.
GROUP_VARIANTS = ("group", "group-mtls")
# The options whose value is a file, of the server and of the CLI.
SERVER_FILE_FLAGS = ("--tls-cert", "--tls-key", "--tls-client-ca", "--auth-token-file")
CLI_FILE_FLAGS = ("--tls-ca", "--tls-cert", "--tls-key", "--auth-token-file")
CLI_VALUE_OPTIONS = set(CLI_FILE_FLAGS) | {"--server", "--timeout", "--retry-seconds",
                                           "--tls-server-name"}
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "components", "labels", "images",
                      "generatorOptions", "secretGenerator", "patches"}


def kustomization(kdir):
    return load_one(os.path.join(kdir, "kustomization.yaml"))


def apply_json_patch(doc, op):
    """One RFC 6902 operation (add, replace, remove) on doc."""
    parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
    parent = doc
    for p in parts[:-1]:
        parent = parent[int(p)] if isinstance(parent, list) else parent[p]
    key, kind = parts[-1], op["op"]
    if isinstance(parent, list):
        if kind == "add":
            parent.insert(len(parent) if key == "-" else int(key), copy.deepcopy(op["value"]))
        elif kind == "replace":
            parent[int(key)] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del parent[int(key)]
        else:
            raise AssertionError(f"unsupported patch operation {kind}")
    else:
        if kind in ("replace", "remove"):
            assert key in parent, f"{kind} {op['path']}: no such member"
        if kind in ("add", "replace"):
            parent[key] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del parent[key]
        else:
            raise AssertionError(f"unsupported patch operation {kind}")


def build(kdir, docs=None):
    """`kustomize build kdir` for the features deploy/k8s uses: resources, components,
    secretGenerator from files, JSON 6902 patches with a target, images. A generated Secret keeps
    the paths of its files in "_files" ({key: file}); labels are not applied."""
    k = kustomization(kdir)
    unknown = set(k) - KUSTOMIZATION_KEYS
    assert not unknown, f"{kdir}: the test does not emulate {sorted(unknown)}"
    docs = copy.deepcopy(docs or [])
    for r in k.get("resources", []):
        p = os.path.normpath(os.path.join(kdir, r))
        docs += build(p) if os.path.isdir(p) else load_all(p)
    for c in k.get("components", []):
        docs = build(os.path.join(kdir, c), docs)
    options = k.get("generatorOptions", {})
    for g in k.get("secretGenerator", []):
        nohash = g.get("options", {}).get("disableNameSuffixHash",
                                          options.get("disableNameSuffixHash"))
        # Fixed names: the manifests name the Secrets, and tokens rotate without a restart.
        assert nohash, f"{kdir}: Secret {g['name']} would get a hash suffix"
        assert set(g) <= {"name", "type", "files", "options"}, g
        files = {}
        for f in g["files"]:
            key, _, src = f.partition("=")
            if not src:
                key, src = os.path.basename(key), key
            files[key] = os.path.normpath(os.path.join(kdir, src))
        docs.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": g["name"]},
                     "type": g.get("type", "Opaque"), "data": {key: "" for key in files},
                     "_files": files})
    for p in k.get("patches", []):
        t = p["target"]
        ops = yaml.safe_load(p["patch"])
        assert isinstance(ops, list), f"{kdir}: only JSON 6902 patches are emulated"
        hits = [d for d in docs if d["kind"] == t["kind"] and d["metadata"]["name"] == t["name"]]
        assert hits, f"{kdir}: patch target {t} not found"
        for d in hits:
            for op in ops:
                apply_json_patch(d, op)
    for img in k.get("images", []):
        for d in docs:
            for c in d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                if c["image"].split(":")[0] == img["name"]:
                    c["image"] = f"{img.get('newName', img['name'])}:{img['newTag']}"
    return docs


def reachable(kdir, out):
    """The files a kustomization uses: itself, its resource files, its resource and component
    folders' kustomizations, recursively."""
    out.add(os.path.join(kdir, "kustomization.yaml"))
    for r in kustomization(kdir).get("resources", []):
        p = os.path.normpath(os.path.join(kdir, r))
        if os.path.isdir(p):
            reachable(p, out)
        else:
            out.add(p)
    for c in kustomization(kdir).get("components", []):
        reachable(os.path.normpath(os.path.join(kdir, c)), out)
    return out


def generator_files(kdir, out):
    k = kustomization(kdir)
    for g in k.get("secretGenerator", []):
        for f in g["files"]:
            out.add(os.path.normpath(os.path.join(kdir, f.partition("=")[2] or f)))
    for r in k.get("resources", []) + k.get("components", []):
        p = os.path.normpath(os.path.join(kdir, r))
        if os.path.isdir(p):
            generator_files(p, out)
    return out


def find(docs, kind, name=None):
    out = [d for d in docs if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]
    assert out, f"no {kind} {name or ''}"
    return out


def compose():
    return load_one(os.path.join(DEPLOY, "compose.yaml"))


def compose_group():
    return load_one(os.path.join(DEPLOY, "compose-group.yaml"))


def group_ranks(services):
    """{rank: (service name, command)} of the compose services that run a rank of a group."""
    out = {}
    for name, svc in services.items():
        cmd = svc.get("command", [])
        if "tscale" in str(svc.get("image", "")) and flag_value(cmd, "--group-size") is not None:
            out[int(flag_value(cmd, "--group-rank"))] = (name, cmd)
    return out


def make_certs(tmp):
    """A CA and server and client certificates for localhost (tests/integration/make_test_certs.sh)."""
    d = os.path.join(tmp, "certs")
    os.mkdir(d)
    subprocess.run(["bash", os.path.join(ROOT, "tests", "integration", "make_test_certs.sh"), d],
                   check=True, capture_output=True, timeout=120)
    return d


class Cluster:
    """deploy/k8s copied with the Secret files an operator provides (test certificates, tokens), and
    its variants rendered: base (plaintext), default (TLS + tokens), mtls (default +
    components/mtls), group (default + components/group), group-mtls (default + components/mtls +
    components/group)."""
    TOKENS = ("k8s-test-token-one", "k8s-test-token-two")

    def __init__(self, tmp):
        self.tmp = tmp
        certs = make_certs(tmp)
        self.k8s = os.path.join(tmp, "k8s")
        shutil.copytree(K8S, self.k8s)
        put = lambda dst, src: shutil.copy(os.path.join(certs, src), os.path.join(self.k8s, dst))
        put("secrets/tls.crt", "server.pem")
        put("secrets/tls.key", "server.key")
        put("secrets/ca.crt", "ca.pem")
        put("components/mtls/secrets/client-ca.crt", "ca.pem")
        put("components/mtls/secrets/probe.crt", "client.pem")
        put("components/mtls/secrets/probe.key", "client.key")
        with open(os.path.join(self.k8s, "secrets", "tokens"), "w") as f:
            f.write("# tokens of this test\n" + "\n".join(self.TOKENS) + "\n")
        # A client's token file holds one token (the CLI reads the whole file).
        self.client_token = os.path.join(tmp, "client.token")
        with open(self.client_token, "w") as f:
            f.write(self.TOKENS[1] + "\n")
        self.certs = certs
        # The operator's additions, as deploy/README.md says: components/mtls after components/tls,
        # components/group last.
        self.dirs = {"base": os.path.join(self.k8s, "base"), "default": self.k8s}
        for name, extra in (("mtls", ["components/mtls"]), ("group", ["components/group"]),
                            ("group-mtls", ["components/mtls", "components/group"])):
            self.dirs[name] = os.path.join(tmp, "k8s-" + name)
            shutil.copytree(self.k8s, self.dirs[name])
            path = os.path.join(self.dirs[name], "kustomization.yaml")
            k = load_one(path)
            k["components"] += extra
            with open(path, "w") as f:
                yaml.safe_dump(k, f)
        self.docs = {name: build(d) for name, d in self.dirs.items()}


_CLUSTER = None


def cluster():
    global _CLUSTER
    if _CLUSTER is None:
        tmp = tempfile.mkdtemp(prefix="tscale-deploy-")
        _CLUSTER = Cluster(tmp)
    return _CLUSTER


def tearDownModule():
    if _CLUSTER is not None:
        shutil.rmtree(_CLUSTER.tmp, ignore_errors=True)


def statefulset(docs):
    sts = find(docs, "StatefulSet", "tscale")[0]
    return sts, sts["spec"]["template"]["spec"], sts["spec"]["template"]["spec"]["containers"][0]


def pod_labels(sts):
    return sts["spec"]["template"]["metadata"]["labels"]


def expanded_args(docs, c):
    """The container's args with $(VAR) taken from its env and envFrom ConfigMaps."""
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    for ef in c.get("envFrom", []):
        env.update(find(docs, "ConfigMap", ef["configMapRef"]["name"])[0].get("data", {}))
    return [re.sub(r"\$\((\w+)\)", lambda m: str(env.get(m.group(1))), a) for a in c["args"]]


def flag_value(args, name, default=None):
    for i, x in enumerate(args):
        if x == name:
            return args[i + 1]
        if x.startswith(name + "="):
            return x.split("=", 1)[1]
    return default


def pod_files(docs, pod, c):
    """Path in the container -> file on this machine, for the Secret volumes the container mounts."""
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    out = {}
    for m in c.get("volumeMounts", []):
        v = vols.get(m["name"], {})  # volumeClaimTemplates are not in volumes
        if "secret" in v:
            s = find(docs, "Secret", v["secret"]["secretName"])[0]
            for key, src in s["_files"].items():
                out[m["mountPath"].rstrip("/") + "/" + key] = src
    return out


PROBES = ("startupProbe", "livenessProbe", "readinessProbe")


class YamlTest(unittest.TestCase):
    def test_every_yaml_file_parses(self):
        files = yaml_files()
        self.assertGreaterEqual(len(files), 10, files)
        for p in files:
            with self.subTest(path=os.path.relpath(p, ROOT)):
                self.assertTrue(load_all(p), "empty")

    def test_kustomizations_list_every_file(self):
        used = reachable(K8S, set())
        for c in OPTIONAL_COMPONENTS:
            reachable(os.path.join(K8S, c), used)
        for p in used:
            self.assertTrue(os.path.isfile(p), p)
        present = set()
        for d, _, files in os.walk(K8S):
            present |= {os.path.join(d, f) for f in files if f.endswith((".yaml", ".yml"))}
        self.assertEqual(present - used, set(), "k8s files no kustomization lists")
        top = kustomization(K8S)
        self.assertEqual(top["resources"], ["base"])
        self.assertEqual(top["components"], ["components/tls", "components/tokens"])
        with open(os.path.join(DEPLOY, "README.md")) as f:
            readme = f.read()
        for c in OPTIONAL_COMPONENTS:
            self.assertTrue(c in readme, f"deploy/README.md does not explain {c}")
        for name in cluster().docs:
            kinds = {d["kind"] for d in cluster().docs[name]}
            self.assertLessEqual({"StatefulSet", "Service", "PodMonitor", "NetworkPolicy",
                                  "ConfigMap"}, kinds, name)

    def test_secret_files_are_never_committed(self):
        # The generators read the operator's files from folders whose contents git ignores.
        sources = generator_files(K8S, set())
        for c in OPTIONAL_COMPONENTS:
            generator_files(os.path.join(K8S, c), sources)
        self.assertGreaterEqual(len(sources), 7, sources)
        for d in {os.path.dirname(s) for s in sources}:
            with self.subTest(folder=os.path.relpath(d, ROOT)):
                with open(os.path.join(d, ".gitignore")) as f:
                    lines = [l.strip() for l in f if l.strip() and not l.startswith("#")]
                self.assertEqual(lines[0], "*")
                self.assertLessEqual(set(lines[1:]), {"!.gitignore", "!README.md"})

    @unittest.skipUnless(shutil.which("kubectl"), "kubectl is not installed")
    def test_emulation_agrees_with_kubectl_kustomize(self):
        for name, d in cluster().dirs.items():
            with self.subTest(variant=name):
                r = subprocess.run(["kubectl", "kustomize", d], capture_output=True, text=True,
                                   timeout=120)
                self.assertEqual(r.returncode, 0, r.stderr)
                real = [x for x in yaml.safe_load_all(r.stdout) if x]
                mine = cluster().docs[name]
                key = lambda docs: sorted((x["kind"], x["metadata"]["name"]) for x in docs)
                self.assertEqual(key(real), key(mine))
                for s in find(real, "Secret") if name != "base" else []:
                    m = find(mine, "Secret", s["metadata"]["name"])[0]
                    self.assertEqual((s.get("type", "Opaque"), sorted(s["data"])),
                                     (m["type"], sorted(m["data"])))
                rsts, rpod, rc = statefulset(real)
                msts, mpod, mc = statefulset(mine)
                for field in ("args", "volumeMounts", "envFrom", "image", "ports",
                              "resources") + PROBES:
                    self.assertEqual(rc.get(field), mc.get(field), field)
                self.assertEqual(rpod["volumes"], mpod["volumes"])
                for field in ("replicas", "podManagementPolicy", "serviceName"):
                    self.assertEqual(rsts["spec"].get(field), msts["spec"].get(field), field)
                for kind, part in (("NetworkPolicy", "spec"), ("Service", "spec"),
                                   ("ConfigMap", "data")):
                    for d in find(real, kind):
                        m = find(mine, kind, d["metadata"]["name"])[0]
                        self.assertEqual(d[part], m[part], f"{kind} {d['metadata']['name']}")


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
        for variant, docs in cluster().docs.items():
            for d in docs:
                spec = d.get("spec", {}).get("template", {}).get("spec", {})
                for c in spec.get("containers", []):
                    if c["image"].split(":")[0].endswith("tscale"):
                        out.append((f"k8s {variant} {d['metadata']['name']}/{c['name']}",
                                    list(c.get("command", [])[1:]) + list(c.get("args", []))))
        for file, services in (("compose", compose()["services"]),
                               ("compose-group", compose_group()["services"])):
            for name, svc in services.items():
                if "tscale" in str(svc.get("image", "")) and "entrypoint" not in svc:
                    cmd = svc.get("command", [])
                    out.append((f"{file} {name}",
                                shlex.split(cmd) if isinstance(cmd, str) else cmd))
        return out

    def test_server_flags_exist(self):
        lists = self.server_arg_lists()
        self.assertGreaterEqual(len(lists), 7)
        for where, args in lists:
            with self.subTest(where=where):
                unknown = flags_of(args) - self.server_flags
                self.assertFalse(unknown, f"{where}: flags tscale-server --help does not list")

    def test_group_flags_are_used(self):
        """The replica group's flags: each is in --help and some deployment file passes it (the
        Kubernetes group takes the rank from the pod's ordinal, compose names it)."""
        group = {"--group-size", "--group-rank", "--group-store", "--group-timeout-seconds",
                 "--group-rank-from-hostname"}
        self.assertLessEqual(group, self.server_flags)
        lists = dict(self.server_arg_lists())
        used = set().union(*(flags_of(args) for args in lists.values()))
        self.assertLessEqual(group, used)
        for v in GROUP_VARIANTS:
            self.assertEqual(flags_of(lists[f"k8s {v} tscale/tscale"]) & group,
                             group - {"--group-rank"}, v)
        for name, _ in group_ranks(compose_group()["services"]).values():
            self.assertEqual(flags_of(lists[f"compose-group {name}"]) & group,
                             group - {"--group-rank-from-hostname"}, name)

    def test_security_is_on_where_documented(self):
        """deploy/README.md: Kubernetes runs TLS + tokens by default (mtls adds client
        certificates), compose runs tokens without TLS, the base and the image run plaintext."""
        have = {}
        for where, args in self.server_arg_lists():
            have[where] = {f for f in flags_of(args) if f.startswith(("--tls", "--auth-token"))}
        self.assertEqual(have["k8s default tscale/tscale"],
                         {"--tls-cert", "--tls-key", "--auth-token-file"})
        self.assertEqual(have["k8s mtls tscale/tscale"],
                         {"--tls-cert", "--tls-key", "--tls-client-ca", "--auth-token-file"})
        self.assertEqual(have["k8s base tscale/tscale"], set())
        self.assertEqual(have["k8s group tscale/tscale"], have["k8s default tscale/tscale"])
        self.assertEqual(have["k8s group-mtls tscale/tscale"], have["k8s mtls tscale/tscale"])
        self.assertEqual(have["compose tscale"], {"--auth-token-file"})
        ranks = group_ranks(compose_group()["services"])
        self.assertGreaterEqual(len(ranks), 2)
        for name, _ in ranks.values():
            self.assertEqual(have[f"compose-group {name}"], {"--auth-token-file"})
        for t in RUNTIME_TARGETS:
            self.assertEqual(have[f"Dockerfile {t} CMD"], set())

    def test_healthcheck_cli_options_exist(self):
        by_name, _ = parse_dockerfile()
        for t in RUNTIME_TARGETS:
            cmd = healthcheck_cmd(last(by_name, t, "HEALTHCHECK"))
            self.assertEqual(cmd[0], "tscale")
            self.assertFalse(flags_of(cmd) - self.cli_flags, cmd)

    def test_exec_probe_options_exist(self):
        n = 0
        for variant, docs in cluster().docs.items():
            _, _, c = statefulset(docs)
            for probe in PROBES:
                if "exec" in c.get(probe, {}):
                    cmd = c[probe]["exec"]["command"]
                    with self.subTest(variant=variant, probe=probe):
                        self.assertEqual(cmd[0], "tscale")
                        self.assertFalse(flags_of(cmd) - self.cli_flags, cmd)
                        positional, i = [], 1
                        while i < len(cmd):
                            if cmd[i] in CLI_VALUE_OPTIONS:
                                i += 2
                                continue
                            if not cmd[i].startswith("-"):
                                positional.append(cmd[i])
                            i += 1
                        self.assertEqual(positional, ["health"])
                        n += 1
        # default and mtls: three each; the group variants: readiness only (their startup and
        # liveness probes are TCP connections, which do not follow the group).
        self.assertEqual(n, 8, "exec probes: default and mtls three each, the group variants one")


# ---------------------------------------------------------------------------------------------
# Kubernetes

def proto_service():
    with open(PROTO) as f:
        text = f.read()
    pkg = re.search(r"(?m)^package\s+([\w.]+)\s*;", text).group(1)
    svc = re.search(r"(?m)^service\s+(\w+)", text).group(1)
    return f"{pkg}.{svc}"


class KubernetesTest(unittest.TestCase):
    """The default variant (TLS + tokens) unless a test says otherwise."""

    @classmethod
    def setUpClass(cls):
        cls.docs = cluster().docs["default"]
        cls.sts, cls.pod, cls.c = statefulset(cls.docs)
        cls.args = expanded_args(cls.docs, cls.c)

    def flag(self, name, default=None):
        return flag_value(self.args, name, default)

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

    def test_referenced_secrets_and_configmaps_exist(self):
        for variant, docs in cluster().docs.items():
            with self.subTest(variant=variant):
                _, pod, c = statefulset(docs)
                for ef in c.get("envFrom", []):
                    find(docs, "ConfigMap", ef["configMapRef"]["name"])
                for v in pod.get("volumes", []):
                    if "secret" in v:
                        s = find(docs, "Secret", v["secret"]["secretName"])[0]
                        self.assertEqual(v["secret"].get("defaultMode"), 0o440)
                        for item in v["secret"].get("items", []):
                            self.assertIn(item["key"], s["data"])
                    if "configMap" in v:
                        find(docs, "ConfigMap", v["configMap"]["name"])
                for s in find(docs, "Secret") if variant != "base" else []:
                    if s["type"] == "kubernetes.io/tls":
                        self.assertLessEqual({"tls.crt", "tls.key"}, set(s["data"]))
                mounts = {m["name"]: m for m in c["volumeMounts"]}
                for v in pod.get("volumes", []):
                    if "secret" in v:
                        self.assertTrue(mounts[v["name"]].get("readOnly"), v["name"])
                        self.assertNotIn("subPath", mounts[v["name"]],
                                         "a subPath mount never sees a changed Secret")

    def test_file_flags_point_into_mounted_secrets(self):
        """Every file the server or a probe is given is a key of a Secret the pod mounts."""
        for variant, docs in cluster().docs.items():
            _, pod, c = statefulset(docs)
            files = pod_files(docs, pod, c)
            args = expanded_args(docs, c)
            lists = [("args", args, SERVER_FILE_FLAGS)] + [
                (p, c[p]["exec"]["command"], CLI_FILE_FLAGS) for p in PROBES if "exec" in c[p]]
            for where, argv, file_flags in lists:
                for f in file_flags:
                    v = flag_value(argv, f)
                    if v is None:
                        continue
                    with self.subTest(variant=variant, where=where, flag=f):
                        self.assertIn(v, files, "not a file of a mounted Secret")
                        self.assertTrue(any(v.startswith(m["mountPath"].rstrip("/") + "/")
                                            for m in c["volumeMounts"]))

    def test_probes(self):
        served = {"", proto_service()}  # grpc.health.v1 answers for "" and the trainer
        self.assertEqual(proto_service(), "tscale.v1.TernaryTrainer")
        for variant, docs in cluster().docs.items():
            _, _, c = statefulset(docs)
            args = expanded_args(docs, c)
            port = int(flag_value(args, "--listen").rsplit(":", 1)[1])
            named = {p["name"]: p["containerPort"] for p in c["ports"]}
            self.assertEqual(named["grpc"], port)
            self.assertEqual(named["metrics"],
                             int(flag_value(args, "--metrics-listen").rsplit(":", 1)[1]))
            tls = flag_value(args, "--tls-cert") is not None
            group = flag_value(args, "--group-size") is not None
            for probe in PROBES:
                with self.subTest(variant=variant, probe=probe):
                    p = c[probe]
                    if group and probe != "readinessProbe":
                        # Health follows the group: in a group only readiness checks it.
                        self.assertEqual(p["tcpSocket"]["port"], port)
                        continue
                    if not tls:
                        # Native gRPC probes speak plaintext: only without TLS.
                        self.assertEqual(p["grpc"]["port"], port)
                        self.assertIn(p["grpc"].get("service", ""), served)
                        continue
                    self.assertNotIn("grpc", p, "a native gRPC probe cannot speak TLS")
                    cmd = p["exec"]["command"]
                    self.assertEqual(flag_value(cmd, "--server"), f"localhost:{port}")
                    self.assertIsNotNone(flag_value(cmd, "--tls-ca"))
                    self.assertIsNone(flag_value(cmd, "--auth-token-file"),
                                      "health checks need no token")
                    if flag_value(args, "--tls-client-ca") is not None:
                        self.assertIsNotNone(flag_value(cmd, "--tls-cert"), "mTLS: no client cert")
                        self.assertIsNotNone(flag_value(cmd, "--tls-key"))
                    # The CLI's deadline ends before the kubelet's: one attempt (--timeout is
                    # each attempt's), no retries.
                    self.assertLess(float(flag_value(cmd, "--timeout")), p["timeoutSeconds"])
                    self.assertEqual(flag_value(cmd, "--retry-seconds"), "0")
            if not tls:
                self.assertEqual(c["readinessProbe"]["grpc"]["service"], "tscale.v1.TernaryTrainer")
                self.assertEqual(c["livenessProbe"]["grpc"].get("service", ""), "")

    def test_grace_period_exceeds_shutdown_grace(self):
        grace = int(self.flag("--shutdown-grace-seconds", "30"))
        self.assertGreater(self.pod["terminationGracePeriodSeconds"], grace + 30,
                           "no room left for the shutdown checkpoint")

    def test_security_context(self):
        psc, csc = self.pod["securityContext"], self.c["securityContext"]
        self.assertTrue(psc.get("runAsNonRoot") or csc.get("runAsNonRoot"))
        self.assertEqual(csc.get("runAsUser", psc.get("runAsUser")), 10001)
        self.assertEqual(psc["fsGroup"], 10001)  # the Secret files (0440) are group-readable
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
        # The metrics port stays plain HTTP with TLS on the API (the runtime test scrapes it).
        self.assertEqual(ep.get("scheme", "http"), "http")
        np_ = find(self.docs, "NetworkPolicy")[0]
        rules = {r["ports"][0]["port"]: r["from"] for r in np_["spec"]["ingress"]}
        self.assertEqual(set(rules), {50051, 9090})
        self.assertEqual(rules[50051][0]["podSelector"]["matchLabels"], {"tscale-client": "true"})
        self.assertEqual(rules[9090][0]["podSelector"]["matchLabels"],
                         {"app.kubernetes.io/name": "prometheus"})
        # Exec probes run inside the pod: the NetworkPolicy need not admit the kubelet.
        named = {p["name"]: p["containerPort"] for p in self.c["ports"]}
        self.assertEqual(set(rules), {named["grpc"], named["metrics"]})


class GroupKubernetesTest(unittest.TestCase):
    """components/group (the group and group-mtls variants): the StatefulSet's pods form one
    replica group, rank = pod ordinal, the store at pod 0 through the headless Service, a GPU
    each."""

    def variants(self):
        """(variant, docs, StatefulSet, pod spec, container, expanded args) of each variant."""
        out = []
        for variant in GROUP_VARIANTS:
            docs = cluster().docs[variant]
            sts, pod, c = statefulset(docs)
            out.append((variant, docs, sts, pod, c, expanded_args(docs, c)))
        return out

    def test_group_args_agree_with_the_statefulset(self):
        for variant, docs, sts, pod, c, args in self.variants():
            with self.subTest(variant=variant):
                n = sts["spec"]["replicas"]
                self.assertGreaterEqual(n, 2)
                self.assertEqual(flag_value(args, "--group-size"), str(n), "size != replicas")
                self.assertEqual(flag_value(args, "--group-rank-from-hostname"), "true")
                self.assertIsNone(flag_value(args, "--group-rank"), "every pod has the same args")
                self.assertGreater(int(flag_value(args, "--group-timeout-seconds")), 0)
                self.assertNotIn("None", " ".join(args), "unresolved $(VAR)")
                # Every pod starts at once: readiness waits for the whole group.
                self.assertEqual(sts["spec"]["podManagementPolicy"], "Parallel")
                # The store: pod 0 by its stable name in the headless Service, on the port the
                # container exposes.
                host, port = flag_value(args, "--group-store").rsplit(":", 1)
                svc = find(docs, "Service", sts["spec"]["serviceName"])[0]
                self.assertEqual(host, f"{sts['metadata']['name']}-0.{svc['metadata']['name']}")
                self.assertEqual(svc["spec"]["clusterIP"], "None")
                # Pods are not ready before the group forms: their names must resolve before.
                self.assertTrue(svc["spec"].get("publishNotReadyAddresses"))
                self.assertLessEqual(svc["spec"]["selector"].items(), pod_labels(sts).items())
                named = {p["name"]: p for p in c["ports"]}
                self.assertEqual(named["group"]["containerPort"], int(port))
                self.assertEqual(named["group"].get("protocol", "TCP"), "TCP")
                self.assertEqual(int(port), 29500)

    def test_one_gpu_each(self):
        for variant, _, _, pod, c, args in self.variants():
            with self.subTest(variant=variant):
                for k in ("requests", "limits"):
                    self.assertEqual(int(c["resources"][k]["nvidia.com/gpu"]), 1, k)
                self.assertNotIn("--device", flags_of(args), "the default device is the pod's GPU")
                # NCCL's buffers in /dev/shm: a memory-backed volume, not the runtime's 64 MiB.
                vols = {v["name"]: v for v in pod["volumes"]}
                shm = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
                self.assertEqual(len(shm), 1)
                self.assertEqual(vols[shm[0]["name"]]["emptyDir"]["medium"], "Memory")

    def test_network_policy_admits_the_group(self):
        base = find(cluster().docs["default"], "NetworkPolicy")[0]["spec"]["ingress"]
        for variant, docs, sts, _, _, args in self.variants():
            with self.subTest(variant=variant):
                store_port = int(flag_value(args, "--group-store").rsplit(":", 1)[1])
                labels = pod_labels(sts)
                np_ = find(docs, "NetworkPolicy")[0]
                self.assertLessEqual(np_["spec"]["podSelector"]["matchLabels"].items(),
                                     labels.items())

                def admits(rule, port):
                    ports = rule.get("ports")
                    return ports is None or any(
                        p.get("port") == port or p.get("port", 0) <= port <= p.get("endPort", -1)
                        for p in ports)

                def only_the_group(rule):
                    return all(set(peer) == {"podSelector"} and
                               peer["podSelector"]["matchLabels"].items() <= labels.items()
                               for peer in rule["from"])

                store_rules = [r for r in np_["spec"]["ingress"] if admits(r, store_port)]
                self.assertTrue(store_rules, "the store port is not admitted")
                for r in store_rules:
                    self.assertTrue(only_the_group(r), f"the store port admitted from {r['from']}")
                # Gloo and NCCL connect on ports the ranks pick: the group's pods reach every port.
                self.assertTrue(any("ports" not in r and only_the_group(r)
                                    for r in np_["spec"]["ingress"]))
                # The other rules are the single server's.
                self.assertEqual([r for r in np_["spec"]["ingress"] if r not in store_rules], base)

    def test_probes_do_not_restart_ranks_for_the_group(self):
        """Health is SERVING only while the group is formed: readiness follows it (the tscale
        Service sends clients to formed ranks only); startup and liveness only check that the
        server listens, or one rank's absence would restart all the others."""
        for variant, _, _, _, c, args in self.variants():
            with self.subTest(variant=variant):
                port = int(flag_value(args, "--listen").rsplit(":", 1)[1])
                for p in ("startupProbe", "livenessProbe"):
                    self.assertEqual(c[p]["tcpSocket"]["port"], port, p)
                r = c["readinessProbe"]
                if "exec" in r:
                    self.assertIn("health", r["exec"]["command"])  # FlagsTest checks the rest
                else:
                    self.assertEqual(r["grpc"]["service"], proto_service())
                self.assertGreaterEqual(c["startupProbe"]["periodSeconds"] *
                                        c["startupProbe"]["failureThreshold"], 300,
                                        "room for the restore of the checkpoints")


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
        # Published on the host's loopback only: tokens without TLS are for this machine.
        self.assertEqual({"127.0.0.1:50051:50051", "127.0.0.1:9090:9090"}, set(map(str, t["ports"])))
        for name in ("prometheus", "grafana"):
            for p in self.s[name]["ports"]:
                self.assertTrue(str(p).startswith("127.0.0.1:"), f"{name}: {p}")
        ck = t["command"][t["command"].index("--checkpoint-dir") + 1]
        vol = self.mounts("tscale")[ck]
        self.assertIn(vol, self.c["volumes"], "checkpoints on a named volume")
        token = flag_value(t["command"], "--auth-token-file")
        self.assertEqual(self.mounts("tscale")[token], "./compose/example.token")
        self.assertTrue(os.path.isfile(os.path.join(DEPLOY, "compose", "example.token")))
        self.assertTrue(self.s["prometheus"]["image"].startswith("prom/prometheus"))
        self.assertTrue(self.s["grafana"]["image"].startswith("grafana/grafana"))
        d = self.s["demo"]
        self.assertEqual(d["profiles"], ["demo"])
        cmd = d["entrypoint"] + d["command"]
        self.assertIn("--server", cmd)
        self.assertEqual(cmd[cmd.index("--server") + 1], "tscale:50051")
        # python3 demo_with_token.py train_digits.py ...: the launcher and the token are mounted.
        dm = self.mounts("demo")
        self.assertEqual(dm[cmd[1]], "./compose/demo_with_token.py")
        self.assertTrue(cmd[2].endswith("train_digits.py"))
        self.assertEqual(dm[d["environment"]["TSCALE_AUTH_TOKEN_FILE"]], "./compose/example.token")

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
        check_compose_prometheus(self, self.mounts("prometheus"), "prometheus.yml", ["tscale:9090"])

    def test_grafana_provisioning(self):
        check_compose_grafana(self, self.s, self.mounts("grafana"))


def check_compose_prometheus(test, m, config_name, targets):
    """The compose Prometheus's config (mounts m: path in the container -> source) is
    deploy/compose/<config_name>, scrapes `targets` as job tscale every 5 s, has the project's rule
    files mounted beside it, and passes `promtool check config` with them."""
    cfg_in = "/etc/prometheus/prometheus.yml"
    cfg_src = os.path.normpath(os.path.join(DEPLOY, m[cfg_in]))
    test.assertEqual(cfg_src, os.path.join(DEPLOY, "compose", config_name))
    cfg = load_one(cfg_src)
    test.assertEqual(cfg["global"]["scrape_interval"], "5s")
    job = cfg["scrape_configs"][0]
    test.assertEqual(job["job_name"], "tscale")
    test.assertEqual(job["static_configs"][0]["targets"], targets)
    project = load_one(os.path.join(DEPLOY, "prometheus", "prometheus.yml"))
    test.assertEqual(cfg["rule_files"], project["rule_files"])
    # Every rule file, as the container sees it, is the project's rules.yml.
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(cfg_src, os.path.join(tmp, "prometheus.yml"))
        for rf in cfg["rule_files"]:
            in_container = os.path.normpath(os.path.join(os.path.dirname(cfg_in), rf))
            test.assertIn(in_container, m, f"rule file {rf} is not mounted")
            src = os.path.normpath(os.path.join(DEPLOY, m[in_container]))
            test.assertEqual(src, os.path.join(DEPLOY, "prometheus", "rules.yml"))
            shutil.copy(src, os.path.join(tmp, rf))
        r = subprocess.run([PROMTOOL, "check", "config", os.path.join(tmp, "prometheus.yml")],
                           capture_output=True, text=True, timeout=60)
        test.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        test.assertIn("rule files found", r.stdout + r.stderr)


def check_compose_grafana(test, services, m):
    """Grafana's provisioning (mounts m) finds the data source and the dashboard."""
    ds_dir = os.path.normpath(os.path.join(DEPLOY, m["/etc/grafana/provisioning/datasources"]))
    db_dir = os.path.normpath(os.path.join(DEPLOY, m["/etc/grafana/provisioning/dashboards"]))
    ds = load_one(os.path.join(ds_dir, "prometheus.yml"))["datasources"]
    test.assertEqual(len(ds), 1)
    test.assertEqual((ds[0]["uid"], ds[0]["type"], ds[0]["url"], ds[0]["isDefault"]),
                     ("prometheus", "prometheus", "http://prometheus:9090", True))
    prov = load_one(os.path.join(db_dir, "tscale.yml"))["providers"][0]
    path_in = prov["options"]["path"]
    test.assertIn(path_in, m, "the dashboards folder the provider reads is not mounted")
    src = os.path.normpath(os.path.join(DEPLOY, m[path_in]))
    test.assertTrue(os.path.isfile(os.path.join(src, "tscale.json")))
    test.assertEqual(src, os.path.join(DEPLOY, "grafana", "dashboards"))
    env = services["grafana"]["environment"]
    test.assertEqual(str(env["GF_AUTH_ANONYMOUS_ENABLED"]).lower(), "true")
    test.assertEqual(env["GF_AUTH_ANONYMOUS_ORG_ROLE"], "Viewer")
    home = env.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        test.assertTrue(home.startswith(path_in + "/"))
        test.assertTrue(os.path.isfile(os.path.join(src, home[len(path_in) + 1:])))
    with open(os.path.join(src, "tscale.json")) as f:
        dash = json.load(f)
    dsvar = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    test.assertEqual(dsvar[0]["query"], ds[0]["type"])


class ComposeGroupTest(unittest.TestCase):
    """deploy/compose-group.yaml: two CPU ranks of one group, Prometheus scraping both, Grafana."""

    @classmethod
    def setUpClass(cls):
        cls.c = compose_group()
        cls.s = cls.c["services"]
        cls.ranks = group_ranks(cls.s)

    def mounts(self, service):
        out = {}
        for v in self.s[service].get("volumes", []):
            src, dst = v.split(":")[:2]
            out[dst] = src
        return out

    def test_ranks(self):
        n = len(self.ranks)
        self.assertEqual(n, 2)
        self.assertEqual(sorted(self.ranks), list(range(n)))
        # No top-level name (docker-compose 1.29 rejects it): the usage lines name each project
        # with -p, and the two stacks' volumes differ even under one project name.
        self.assertNotIn("name", self.c)
        self.assertNotIn("name", compose())
        projects = []
        for f in ("compose.yaml", "compose-group.yaml"):
            with open(os.path.join(DEPLOY, f)) as fh:
                projects.append(set(re.findall(r"docker compose -p (\S+) -f deploy/" + f, fh.read())))
            self.assertEqual(len(projects[-1]), 1, f)
        self.assertNotEqual(projects[0], projects[1])
        self.assertFalse(set(self.c["volumes"]) & set(compose()["volumes"]))
        stores, api, volumes = set(), set(), set()
        for r, (name, cmd) in self.ranks.items():
            with self.subTest(rank=r):
                svc = self.s[name]
                self.assertEqual(svc["build"], {"context": "..", "target": "cpu"})
                self.assertEqual(flag_value(cmd, "--group-size"), str(n))
                self.assertGreater(int(flag_value(cmd, "--group-timeout-seconds")), 0)
                stores.add(flag_value(cmd, "--group-store"))
                # Published on the host's loopback only, the API port alone: the store and the
                # ranks' exchanges stay on the compose network.
                ports = [str(p) for p in svc["ports"]]
                self.assertEqual(len(ports), 1)
                self.assertTrue(ports[0].startswith("127.0.0.1:"), ports)
                self.assertEqual(ports[0].rsplit(":", 1)[1],
                                 flag_value(cmd, "--listen").rsplit(":", 1)[1])
                api.add(ports[0].split(":")[1])
                ck = flag_value(cmd, "--checkpoint-dir")
                vol = self.mounts(name)[ck]
                self.assertIn(vol, self.c["volumes"], "checkpoints on a named volume")
                volumes.add(vol)
                token = flag_value(cmd, "--auth-token-file")
                self.assertEqual(self.mounts(name)[token], "./compose/example.token")
        self.assertEqual(len(api), n, "each rank its own host port")
        self.assertEqual(len(volumes), n, "each rank its own checkpoints")
        # Every rank meets at rank 0's service, on a port no rank serves anything else on.
        self.assertEqual(len(stores), 1)
        host, port = stores.pop().rsplit(":", 1)
        self.assertEqual(host, self.ranks[0][0])
        for _, cmd in self.ranks.values():
            for f in ("--listen", "--metrics-listen"):
                self.assertNotEqual(flag_value(cmd, f).rsplit(":", 1)[1], port)

    def test_prometheus_scrapes_every_rank(self):
        targets = [f"{name}:{flag_value(cmd, '--metrics-listen').rsplit(':', 1)[1]}"
                   for _, (name, cmd) in sorted(self.ranks.items())]
        check_compose_prometheus(self, self.mounts("prometheus"), "prometheus-group.yml", targets)
        self.assertEqual(set(self.s["prometheus"]["depends_on"]),
                         {n for n, _ in self.ranks.values()})
        for name in ("prometheus", "grafana"):
            for p in self.s[name]["ports"]:
                self.assertTrue(str(p).startswith("127.0.0.1:"), f"{name}: {p}")
        self.assertEqual(self.s["prometheus"]["image"],
                         compose()["services"]["prometheus"]["image"])

    def test_grafana_provisioning(self):
        check_compose_grafana(self, self.s, self.mounts("grafana"))
        self.assertEqual(self.s["grafana"], compose()["services"]["grafana"])


# ---------------------------------------------------------------------------------------------
# The commands: the image's ENTRYPOINT + CMD and HEALTHCHECK, each Kubernetes variant's server args
# and probes, compose's server and demo launcher, against real servers

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(test, argv, tmp):
    """tscale-server started with argv, up until it prints its listening line; SIGTERM at the end
    must exit 0."""
    fd, path = tempfile.mkstemp(prefix="server-", suffix=".log", dir=tmp)
    os.close(fd)
    # The server appends to its own open file, and this side reads through another: one shared
    # file offset, moved back by a reader's seek, would let the server's next line overwrite the
    # listening line before it is read.
    log = open(path, "a")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while True:
            with open(path) as f:
                text = f.read()
            if "tscale-server: listening on" in text:
                break
            test.assertIsNone(proc.poll(), f"server exited: {text}")
            test.assertLess(time.time(), deadline, f"no listening line: {text}")
            time.sleep(0.1)
        yield proc
        proc.send_signal(signal.SIGTERM)
        test.assertEqual(proc.wait(timeout=60), 0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def run_cli(argv, **kw):
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, **kw)


def connection(cmd):
    """The --server and TLS options of a CLI command line."""
    out = []
    for name in ("--server", "--tls-ca", "--tls-cert", "--tls-key"):
        v = flag_value(cmd, name)
        if v is not None:
            out += [name, v]
    return out


def wait_until(test, what, fn, timeout=60):
    deadline = time.time() + timeout
    while not fn():
        test.assertLess(time.time(), deadline, f"{what}: not within {timeout} s")
        time.sleep(0.5)


def listens(port):
    """A TCP probe: something accepts connections on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return True
    except OSError:
        return False


def scrape(port):
    """{(name, labels text): value} of the plain-HTTP metrics at 127.0.0.1:port."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    out = {}
    for m in re.finditer(r"(?m)^(\w+)(\{[^}]*\})? (\S+)$", text):
        out[(m.group(1), m.group(2) or "")] = float(m.group(3))
    return out


_UTS = {}


def uts_prefix(hostname):
    """The command prefix that runs a program with `hostname` as its host name (a UTS namespace of
    its own, as a pod has), or None where no such namespace can be made (no unshare, or not
    permitted)."""
    if "prefix" not in _UTS:
        _UTS["prefix"] = None
        for opts in (["--uts"], ["--uts", "--map-root-user"]):
            if shutil.which("unshare") is None:
                break
            r = subprocess.run(["unshare", *opts, "sh", "-c", "hostname tscale-0 && hostname"],
                               capture_output=True, text=True, timeout=30)
            if r.returncode == 0 and r.stdout.strip() == "tscale-0":
                _UTS["prefix"] = ["unshare", *opts]
                break
    if _UTS["prefix"] is None:
        return None
    return _UTS["prefix"] + ["sh", "-c", 'hostname "$0" && exec "$@"', hostname]


# A model for the group tests' clients.
GROUP_SPEC = {"layers": [{"name": "fc", "ternary_linear": {"in_features": 16, "out_features": 8}}]}


def train_group_with_cli(test, tmp, conn, n):
    """create, train, info and server-info through `tscale --servers` (conn: the CLI's connection
    options); the group's n ranks must agree."""
    spec = os.path.join(tmp, "group-spec.json")
    with open(spec, "w") as f:
        json.dump(GROUP_SPEC, f)

    def cli(*args):
        r = run_cli([CLI_BIN] + conn + list(args))
        test.assertEqual(r.returncode, 0, f"tscale {' '.join(args)}: {r.stdout}{r.stderr}")
        return r.stdout

    cli("create", "g", "--spec", spec, "--seed", "3")
    test.assertIn("(step 0 -> 3)", cli("train", "g", "--steps", "3", "--batch", "8"))
    test.assertRegex(cli("info", "g"), r"step: +3\n")
    info = cli("server-info")
    for r in range(n):
        test.assertIn(f"rank {r} of {n}, formed", info)


def check_group_metrics(test, metrics_ports, updates):
    """Each rank's tscale_group series, and its exchanges after `updates` updates of the group."""
    n = len(metrics_ports)
    for r, port in enumerate(metrics_ports):
        m = scrape(port)
        test.assertEqual(m[("tscale_group", '{field="size"}')], n)
        test.assertEqual(m[("tscale_group", '{field="rank"}')], r)
        test.assertEqual(m[("tscale_group", '{field="formed"}')], 1)
        test.assertEqual(m[("tscale_group_exchange_seconds_count", "")], updates)
        test.assertGreater(m[("tscale_group_exchange_bytes_total", "")], 0)
        for reason in ("mismatch", "refused", "unavailable"):
            test.assertEqual(m[("tscale_group_call_failures_total", f'{{reason="{reason}"}}')], 0)


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
            with running_server(self, [bins[entry[0]]] + entry[1:] + args, tmp):
                r = run_cli(hc)
                self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            r = run_cli(hc)
            self.assertNotEqual(r.returncode, 0, "healthcheck passed against a stopped server")


class KubernetesCommandsTest(unittest.TestCase):
    """Each variant's StatefulSet run as commands: the server with the rendered args, the paths in
    the pod replaced by the Secret files they come from (the test's certificates and tokens), and
    the probes (exec probes as they are; native gRPC probes as a plaintext `tscale health`)."""

    def run_variant(self, variant):
        cl = cluster()
        docs = cl.docs[variant]
        _, pod, c = statefulset(docs)
        files = pod_files(docs, pod, c)
        args = expanded_args(docs, c)
        grpc_port, metrics_port = free_port(), free_port()
        with tempfile.TemporaryDirectory() as tmp:
            ckdir = os.path.join(tmp, "checkpoints")
            os.mkdir(ckdir)
            ck_in_pod = flag_value(args, "--checkpoint-dir")

            def host(a):
                a = files.get(a, a)
                a = re.sub(r":50051$", f":{grpc_port}", a)
                a = re.sub(r":9090$", f":{metrics_port}", a)
                return ckdir if a == ck_in_pod else a

            server = [SERVER_BIN] + [host(a) for a in args]
            self.assertTrue(all(not a.startswith("/etc/") for a in server), server)
            probes = {}
            for p in PROBES:
                if "exec" in c[p]:
                    cmd = c[p]["exec"]["command"]
                    self.assertEqual(cmd[0], "tscale")
                    probes[p] = [CLI_BIN] + [host(a) for a in cmd[1:]]
                else:
                    probes[p] = [CLI_BIN, "--server", f"127.0.0.1:{grpc_port}", "--timeout", "3",
                                 "--retry-seconds", "0", "health"]
            conn = connection(probes["readinessProbe"])
            tls = flag_value(args, "--tls-cert") is not None
            with running_server(self, server, tmp):
                for p, cmd in probes.items():
                    r = run_cli(cmd)
                    self.assertEqual(r.returncode, 0, f"{variant} {p}: {r.stdout}{r.stderr}")
                r = run_cli([CLI_BIN] + conn + ["models"])
                if flag_value(args, "--auth-token-file") is not None:
                    self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
                    self.assertIn("UNAUTHENTICATED", r.stderr)
                    r = run_cli([CLI_BIN] + conn + ["--auth-token-file", cl.client_token, "models"])
                self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
                if tls:
                    r = run_cli([CLI_BIN, "--server", f"127.0.0.1:{grpc_port}", "--timeout", "3",
                                 "health"])
                    self.assertEqual(r.returncode, 1, "plaintext health against TLS passed")
                if flag_value(args, "--tls-client-ca") is not None:
                    r = run_cli([CLI_BIN, "--server", f"localhost:{grpc_port}", "--tls-ca",
                                 os.path.join(cl.certs, "ca.pem"), "--timeout", "3", "health"])
                    self.assertEqual(r.returncode, 1, "mTLS: a client without a certificate passed")
                # The PodMonitor's plain-HTTP scrape, whatever the API port speaks.
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                            timeout=30) as resp:
                    self.assertEqual(resp.status, 200)
                    self.assertIn("tscale_", resp.read().decode())
            r = run_cli(probes["readinessProbe"])
            self.assertEqual(r.returncode, 1, "readiness passed against a stopped server")
        return tls

    def test_base_plaintext(self):
        self.assertFalse(self.run_variant("base"))

    def test_default_tls_and_tokens(self):
        self.assertTrue(self.run_variant("default"))

    def test_mtls(self):
        self.assertTrue(self.run_variant("mtls"))

    def test_group(self):
        """The group variant's pods as processes: each rank runs the rendered args with its pod's
        host name, tscale-R, in a UTS namespace of its own (where none can be made: --group-rank R
        in place of --group-rank-from-hostname), the store at 127.0.0.1 in place of pod 0's name.
        Until rank 0 comes, the other ranks listen (the TCP probes pass) and are not ready; then
        every probe passes, a client reaches the group with --servers, TLS and a token, and each
        rank's metrics show the group."""
        cl = cluster()
        docs = cl.docs["group"]
        sts, pod, c = statefulset(docs)
        files = pod_files(docs, pod, c)
        args = expanded_args(docs, c)
        n = sts["spec"]["replicas"]
        ck_in_pod = flag_value(args, "--checkpoint-dir")
        store_in_pod = flag_value(args, "--group-store")
        store = f"127.0.0.1:{free_port()}"
        readiness = c["readinessProbe"]["exec"]["command"]
        if uts_prefix("tscale-0") is None:
            print("\n  group: no UTS namespace can be made here: --group-rank R in place of "
                  "--group-rank-from-hostname", flush=True)
        with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
            ranks = []
            for r in range(n):
                grpc_port, metrics_port = free_port(), free_port()
                ckdir = os.path.join(tmp, f"checkpoints-{r}")
                os.mkdir(ckdir)

                def host(a):
                    a = files.get(a, a)
                    if a == store_in_pod:
                        return store
                    a = re.sub(r":50051$", f":{grpc_port}", a)
                    a = re.sub(r":9090$", f":{metrics_port}", a)
                    return ckdir if a == ck_in_pod else a

                server = [SERVER_BIN] + [host(a) for a in args]
                prefix = uts_prefix(f"{sts['metadata']['name']}-{r}")
                if prefix is None:
                    i = server.index("--group-rank-from-hostname")
                    server[i:i + 2] = ["--group-rank", str(r)]
                else:
                    server = prefix + server
                ranks.append((server, [CLI_BIN] + [host(a) for a in readiness[1:]], grpc_port,
                              metrics_port))
            for server, ready, grpc_port, _ in ranks[1:]:
                stack.enter_context(running_server(self, server, tmp))
                self.assertTrue(listens(grpc_port), "startup and liveness")
                r = run_cli(ready)
                self.assertEqual(r.returncode, 1, "ready without rank 0: " + r.stdout + r.stderr)
            stack.enter_context(running_server(self, ranks[0][0], tmp))
            for _, ready, grpc_port, _ in ranks:
                wait_until(self, "readiness of every rank", lambda: run_cli(ready).returncode == 0)
                self.assertTrue(listens(grpc_port), "startup and liveness")
            servers = ",".join(f"localhost:{p}" for _, _, p, _ in ranks)
            conn = ["--servers", servers, "--tls-ca", os.path.join(cl.certs, "ca.pem")]
            r = run_cli([CLI_BIN] + conn + ["server-info"])
            self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
            self.assertIn("UNAUTHENTICATED", r.stderr)
            train_group_with_cli(self, tmp, conn + ["--auth-token-file", cl.client_token], n)
            check_group_metrics(self, [m for _, _, _, m in ranks], 3)


class ComposeCommandsTest(unittest.TestCase):
    """compose's tscale command with its token file; the image's HEALTHCHECK without a token; the
    demo's launcher giving the example the token."""

    EXAMPLE = (
        "import argparse, sys\n"
        "import tscale\n"
        "p = argparse.ArgumentParser()\n"
        "p.add_argument('--server')\n"
        "a = p.parse_args()\n"
        "try:\n"
        "    with tscale.Client(a.server, timeout=10, retries=0) as c:\n"
        "        print('models', len(c.list_models()))\n"
        "except tscale.Error as e:\n"
        "    print('error', e)\n"
        "    sys.exit(3)\n")

    def test_tokens_healthcheck_and_demo(self):
        s = compose()["services"]
        t, d = s["tscale"], s["demo"]

        def mounts(svc):
            return {v.split(":")[1]: os.path.normpath(os.path.join(DEPLOY, v.split(":")[0]))
                    for v in svc.get("volumes", []) if v.startswith("./")}

        tm, dm = mounts(t), mounts(d)
        cmd = t["command"]
        token = tm[flag_value(cmd, "--auth-token-file")]
        self.assertEqual(dm[d["environment"]["TSCALE_AUTH_TOKEN_FILE"]], token)
        launcher = dm[d["entrypoint"][1]]
        by_name, _ = parse_dockerfile()
        health = healthcheck_cmd(last(by_name, "cpu", "HEALTHCHECK"))
        grpc_port, metrics_port = free_port(), free_port()
        addr = f"127.0.0.1:{grpc_port}"
        with tempfile.TemporaryDirectory() as tmp:
            ckdir = os.path.join(tmp, "checkpoints")
            os.mkdir(ckdir)
            ck_in = flag_value(cmd, "--checkpoint-dir")
            args = []
            for a in cmd:
                a = tm.get(a, a)
                a = re.sub(r":50051$", f":{grpc_port}", a)
                a = re.sub(r":9090$", f":{metrics_port}", a)
                args.append(ckdir if a == ck_in else a)
            example = os.path.join(tmp, "example.py")
            with open(example, "w") as f:
                f.write(self.EXAMPLE)
            env = dict(os.environ)
            env.setdefault("PYTHONPATH", os.path.join(os.path.dirname(SERVER_BIN), "..", "python"))
            with running_server(self, [SERVER_BIN] + args, tmp):
                r = run_cli([CLI_BIN] + [a.replace(":50051", f":{grpc_port}") for a in health[1:]])
                self.assertEqual(r.returncode, 0, "HEALTHCHECK needs no token: " + r.stderr)
                r = run_cli([CLI_BIN, "--server", addr, "models"])
                self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
                self.assertIn("UNAUTHENTICATED", r.stderr)
                r = run_cli([CLI_BIN, "--server", addr, "--auth-token-file", token, "models"])
                self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
                r = run_cli(["/usr/bin/python3", example, "--server", addr], env=env)
                self.assertEqual(r.returncode, 3, r.stdout + r.stderr)
                self.assertIn("UNAUTHENTICATED", r.stdout)
                env["TSCALE_AUTH_TOKEN_FILE"] = token
                r = run_cli(["/usr/bin/python3", launcher, example, "--server", addr], env=env)
                self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
                self.assertIn("models 0", r.stdout)


class ComposeGroupCommandsTest(unittest.TestCase):
    """compose-group's ranks as processes, the store at 127.0.0.1 in place of rank 0's service
    name: the image's HEALTHCHECK fails on a rank until the group forms and passes after; calls
    without the token are refused; the CLI with --servers and tscale.ReplicaGroup, with the token,
    train the group."""

    EXAMPLE = (
        "import sys\n"
        "import numpy as np\n"
        "import tscale\n"
        "spec = {'layers': [{'name': 'fc',\n"
        "                    'ternary_linear': {'in_features': 16, 'out_features': 8}}]}\n"
        "token = open(sys.argv[2]).read().strip()\n"
        "with tscale.ReplicaGroup(sys.argv[1].split(','), token=token) as group:\n"
        "    group.create_model('p', spec, seed=1)\n"
        "    x = np.arange(6 * 16, dtype=np.float32).reshape(6, 16) % 5 - 2\n"
        "    r = group.train_step('p', x, np.zeros((6, 8), np.float32), expected_step=0)\n"
        "    states = group.export_states('p')\n"
        "    print('step', r.step, 'identical', all(st == states[0] for st in states))\n")

    def test_group(self):
        services = compose_group()["services"]
        ranks = group_ranks(services)
        n = len(ranks)
        by_name, _ = parse_dockerfile()
        health = healthcheck_cmd(last(by_name, "cpu", "HEALTHCHECK"))
        store = f"127.0.0.1:{free_port()}"
        env = dict(os.environ)
        env.setdefault("PYTHONPATH", os.path.join(os.path.dirname(SERVER_BIN), "..", "python"))

        def mounts(name):
            return {v.split(":")[1]: os.path.normpath(os.path.join(DEPLOY, v.split(":")[0]))
                    for v in services[name].get("volumes", []) if v.startswith("./")}

        name, cmd = ranks[0]
        token = mounts(name)[flag_value(cmd, "--auth-token-file")]  # ComposeGroupTest: the same
        with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
            started = []
            for r in sorted(ranks, reverse=True):  # rank 0 last
                name, cmd = ranks[r]
                files = mounts(name)
                grpc_port, metrics_port = free_port(), free_port()
                ckdir = os.path.join(tmp, f"checkpoints-{r}")
                os.mkdir(ckdir)
                ck_in = flag_value(cmd, "--checkpoint-dir")
                store_in = flag_value(cmd, "--group-store")
                args = []
                for a in cmd:
                    a = files.get(a, a)
                    if a == store_in:
                        a = store
                    a = re.sub(r":50051$", f":{grpc_port}", a)
                    a = re.sub(r":9090$", f":{metrics_port}", a)
                    args.append(ckdir if a == ck_in else a)
                hc = [CLI_BIN] + [a.replace(":50051", f":{grpc_port}") for a in health[1:]]
                stack.enter_context(running_server(self, [SERVER_BIN] + args, tmp))
                if r != 0:
                    self.assertEqual(run_cli(hc).returncode, 1, "healthy without rank 0")
                started.insert(0, (hc, grpc_port, metrics_port))
            for hc, _, _ in started:
                wait_until(self, "the HEALTHCHECK of every rank",
                           lambda: run_cli(hc).returncode == 0)
            servers = ",".join(f"127.0.0.1:{p}" for _, p, _ in started)
            r = run_cli([CLI_BIN, "--servers", servers, "server-info"])
            self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
            self.assertIn("UNAUTHENTICATED", r.stderr)
            train_group_with_cli(self, tmp, ["--servers", servers, "--auth-token-file", token], n)
            example = os.path.join(tmp, "example.py")
            with open(example, "w") as f:
                f.write(self.EXAMPLE)
            r = run_cli(["/usr/bin/python3", example, servers, token], env=env)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            self.assertIn("step 1 identical True", r.stdout)
            check_group_metrics(self, [m for _, _, m in started], 3 + 1)


if __name__ == "__main__":
    unittest.main(verbosity=2)
