"""The built images, run with podman: what deploy_files_test checks against the bare binaries,
here against the containers a user runs.

Run by scripts/images.sh (scripts/test.sh --images), which builds the images with buildah and sets
podman's storage and settings in the environment. Needs the images (TSCALE_IMAGE_CPU,
TSCALE_IMAGE_DEMO), podman, the host's CLI (TSCALE_CLI_BIN) and Python client (PYTHONPATH), and
python3-yaml and openssl for the Kubernetes variants.

- the cpu image with its default command: health from the host, the HEALTHCHECK command, the user
  and group (10001, named tscale), /metrics, training from the host's CLI and from the Python
  client inside the image, SIGTERM ending the container within the grace period with status 0;
- a checkpoint on a named volume across stop/start, and in a new container;
- --read-only with bearer tokens: calls need a token, health does not, checkpoints still written;
- each Kubernetes variant (base, default, mtls; deploy/k8s rendered as deploy_files_test does) as
  a container: the rendered args, the Secret files at their mount paths, the container's security
  context (user, read-only root, no capabilities, no privilege escalation), its probes run inside;
- deploy/compose.yaml's tscale and demo services as a pod of the built images (Prometheus and
  Grafana images are not pulled: no registry), the demo's own command.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.request
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tests", "deploy"))

import deploy_files_test as deploy  # noqa: E402  (the kustomize emulation and helpers)

CLI = os.environ.get("TSCALE_CLI_BIN", os.path.join(ROOT, "build", "bin", "tscale"))
CPU = os.environ.get("TSCALE_IMAGE_CPU", "localhost/tscale:cpu")
DEMO = os.environ.get("TSCALE_IMAGE_DEMO", "localhost/tscale:demo")
SPEC = {"layers": [{"name": "fc", "ternary_linear": {"in_features": 16, "out_features": 8}}]}
TOKEN = "image-test-token-0123456789"


# What the kubelet's gRPC probe asks: grpc.health.v1 Check of one service, in plaintext.
GRPC_PROBE = ("import sys, tscale\n"
              "status = tscale.Client(sys.argv[1], timeout=5, retries=0).health(sys.argv[2])\n"
              "print(status)\n"
              "sys.exit(status != 'SERVING')\n")


TCP_PROBE = ("import socket, sys\n"
             "socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=5).close()\n")


def podman(*args, check=True, timeout=300):
    r = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
    return r


def cli(*args, timeout=120):
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout)


def name(kind):
    return f"tscale-it-{kind}-{uuid.uuid4().hex[:6]}"


class Containers(unittest.TestCase):
    """Starts containers and volumes that are removed after each test."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="tscale-images-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        with open(os.path.join(self.tmp, "spec.json"), "w") as f:
            json.dump(SPEC, f)
        self.spec = os.path.join(self.tmp, "spec.json")

    def volume(self):
        v = name("vol")
        podman("volume", "create", v)
        self.addCleanup(podman, "volume", "rm", "-f", v, check=False)
        return v

    def run_container(self, image, *args, options=()):
        """podman run -d with the API and metrics ports published on 127.0.0.1; the container's
        name, and the host's (API address, metrics port)."""
        n = name("c")
        podman("run", "-d", "--name", n, "-p", "127.0.0.1::50051", "-p", "127.0.0.1::9090",
               *options, image, *args)
        self.addCleanup(podman, "rm", "-f", "-t", "0", n, check=False)
        return n, self.ports(n)

    def ports(self, n):
        api = podman("port", n, "50051/tcp").stdout.strip().splitlines()[0]
        metrics = int(podman("port", n, "9090/tcp").stdout.strip().splitlines()[0].rsplit(":")[1])
        return api, metrics

    def wait_healthy(self, address, extra=(), timeout=60):
        """Seconds until `tscale health` from the host passes."""
        start = time.monotonic()
        while True:
            r = cli("--server", address, *extra, "--timeout", "3", "--retry-seconds", "0",
                    "health")
            if r.returncode == 0:
                return time.monotonic() - start
            self.assertLess(time.monotonic() - start, timeout,
                            f"not healthy within {timeout} s: {r.stdout}{r.stderr}")
            time.sleep(0.2)

    def assert_cli(self, *args):
        r = cli(*args)
        self.assertEqual(r.returncode, 0, f"tscale {' '.join(args)}: {r.stdout}{r.stderr}")
        return r.stdout

    def logs(self, n):
        r = podman("logs", n, check=False)
        return r.stdout + r.stderr

    def stop(self, n, grace=60):
        """podman stop (SIGTERM, then SIGKILL after `grace` s): its seconds and exit status."""
        start = time.monotonic()
        podman("stop", "-t", str(grace), n, timeout=grace + 60)
        seconds = time.monotonic() - start
        code = int(podman("inspect", "--format", "{{.State.ExitCode}}", n).stdout.strip())
        return seconds, code


