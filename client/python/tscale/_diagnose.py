"""What a failed connection means, in words that say what to change.

gRPC's text of a connection that failed in its TLS set-up is clear in some cases ("certificate
verify failed", "Peer name X is not in peer certificate", "wrong version number") and the same
in others ("Socket closed": a plaintext client at a TLS server, a client certificate missing or
refused). Where it is ambiguous, a TLS handshake of the client's own (Python's ssl, a few seconds
at most) finds out. The C++ client does the same (client/cpp/diagnose.cc).
"""

import os
import socket
import ssl
import tempfile

_PROBE_SECONDS = 3.0     # to connect, and for each step of the handshake
_ALERT_WAIT_SECONDS = 1.0  # after the handshake: TLS 1.3 checks the client's certificate then

# Texts of failures that say nothing about TLS: left to the retries.
_TRANSIENT = ("connection refused", "dns resolution failed", "no route to host",
              "network is unreachable", "connection timed out", "timeout occurred")
# OpenSSL's reasons of a peer that answered a ClientHello with something other than TLS.
_NOT_TLS = ("WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST",
            "UNEXPECTED_EOF_WHILE_READING", "RECORD_LAYER_FAILURE")
# Alerts about the client's certificate (OpenSSL's reason names).
_CERT_ALERTS = ("TLSV13_ALERT_CERTIFICATE_REQUIRED", "TLSV1_ALERT_UNKNOWN_CA",
                "SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
                "TLSV1_ALERT_DECRYPT_ERROR", "SSLV3_ALERT_HANDSHAKE_FAILURE")
# X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH.
_NAME_MISMATCH = (62, 64)
# X509_V_ERR_CERT_NOT_YET_VALID, X509_V_ERR_CERT_HAS_EXPIRED.
_NOT_VALID_NOW = (9, 10)


class Tls:
    """A client's TLS set-up as the probe needs it: enabled, the PEM bytes of the CA (None: the
    system's), of the client certificate chain and key (None: none), the server name override."""

    def __init__(self, enabled, ca=None, cert=None, key=None, server_name=None):
        self.enabled = enabled
        self.ca, self.cert, self.key = ca, cert, key
        self.server_name = server_name


def host_port(target):
    """(host, port) of "HOST:PORT", "[IPV6]:PORT", "dns:///HOST:PORT", "ipv4:..."; None for
    anything else (unix sockets, lists)."""
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme):]
            break
    if "," in target or "/" in target or ":" not in target:
        return None
    host, _, port = target.rpartition(":")
    if host.startswith("["):
        if not host.endswith("]"):
            return None
        host = host[1:-1]
    if not host or not port.isdigit() or not 0 < int(port) <= 65535:
        return None
    return host, int(port)


def _is_ip(name):
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in name else socket.AF_INET, name)
        return True
    except OSError:
        return False


def _write_temp(data):
    """A temporary file holding data (the ssl module loads certificates and keys from files)."""
    f = tempfile.NamedTemporaryFile(prefix="tscale-probe-", delete=False)
    f.write(data)
    f.close()
    return f.name


