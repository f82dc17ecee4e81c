"""The Python client against a tscale-server with TLS, mutual TLS and bearer tokens, through the
client's own options (tls_ca, tls_cert, tls_key, token_file, tls_server_name, as the CLI names
them): health stays open without a token, every other call needs one, a client without the CA,
the certificate or the token is refused, each TLS mismatch in its own words and without retries,
tls_server_name for a certificate of another name, a warning for a token sent in plaintext, the
server's start line about what is on, SIGHUP re-reads the tokens, and --reflection false turns
reflection off."""

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import unittest
import warnings
from unittest import mock

import grpc
import numpy as np

import tscale
from server_process import ErrorAssertions, ServerProcess
from tscale import client as client_module

HERE = os.path.dirname(os.path.abspath(__file__))
MAKE_CERTS = os.path.join(os.path.dirname(HERE), "integration", "make_test_certs.sh")
SPEC = {"layers": [{"name": "fc", "ternary_linear": {"in_features": 8, "out_features": 4}}]}


def setUpModule():
    global DIR
    if shutil.which("openssl") is None:
        raise unittest.SkipTest("openssl is not installed (scripts/install-deps.sh installs it)")
    DIR = tempfile.mkdtemp(prefix="tscale-security-")
    subprocess.run(["bash", MAKE_CERTS, DIR], check=True)


def tearDownModule():
    shutil.rmtree(DIR, ignore_errors=True)


def path(name):
    return os.path.join(DIR, name)


def write(name, text):
    with open(path(name), "w") as f:
        f.write(text)
    return path(name)