class CpuImageTest(Containers):

    def test_default_command(self):
        n, (api, metrics) = self.run_container(CPU)
        seconds = self.wait_healthy(api)
        print(f"\nimages: cpu healthy {seconds:.1f} s after podman run", flush=True)
        # The image's HEALTHCHECK, kept by the docker format, passes.
        health = json.loads(podman("container", "inspect", "--format",
                                   "{{json .Config.Healthcheck}}", n).stdout)
        self.assertEqual(health["Test"][1:], ["tscale", "--server", "127.0.0.1:50051",
                                              "--timeout", "3", "--retry-seconds", "0", "health"])
        r = podman("healthcheck", "run", n, check=False)
        self.assertEqual(r.returncode, 0, f"HEALTHCHECK: {r.stdout}{r.stderr}")
        # Not root; the uid and gid have names.
        self.assertEqual(podman("exec", n, "id").stdout.strip(),
                         "uid=10001(tscale) gid=10001(tscale) groups=10001(tscale)")
        self.assertEqual(podman("inspect", "--format", "{{.Config.User}}", CPU).stdout.strip(),
                         "10001:10001")
        # Training from the host's CLI, then from the Python client inside the image.
        self.assert_cli("--server", api, "create", "m", "--spec", self.spec, "--seed", "1")
        self.assertIn("(step 0 -> 3)",
                      self.assert_cli("--server", api, "train", "m", "--steps", "3",
                                      "--batch", "8"))
        code = ("import numpy as np, tscale\n"
                "c = tscale.Client('127.0.0.1:50051')\n"
                "x = np.ones((4, 16), np.float32); y = np.zeros((4, 8), np.float32)\n"
                "print(c.train_step('m', x, y, expected_step=3).step)\n")
        r = podman("exec", n, "python3", "-c", code)
        self.assertEqual(r.stdout.strip(), "4", r.stderr)
        self.assertRegex(self.assert_cli("--server", api, "info", "m"), r"step: +4\n")
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=30) as resp:
            text = resp.read().decode()
        self.assertRegex(text, r'(?m)^tscale_\w+\{[^}]*model="m"')
        # SIGTERM: the server saves and exits 0, well within the grace period.
        seconds, code = self.stop(n)
        self.assertEqual(code, 0, self.logs(n))
        self.assertLess(seconds, 30, self.logs(n))
        print(f"images: SIGTERM: exit 0 after {seconds:.1f} s", flush=True)
        # A stopped server fails the HEALTHCHECK's command.
        r = cli("--server", api, "--timeout", "3", "--retry-seconds", "0", "health")
        self.assertNotEqual(r.returncode, 0)

    def test_checkpoint_volume_survives_stop_start(self):
        v = self.volume()
        n, (api, _) = self.run_container(
            CPU, options=("-v", f"{v}:/var/lib/tscale/checkpoints"))
        self.wait_healthy(api)
        self.assert_cli("--server", api, "create", "m", "--spec", self.spec, "--seed", "2")
        self.assert_cli("--server", api, "train", "m", "--steps", "5", "--batch", "8")
        self.assert_cli("--server", api, "export", "m", os.path.join(self.tmp, "a"))
        self.assertEqual(self.stop(n)[1], 0, self.logs(n))
        podman("start", n)
        api, _ = self.ports(n)  # a restarted container may publish other host ports
        self.wait_healthy(api)
        self.assertRegex(self.assert_cli("--server", api, "info", "m"), r"step: +5\n")
        self.assert_cli("--server", api, "export", "m", os.path.join(self.tmp, "b"))
        with open(os.path.join(self.tmp, "a"), "rb") as a, open(os.path.join(self.tmp, "b"),
                                                                 "rb") as b:
            self.assertEqual(a.read(), b.read(), "the state after stop/start differs")
        self.assertEqual(self.stop(n)[1], 0)
        # A new container on the same volume has the model too.
        n2, (api2, _) = self.run_container(
            CPU, options=("-v", f"{v}:/var/lib/tscale/checkpoints"))
        self.wait_healthy(api2)
        self.assertRegex(self.assert_cli("--server", api2, "info", "m"), r"step: +5\n")

    def test_read_only_with_tokens(self):
        tokens = os.path.join(self.tmp, "tokens")
        with open(tokens, "w") as f:
            f.write(TOKEN + "\n")
        os.chmod(tokens, 0o644)
        v = self.volume()
        n, (api, _) = self.run_container(
            CPU, "--listen", "0.0.0.0:50051", "--metrics-listen", "0.0.0.0:9090",
            "--checkpoint-dir", "/var/lib/tscale/checkpoints", "--auth-token-file",
            "/etc/tscale/tokens",
            options=("--read-only", "-v", f"{v}:/var/lib/tscale/checkpoints",
                     "-v", f"{tokens}:/etc/tscale/tokens:ro"))
        self.wait_healthy(api)  # health needs no token
        self.assertEqual(podman("healthcheck", "run", n, check=False).returncode, 0)
        r = cli("--server", api, "models")
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        self.assertIn("UNAUTHENTICATED", r.stderr)
        auth = ("--server", api, "--auth-token-file", tokens)
        self.assert_cli(*auth, "create", "m", "--spec", self.spec, "--seed", "3")
        self.assert_cli(*auth, "train", "m", "--steps", "2", "--batch", "8")
        self.assertIn("step 2", self.assert_cli(*auth, "save", "m"))
        self.assertNotEqual(podman("exec", n, "touch", "/usr/local/bin/x", check=False).returncode,
                            0, "the root file system is writable under --read-only")
        listing = podman("exec", n, "ls", "/var/lib/tscale/checkpoints/m").stdout
        self.assertTrue(listing.strip(), "no checkpoint on the volume")
        self.assertEqual(self.stop(n)[1], 0, self.logs(n))