def _probe(host, port, tls, verify):
    """A TLS handshake with (host, port): ("no-answer"|"not-tls"|"tls"|"verify-failed"|"alert"|
    "closed" (right after the handshake), detail). With verify False it checks nothing and
    presents no certificate (is there TLS?)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    name = (tls.server_name if verify and tls.server_name else host)
    temps = []
    try:
        if verify:
            if tls.ca:
                context.load_verify_locations(cadata=tls.ca.decode("ascii", "replace"))
            else:
                context.load_default_certs()
            if tls.cert and tls.key:
                temps = [_write_temp(tls.cert), _write_temp(tls.key)]
                context.load_cert_chain(temps[0], temps[1])
        else:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    except (ssl.SSLError, OSError, ValueError):
        return "no-answer", None  # gRPC's own text says more about bad PEM files
    finally:
        for t in temps:
            os.unlink(t)
    try:
        raw = socket.create_connection((host, port), timeout=_PROBE_SECONDS)
    except OSError:
        return "no-answer", None
    try:
        try:
            conn = context.wrap_socket(raw, server_hostname=name)
        except ssl.SSLCertVerificationError as e:
            return "verify-failed", e
        except ssl.SSLError as e:
            if e.reason in _NOT_TLS or isinstance(e, ssl.SSLEOFError):
                return "not-tls", e
            if e.reason and "ALERT" in e.reason:
                return "alert", e
            return "not-tls", e
        except (ConnectionResetError, BrokenPipeError, socket.timeout):
            return "not-tls", None
        except OSError:
            return "no-answer", None
        # A gRPC server that accepts the client sends its HTTP/2 settings at once; one that
        # refuses the client's certificate (checked after the handshake in TLS 1.3) sends an
        # alert, or closes the connection without a word.
        try:
            conn.settimeout(_ALERT_WAIT_SECONDS)
            if not conn.recv(1):
                return "closed", None
        except ssl.SSLError as e:
            if e.reason and "ALERT" in e.reason:
                return "alert", e
            if isinstance(e, ssl.SSLEOFError) or e.reason == "UNEXPECTED_EOF_WHILE_READING":
                return "closed", None
        except socket.timeout:
            pass
        except OSError:
            return "closed", None
        finally:
            conn.close()
        return "tls", None
    finally:
        raw.close()


def _not_tls(address):
    return (f"TLS: {address} does not speak TLS (a plaintext server?): connect without the TLS "
            f"options (tls, tls_ca, ...; the CLI's --tls, --tls-ca), or start the server with "
            f"--tls-cert and --tls-key")


def _untrusted(address, why):
    return (f"TLS: the certificate of {address} is not signed by a CA this client trusts "
            f"({why}): give the CA that signed it (tls_ca; the CLI's --tls-ca FILE)")


def _wrong_name(address, name):
    return (f"TLS: the certificate of {address} does not name {name}: connect by a name the "
            f"certificate holds, or, through a tunnel or proxy, give that name with "
            f"tls_server_name (the CLI's --tls-server-name NAME)")


def _verify_failed(address, error, name):
    code = getattr(error, "verify_code", None)
    why = getattr(error, "verify_message", None) or "certificate verify failed"
    if code in _NAME_MISMATCH:
        return _wrong_name(address, name)
    if code in _NOT_VALID_NOW:
        return f"TLS: the certificate of {address} is not valid now ({why})"
    return _untrusted(address, why)


def diagnose(target, tls, details):
    """A message for a connection to ``target`` that failed with gRPC's text ``details``, or None
    when it looks transient or cannot be told. ``tls``: the client's Tls, or None when it uses
    credentials it cannot look into (then only gRPC's text counts)."""
    # OpenSSL's reasons come as "certificate verify failed" or "CERTIFICATE_VERIFY_FAILED".
    text = (details or "").lower().replace("_", " ")
    if not ("failed to connect to all addresses" in text or "handshake" in text
            or "peer name" in text):
        return None
    if any(t in text for t in _TRANSIENT):
        return None
    where = host_port(target)
    can_probe = tls is not None and where is not None
    if "peer name " in text:
        at = text.index("peer name ") + len("peer name ")
        return _wrong_name(target, details[at:].split(" ", 1)[0])
    if any(t in text for t in ("wrong version number", "packet length too long", "http request")):
        return _not_tls(target)
    if "certificate verify failed" in text:
        if can_probe:
            kind, error = _probe(*where, tls, verify=True)
            if kind == "verify-failed":
                return _verify_failed(target, error, tls.server_name or where[0])
        return _untrusted(target, "certificate verify failed")
    # Ambiguous ("Socket closed", "tcp handshaker shutdown", a reset): the handshake tells.
    if not can_probe:
        return None
    if not tls.enabled:
        kind, _ = _probe(*where, tls, verify=False)
        if kind in ("tls", "alert", "closed"):
            return (f"TLS: {target} speaks TLS and this client connected in plaintext: use TLS "
                    f"(tls_ca=FILE with the CA that signed the server's certificate, or tls=True "
                    f"for the system's CAs; the CLI's --tls-ca FILE, --tls)")
        return None
    kind, error = _probe(*where, tls, verify=True)
    if kind == "not-tls":
        return _not_tls(target)
    if kind == "verify-failed":
        return _verify_failed(target, error, tls.server_name or where[0])
    if kind in ("alert", "closed"):
        reason = (error.reason if kind == "alert"
                  else "it closed the connection after the handshake")
        if not tls.cert and (kind == "closed" or reason in _CERT_ALERTS):
            return (f"TLS: {target} requires a client certificate (mutual TLS): give tls_cert "
                    f"and tls_key (the CLI's --tls-cert FILE, --tls-key FILE)")
        if tls.cert and (kind == "closed" or reason in _CERT_ALERTS):
            return (f"TLS: {target} refused this client's certificate (mutual TLS; "
                    f"{reason.lower()}): use one signed by the CA the server trusts (its "
                    f"--tls-client-ca)")
        return f"TLS: {target} ended the TLS handshake ({reason.lower()})"
    return None