class MutualTlsWithTokensTest(ErrorAssertions, unittest.TestCase):
    """One server with --tls-cert, --tls-key, --tls-client-ca and --auth-token-file."""

    @classmethod
    def setUpClass(cls):
        write("tokens", "# clients\ntoken-one\n")
        cls.mtls = {"tls_ca": path("ca.pem"), "tls_cert": path("client.pem"),
                    "tls_key": path("client.key")}
        cls.server = ServerProcess(
            "--tls-cert", path("server.pem"), "--tls-key", path("server.key"),
            "--tls-client-ca", path("ca.pem"), "--auth-token-file", path("tokens"),
            client_kwargs=cls.mtls).start()
        # The server's certificate names localhost and 127.0.0.1.
        cls.address = cls.server.address

    @classmethod
    def tearDownClass(cls):
        status = cls.server.stop()
        if status != 0:
            raise AssertionError(f"tscale-server exited with {status}:\n{cls.server.log()}")
        cls.server.remove_logs()

    def client(self, **kwargs):
        kwargs.setdefault("timeout", 10)
        kwargs.setdefault("retries", 0)
        return tscale.Client(self.address, **kwargs)

    def reload_tokens(self, text):
        """Writes the token file, sends SIGHUP and waits for the server's line about it."""
        before = self.server.log().count("SIGHUP")
        write("tokens", text)
        os.kill(self.server.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while self.server.log().count("SIGHUP") == before and time.monotonic() < deadline:
            time.sleep(0.05)

    def test_token_file_and_mutual_tls(self):
        good = write("good.token", "  token-one\n")
        with self.client(token_file=good, **self.mtls) as c:
            self.assertEqual(c.health(), "SERVING")
            c.create_model("secured", SPEC, seed=1)
            x = np.random.RandomState(0).randn(2, 8).astype(np.float32)
            r = c.train_step("secured", x, np.zeros((2, 4), np.float32), expected_step=0)
            self.assertEqual(r.step, 1)
            self.assertIn("secured", [m.model_id for m in c.list_models()])
            c.delete_model("secured")

    def test_health_needs_no_token(self):
        with self.client(**self.mtls) as c:
            self.assertEqual(c.health(), "SERVING")
            self.assertEqual(c.health(tscale.SERVICE_NAME), "SERVING")

    def test_calls_without_the_right_token_are_unauthenticated(self):
        with self.client(**self.mtls) as c:
            with self.assertError(grpc.StatusCode.UNAUTHENTICATED, "authorization"):
                c.list_models()
        with self.client(token="token-two", **self.mtls) as c:
            with self.assertError(grpc.StatusCode.UNAUTHENTICATED) as refused:
                c.server_info()
            self.assertNotIn("token-one", refused.error.message)
        # Streams too: ExportState of a model that need not exist is refused before the lookup.
        with self.client(**self.mtls) as c:
            with self.assertError(grpc.StatusCode.UNAUTHENTICATED):
                c.export_state("m")

    def test_clients_without_the_ca_or_certificate_are_refused(self):
        good = write("good.token", "token-one\n")
        address = self.address
        cases = {
            "no client certificate": (
                {"tls_ca": path("ca.pem")},
                f"TLS: {address} requires a client certificate (mutual TLS): give tls_cert and "
                f"tls_key"),
            "a client certificate from another CA": (
                {"tls_ca": path("ca.pem"), "tls_cert": path("stranger.pem"),
                 "tls_key": path("stranger.key")},
                f"TLS: {address} refused this client's certificate (mutual TLS"),
            "a CA that did not sign the server": (
                {"tls_ca": path("other-ca.pem"), "tls_cert": path("client.pem"),
                 "tls_key": path("client.key")},
                f"TLS: the certificate of {address} is not signed by a CA this client trusts"),
            "plaintext": (
                {}, f"TLS: {address} speaks TLS and this client connected in plaintext: use TLS"),
        }
        for what, (tls, message) in cases.items():
            # The default retries: a set-up that cannot work is not retried.
            with self.subTest(what), self.client(token_file=good, retries=None, **tls) as c, \
                    mock.patch.object(client_module.time, "sleep") as slept:
                with self.assertError(grpc.StatusCode.UNAVAILABLE, message):
                    c.health()
                with self.assertError(grpc.StatusCode.UNAVAILABLE, message):
                    c.list_models()
                self.assertEqual(slept.call_count, 0, f"{what}: retried")

    def test_sighup_reads_the_tokens_again(self):
        try:
            self.reload_tokens("token-three\n")
            with self.client(token="token-three", **self.mtls) as c:
                c.list_models()  # raises when the new token is refused
            with self.client(token="token-one", **self.mtls) as c:
                with self.assertError(grpc.StatusCode.UNAUTHENTICATED):
                    c.list_models()
        finally:
            self.reload_tokens("# clients\ntoken-one\n")

    def test_bad_client_options_name_the_option(self):
        cases = [
            ({"tls_ca": path("ca.pem"), "tls_cert": path("client.pem")}, "tls_cert, tls_key"),
            ({"tls_ca": path("no-such.pem")}, "tls_ca: expected a readable file"),
            ({"token_file": path("no-such.token")}, "token_file: expected a readable file"),
            ({"token_file": write("empty.token", "\n \n")}, "token_file: expected a token"),
            ({"token": "a", "token_file": path("good.token")}, "token_file: expected either"),
            ({"tls": True, "credentials": grpc.ssl_channel_credentials()},
             "credentials: expected either"),
        ]
        for kwargs, message in cases:
            with self.assertRaises(ValueError, msg=str(kwargs)) as cm:
                tscale.Client(self.address, **kwargs)
            self.assertIn(message, str(cm.exception))


class TlsMismatchTest(ErrorAssertions, unittest.TestCase):
    """Servers whose set-up the client's does not match: a certificate for another name only
    (DNS:tscale.internal, as behind a tunnel or proxy), and plaintext. Each server says at start
    what protects it."""

    @contextlib.contextmanager
    def served(self, *args):
        server = ServerProcess(*args, client_kwargs={"tls_ca": path("ca.pem"),
                                                     "tls_server_name": "tscale.internal"}
                               if args else {}).start()
        try:
            yield server
            self.assertEqual(server.stop(), 0, server.log())
        finally:
            server.kill()
            server.remove_logs()

    def security_line(self, server):
        m = re.search(r"^tscale-server: security: (.*)$", server.log(), re.M)
        self.assertIsNotNone(m, server.log())
        return m.group(1)

    def test_a_certificate_of_another_name_and_the_override(self):
        with self.served("--tls-cert", path("elsewhere.pem"), "--tls-key",
                         path("elsewhere.key")) as server:
            self.assertEqual(self.security_line(server),
                             f"TLS on (--tls-cert {path('elsewhere.pem')}), mutual TLS off, "
                             f"bearer tokens off")
            with tscale.Client(server.address, tls_ca=path("ca.pem"), timeout=10) as c, \
                    mock.patch.object(client_module.time, "sleep") as slept:
                with self.assertError(grpc.StatusCode.UNAVAILABLE,
                                      f"TLS: the certificate of {server.address} does not name "
                                      f"127.0.0.1: connect by a name the certificate holds, or, "
                                      f"through a tunnel or proxy, give that name with "
                                      f"tls_server_name"):
                    c.health()
                self.assertEqual(slept.call_count, 0, "retried")
            # Through a tunnel: the name the certificate holds, given.
            with tscale.Client(server.address, tls_ca=path("ca.pem"),
                               tls_server_name="tscale.internal", timeout=10) as c:
                self.assertEqual(c.health(), "SERVING")
                self.assertEqual(len(c.list_models()), 0)

    def test_tls_at_a_plaintext_server(self):
        with self.served() as server:
            self.assertEqual(self.security_line(server),
                             "TLS off (plaintext), mutual TLS off, bearer tokens off; anyone who "
                             "can reach the port can use every call")
            with tscale.Client(server.address, tls_ca=path("ca.pem"), timeout=10) as c, \
                    mock.patch.object(client_module.time, "sleep") as slept:
                with self.assertError(grpc.StatusCode.UNAVAILABLE,
                                      f"TLS: {server.address} does not speak TLS (a plaintext "
                                      f"server?)"):
                    c.server_info()
                self.assertEqual(slept.call_count, 0, "retried")

    def test_mutual_tls_server_says_so_at_start(self):
        write("start.tokens", "t\n")
        server = ServerProcess("--tls-cert", path("server.pem"), "--tls-key", path("server.key"),
                               "--tls-client-ca", path("ca.pem"), "--auth-token-file",
                               path("start.tokens"),
                               client_kwargs={"tls_ca": path("ca.pem"), "tls_cert":
                                              path("client.pem"), "tls_key": path("client.key")})
        server.start()
        try:
            self.assertEqual(self.security_line(server),
                             f"TLS on (--tls-cert {path('server.pem')}), mutual TLS on (client "
                             f"certificates signed by --tls-client-ca {path('ca.pem')}), bearer "
                             f"tokens on (--auth-token-file {path('start.tokens')})")
            self.assertEqual(server.stop(), 0, server.log())
        finally:
            server.kill()
            server.remove_logs()


class TokenWarningTest(unittest.TestCase):
    """A bearer token over plaintext to another machine warns; over TLS, or to this machine
    (loopback, a unix socket), it does not."""

    def created(self, *args, **kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tscale.Client(*args, **kwargs).close()
        return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]

    def test_plaintext_token_warns(self):
        self.assertEqual(self.created("192.0.2.1:50051", token="t"),
                         ["tscale.Client: the token goes to 192.0.2.1:50051 in plaintext, "
                          "readable by anyone on the way; use TLS (tls_ca=FILE or tls=True)"])
        self.assertEqual(len(self.created("tscale.example", token_file=write("w.token", "t"))), 1)

    def test_no_warning_over_tls_or_to_this_machine(self):
        self.assertEqual(self.created("192.0.2.1:50051", token="t", tls_ca=path("ca.pem")), [])
        self.assertEqual(self.created("127.0.0.1:50051", token="t"), [])
        self.assertEqual(self.created("localhost", token="t"), [])
        self.assertEqual(self.created("[::1]:50051", token="t"), [])
        self.assertEqual(self.created("unix:/tmp/tscale.sock", token="t"), [])
        self.assertEqual(self.created("192.0.2.1:50051"), [])


class ReflectionTest(ErrorAssertions, unittest.TestCase):
    """--reflection false: the reflection service is not there; the API and health are."""

    @contextlib.contextmanager
    def served(self, *args):
        """A client of a server started with args; the server must exit 0 on SIGTERM after."""
        server = ServerProcess(*args).start()
        try:
            with server.client(timeout=10, retries=0) as c:
                yield c
            self.assertEqual(server.stop(), 0, server.log())
        finally:
            server.kill()
            server.remove_logs()

    def test_reflection_off(self):
        with self.served("--reflection", "false") as c:
            with self.assertError(grpc.StatusCode.UNIMPLEMENTED):
                c.list_services()
            self.assertEqual(c.health(), "SERVING")
            self.assertEqual(len(c.list_models()), 0)

    def test_reflection_on_by_default(self):
        with self.served() as c:
            self.assertIn(tscale.SERVICE_NAME, c.list_services())


if __name__ == "__main__":
    unittest.main()