class KubernetesImageTest(Containers):
    """Each variant's StatefulSet container as a podman container of the cpu image (the manifests
    name tscale:cuda, which needs NVIDIA's base image: the args, files and probes are the same)."""

    def pod_options(self, docs, pod, c, args):
        """podman run options for the pod's container: its Secret files at their mount paths
        (owned by the fsGroup, mode 0440, as Kubernetes mounts them), a volume for the checkpoint
        claim, tmpfs for emptyDirs, and the security context."""
        options = []
        for path, src in deploy.pod_files(docs, pod, c).items():
            copy = os.path.join(self.tmp, "secret-" + re.sub(r"\W", "_", path))
            if not os.path.exists(copy):
                shutil.copy(src, copy)
                os.chown(copy, 0, pod["securityContext"]["fsGroup"])
                os.chmod(copy, 0o440)
            options += ["-v", f"{copy}:{path}:ro"]
        empty = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
        for m in c["volumeMounts"]:
            if m["mountPath"] == deploy.flag_value(args, "--checkpoint-dir"):
                options += ["-v", f"{self.volume()}:{m['mountPath']}"]
            elif m["name"] in empty:
                options += ["--tmpfs", f"{m['mountPath']}:rw,mode=1777"]
        sc = c["securityContext"]
        options += ["--user", f"{sc['runAsUser']}:{sc['runAsGroup']}",
                    "--group-add", str(pod["securityContext"]["fsGroup"])]
        if sc.get("readOnlyRootFilesystem"):
            options.append("--read-only")
        if sc.get("allowPrivilegeEscalation") is False:
            options += ["--security-opt", "no-new-privileges"]
        if "ALL" in sc.get("capabilities", {}).get("drop", []):
            options += ["--cap-drop", "ALL"]
        return options

    def probe(self, n, c, p):
        """The container's probe p run inside it as the kubelet would: its exit status and text."""
        if "exec" in c[p]:
            cmd = c[p]["exec"]["command"]
        elif "grpc" in c[p]:  # grpc.health.v1 Check of the probe's service, in plaintext
            cmd = ["python3", "-c", GRPC_PROBE, f"127.0.0.1:{c[p]['grpc']['port']}",
                   c[p]["grpc"].get("service", "")]
        else:  # tcpSocket
            cmd = ["python3", "-c", TCP_PROBE, str(c[p]["tcpSocket"]["port"])]
        r = podman("exec", n, *cmd, check=False)
        return r.returncode, r.stdout + r.stderr

    def connection(self, cl, args, port):
        conn = ["--server", f"localhost:{port}"]
        if deploy.flag_value(args, "--tls-cert") is not None:
            conn += ["--tls-ca", os.path.join(cl.certs, "ca.pem")]
        if deploy.flag_value(args, "--tls-client-ca") is not None:
            conn += ["--tls-cert", os.path.join(cl.certs, "client.pem"),
                     "--tls-key", os.path.join(cl.certs, "client.key")]
        return conn

    def grace(self, pod):
        return pod.get("terminationGracePeriodSeconds", 30)

    def run_variant(self, variant):
        cl = deploy.cluster()
        docs = cl.docs[variant]
        _, pod, c = deploy.statefulset(docs)
        args = deploy.expanded_args(docs, c)
        n, (api, metrics) = self.run_container(
            CPU, *args, options=self.pod_options(docs, pod, c, args))
        conn = self.connection(cl, args, api.rsplit(":", 1)[1])
        self.wait_healthy(conn[1], conn[2:])
        for p in deploy.PROBES:
            code, text = self.probe(n, c, p)
            self.assertEqual(code, 0, f"{variant} {p}: {text}")
        self.assertEqual(podman("exec", n, "id", "-u").stdout.strip(),
                         str(c["securityContext"]["runAsUser"]))
        if deploy.flag_value(args, "--auth-token-file") is not None:
            r = cli(*conn, "models")
            self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
            self.assertIn("UNAUTHENTICATED", r.stderr, self.logs(n))
            conn += ["--auth-token-file", cl.client_token]
        self.assert_cli(*conn, "create", "m", "--spec", self.spec, "--seed", "1")
        self.assertIn("(step 0 -> 2)",
                      self.assert_cli(*conn, "train", "m", "--steps", "2", "--batch", "8"))
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=30) as resp:
            self.assertIn("tscale_", resp.read().decode())
        seconds, code = self.stop(n, grace=self.grace(pod))
        self.assertEqual(code, 0, self.logs(n))
        print(f"\nimages: k8s {variant}: probes passed, trained, SIGTERM exit 0 after "
              f"{seconds:.1f} s", flush=True)

    def test_base(self):
        self.run_variant("base")

    def test_default_tls_and_tokens(self):
        self.run_variant("default")

    def test_mtls(self):
        self.run_variant("mtls")

    def test_group(self):
        """The group variant's pods as containers on a network of their own: host names tscale-R
        (the rank comes from it), pod 0's DNS name in the store address resolving to rank 0's
        address. Rank 1 alone is not ready; with rank 0 both are, the probes pass, and a client
        with TLS and a token trains the group through both ranks."""
        cl = deploy.cluster()
        docs = cl.docs["group"]
        sts, pod, c = deploy.statefulset(docs)
        args = deploy.expanded_args(docs, c)
        size = sts["spec"]["replicas"]
        store_host = deploy.flag_value(args, "--group-store").rsplit(":", 1)[0]
        net = name("net")
        subnet = f"10.236.{int(uuid.uuid4().hex[:2], 16)}"
        podman("network", "create", "--subnet", f"{subnet}.0/24", net)
        self.addCleanup(podman, "network", "rm", "-f", net, check=False)
        ranks = []
        for r in reversed(range(size)):  # the last rank first: it waits for rank 0
            hostname = f"{sts['metadata']['name']}-{r}"
            options = self.pod_options(docs, pod, c, args) + [
                "--network", net, "--ip", f"{subnet}.{10 + r}", "--hostname", hostname,
                "--add-host", f"{store_host}:{subnet}.10"]
            n, (api, metrics) = self.run_container(CPU, *args, options=options)
            ranks.insert(0, (n, api, metrics))
            if r == size - 1 and r != 0:
                time.sleep(2)
                for p in ("startupProbe", "livenessProbe"):
                    self.assertEqual(self.probe(n, c, p)[0], 0, f"rank {r} {p} without rank 0")
                code, text = self.probe(n, c, "readinessProbe")
                self.assertNotEqual(code, 0, f"rank {r} ready without rank 0: {text}")
        deadline = time.monotonic() + 120
        for r, (n, _, _) in enumerate(ranks):
            while True:
                code, text = self.probe(n, c, "readinessProbe")
                if code == 0:
                    break
                self.assertLess(time.monotonic(), deadline,
                                f"rank {r} not ready: {text}{self.logs(n)}")
                time.sleep(1)
            for p in deploy.PROBES:
                code, text = self.probe(n, c, p)
                self.assertEqual(code, 0, f"rank {r} {p}: {text}")
        conn = self.connection(cl, args, 0)
        conn[1] = ",".join(f"localhost:{api.rsplit(':', 1)[1]}" for _, api, _ in ranks)
        conn[0] = "--servers"
        deploy.train_group_with_cli(self, self.tmp, conn + ["--auth-token-file", cl.client_token],
                                    size)
        deploy.check_group_metrics(self, [m for _, _, m in ranks], 3)
        for n, _, _ in ranks:
            self.assertEqual(self.stop(n, grace=self.grace(pod))[1], 0, self.logs(n))
        print(f"\nimages: k8s group: {size} containers formed a group (rank from the host "
              f"name), probes passed, trained 3 steps through both", flush=True)


class ComposePodTest(Containers):
    """deploy/compose.yaml's tscale and demo services as one pod of the built images: the
    service's command, its named volume and token file; the demo's entrypoint, command,
    environment and files, reaching the server by its service name."""

    def test_compose_stack_as_a_pod(self):
        services = deploy.compose()["services"]
        compose_dir = os.path.join(ROOT, "deploy")
        pod = name("pod")
        podman("pod", "create", "--name", pod, "--add-host", "tscale:127.0.0.1",
               "-p", "127.0.0.1::50051", "-p", "127.0.0.1::9090")
        self.addCleanup(podman, "pod", "rm", "-f", "-t", "0", pod, check=False)

        def options(svc):
            out = []
            for m in svc.get("volumes", []):
                src, dst, *mode = m.split(":")
                if src.startswith("."):
                    src = os.path.normpath(os.path.join(compose_dir, src))
                else:
                    src = self.volume()
                out += ["-v", ":".join([src, dst] + mode)]
            for k, val in svc.get("environment", {}).items():
                out += ["-e", f"{k}={val}"]
            return out

        server = services["tscale"]
        n = name("tscale")
        podman("run", "-d", "--pod", pod, "--name", n, *options(server), CPU, *server["command"])
        self.addCleanup(podman, "rm", "-f", "-t", "0", n, check=False)
        api = podman("port", n, "50051/tcp").stdout.strip().splitlines()[0]
        self.wait_healthy(api)
        demo = services["demo"]
        d = name("demo")
        start = time.monotonic()
        r = podman("run", "--pod", pod, "--name", d, *options(demo), "--entrypoint",
                   demo["entrypoint"][0], DEMO, *demo["entrypoint"][1:], *demo["command"],
                   timeout=900)
        self.addCleanup(podman, "rm", "-f", "-t", "0", d, check=False)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertRegex(r.stdout, r"(?i)accuracy")
        print(f"\nimages: compose pod: the demo service trained in "
              f"{time.monotonic() - start:.0f} s; last lines:\n  "
              + "\n  ".join(r.stdout.strip().splitlines()[-3:]), flush=True)
        token = os.path.join(compose_dir, "compose", "example.token")
        models = self.assert_cli("--server", api, "--auth-token-file", token, "models")
        self.assertIn("digits", models)
        self.assertEqual(self.stop(n, grace=120)[1], 0, self.logs(n))


if __name__ == "__main__":
    unittest.main()
