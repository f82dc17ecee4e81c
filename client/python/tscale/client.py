"""The Python client of the tscale training service.

    import numpy as np, tscale
    with tscale.Client("127.0.0.1:50051") as c:
        c.create_model("m", {"layers": [{"name": "fc", "ternary_linear":
                                         {"in_features": 64, "out_features": 10}}]})
        y, pass_id, step = c.forward("m", np.zeros((8, 64), np.float32), train=True)
        c.backward("m", pass_id, np.ones_like(y))
        c.update_correlation("m", expected_step=step)

Tensors: numpy arrays, or torch tensors (torch is imported only when one is passed; tensors on a
GPU are copied to the host). Results that carry tensors come back as numpy arrays, or as torch
tensors on the input's device when the call's input (``x``, ``grad_output``) was a torch tensor.

Addresses: "HOST:PORT", or "HOST" alone for port 50051 (the CLI's default port; IPv6 as
"[::1]:PORT" or a bare "::1"); gRPC target URIs ("dns:///...", "unix:/path") pass as given.

Return values, by one rule: calls whose result carries tensors return small named tuples holding
arrays (``ForwardResult``, ``TrainStepResult``; ``backward`` returns the array itself or
None); every other call returns the API's protobuf message (``trainer_pb2.ModelInfo``,
``ServerInfo``, ``UpdateCorrelationResponse``, ``ScaleStats``, ...), or a plain Python value where
the message would only wrap one (``list_models`` -> list of ModelInfo, ``export_state`` -> bytes,
``health`` -> status name, ``delete_model`` -> None). Tensors inside returned messages (e.g.
``ScaleStats.layers[i].log2_scale``) convert with ``tscale.to_numpy``.

Failures raise ``tscale.Error`` (``.code`` is the ``grpc.StatusCode``, ``.message`` the server's
message); bad arguments detected locally (an unsupported dtype, an unknown loss name) raise
ValueError before anything is sent. When no server can be reached the message says so in its own
words, e.g. "no tscale-server answering at 127.0.0.1:50051 (connection refused)" (gRPC's text is
in ``.details``). A TLS set-up that does not match the server's is told apart and named (a
plaintext client at a TLS server or the reverse, a server certificate no trusted CA signed or
that does not name the host, a client certificate missing or refused), by gRPC's text or, where
that is ambiguous, by a TLS handshake of the client's own; such a failure is not retried.

Retries: on UNAVAILABLE, and on DEADLINE_EXCEEDED of one attempt (each attempt has its own
``timeout``), a call is retried with exponential backoff, but only when a repeat cannot change the
outcome: reads (health, server_info, get/list, export, scale stats), ``forward(train=False)``,
``create_model(exist_ok=True)``, and the exactly-once ``update_correlation`` and ``train_step``
(every retry sends the same expected_step; the server answers a repeat of the update it just
applied with the same response and ``replayed=True``, which counts as success). ``backward``,
``forward(train=True)``, ``create_model``, ``delete_model``, ``import_state`` and the checkpoint
writes are sent once.

How long: retries go on until ``retry_seconds`` (60 s by default) have passed since the call's
first failure, long enough for a server restart that restores its checkpoints, so a training loop
rides through one. ``retries`` also caps their number (None: no cap; 0: no retries). Until this
client has had its first answer from the server, at most 3 retries are made (a wrong address or a
server not started fails within a second; ``wait_ready`` waits for a server that is starting).
Note that a server restarted from a checkpoint older than an update it had applied has forgotten
that update: the retry then applies it again, or fails with FAILED_PRECONDITION when another
client moved the model's step first.

Unknown outcomes: when ``update_correlation`` or ``train_step`` fails in a way that leaves open
whether the server applied it (a deadline that passed while the request or its answer was on its
way, a connection that broke), and no retry settled it, the error's message says so and which
step to read: expected_step + 1 means it was applied. Sending it again with the same expected_step
is safe: the server answers it as a replay when it was applied.
"""

from __future__ import annotations

import collections
import ipaddress
import json
import os
import re
import time
import warnings
from typing import (TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Mapping,
                    Optional, Sequence, Tuple, TypeVar, Union)

import grpc
from google.protobuf import json_format

from tscale import _diagnose, _wire
from tscale.errors import Error
from tscale.tensors import (WIRE_DTYPES, TensorLike, is_torch, numpy_to_torch, to_float32,
                            to_numpy, to_tensor, to_wire_tensor, torch_to_numpy)
from tscale.v1 import trainer_pb2, trainer_pb2_grpc

if TYPE_CHECKING:  # named in hints only
    import numpy as np
    from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper
    from google.protobuf.message import Message

_T = TypeVar("_T")
# A model spec as the calls take it: a ModelSpec, a dict in the proto's JSON form, or that JSON.
SpecLike = Union[trainer_pb2.ModelSpec, Mapping[str, Any], str, bytes]
# An enum field as the calls take it: the value, or its (full or short) name, e.g. "fp32".
EnumLike = Union[int, str]

SERVICE_NAME = "tscale.v1.TernaryTrainer"
CHUNK_BYTES = 1 << 20  # ImportState data chunks
DEFAULT_PORT = 50051   # the server's and the CLI's default
RETRY_SECONDS = 60.0   # default total retry time: a restart that restores checkpoints fits in it

_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# The exactly-once calls (UpdateCorrelation, TrainStep) are also retried after CANCELLED: this
# client never cancels them, so the server did, in a shutdown (gRPC cancels what still runs when
# the server stops); the retry with the same expected_step is applied once or answered as a
# replay.
_EXACTLY_ONCE = ("UpdateCorrelation", "TrainStep")
_FIRST_CONTACT_RETRIES = 3  # retries before the client's first answer from the server
_MAX_BACKOFF = 2.0          # seconds between retries at most
# gRPC target URIs, passed on as they are.
_URI_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")
# Short names of TrainStep's losses, as the CLI's --loss takes them.
_LOSS_ALIASES = {"CE": "CROSS_ENTROPY"}

ForwardResult = collections.namedtuple("ForwardResult", ["output", "pass_id", "step"])
ForwardResult.__doc__ = """Forward's result: output (numpy [batch, out], or torch for a torch
input), pass_id (str, empty unless train), step (the model's step the pass belongs to)."""

TrainStepResult = collections.namedtuple(
    "TrainStepResult", ["loss", "step", "output", "layers", "replayed"])
TrainStepResult.__doc__ = """TrainStep's result: loss (float, of the step's forward), step (the
model's step after it), output (numpy, or torch for a torch input, when want_output and not
replayed; else None), layers (list of trainer_pb2.LayerUpdate: layer, score_sum, mean_abs_drift),
replayed (True when the server answered a retry of the step it had already applied)."""


def _enum(enum_type: EnumTypeWrapper, value: EnumLike, prefix: str, field: str,
          aliases: Optional[Mapping[str, str]] = None) -> int:
    """An enum value from an int, its full name or its short lower-case name ('fp32', 'mse'), in
    any case; ``aliases`` maps further upper-case names to full ones ('CE')."""
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        name = value.upper()
        name = (aliases or {}).get(name, name)
        for candidate in (name, prefix + name):
            if candidate in enum_type.keys():
                return enum_type.Value(candidate)
    names = list(enum_type.keys()) + [a.lower() for a in (aliases or {})]
    raise ValueError(f"{field}: expected one of {', '.join(names)}, got {value!r}")


def _target(address: str) -> str:
    """The gRPC target of a server address: "HOST:PORT" as given, "HOST" with the default port,
    a bare IPv6 address bracketed, a target URI ("dns:///...", "unix:...") as given."""
    if not isinstance(address, str) or not address.strip():
        raise ValueError(f"address: expected HOST[:PORT], got {address!r}")
    if address.startswith(_URI_SCHEMES):
        return address
    if address.startswith("["):
        end = address.find("]")
        rest = address[end + 1:] if end > 1 else None
        if rest == "":
            return f"{address}:{DEFAULT_PORT}"
        if rest is not None and rest.startswith(":") and rest[1:].isdigit():
            return address
        raise ValueError(f"address: expected [IPV6]:PORT or [IPV6], got {address!r}")
    colons = address.count(":")
    if colons == 0:
        return f"{address}:{DEFAULT_PORT}"
    if colons == 1:
        host, port = address.split(":")
        if host and port.isdigit() and int(port) <= 65535:
            return address
        raise ValueError(f"address: expected HOST:PORT with a port number, got {address!r}")
    return f"[{address}]:{DEFAULT_PORT}"  # a bare IPv6 address


# gRPC's text when a channel cannot reach any address, e.g. "failed to connect to all addresses;
# last error: UNKNOWN: ipv4:127.0.0.1:1: Failed to connect to remote host: Connection refused".
_CONNECT_FAILED = re.compile(
    r"failed to connect to all addresses(?:; last error: (?:[A-Z_]+: )?"
    r"(?:(?:ipv4|ipv6|unix|unix-abstract|vsock):\S*: )?(?P<reason>.*))?", re.S)
_DNS_FAILED = re.compile(r"DNS resolution failed for \S+?: (?:.*: )?(?P<reason>[^:]*)$", re.S)


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _connection_failure(address: str, details: str) -> Optional[str]:
    """A message in the client's words for gRPC's text of a connection that failed, or None when
    the text is about something else (the server's own UNAVAILABLE, a dropped connection)."""
    m = _CONNECT_FAILED.search(details)
    if m:
        reason = (m.group("reason") or "").strip()
        if "handshake" in reason.lower():
            return f"TLS handshake with {address} failed ({reason})"
        # "Failed to connect to remote host: Connection refused" -> "connection refused"
        reason = _lower_first(reason.rsplit(": ", 1)[-1] if reason else "no address reached")
        if reason in ("socket closed", "connection reset by peer"):
            # Something accepted the connection and dropped it while it was being set up.
            return (f"{address} closed the connection before answering ({reason}): a plaintext "
                    f"client at a TLS server, or a client certificate the server refuses, ends so")
        return f"no tscale-server answering at {address} ({reason})"
    m = _DNS_FAILED.search(details)
    if m:
        return (f"no tscale-server answering at {address} (DNS resolution failed: "
                f"{_lower_first(m.group('reason').strip())})")
    return None


def _read_file(field: str, path: Union[str, os.PathLike]) -> bytes:
    """The bytes of a file named by a client option; ValueError naming the option otherwise."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"{field}: expected a readable file, got {path!r} "
                         f"({e.strerror})") from None


def _loads_without_duplicates(text: Union[str, bytes]) -> Any:
    """json.loads, refusing a key given twice in one object (json keeps the last one silently)
    with a ValueError naming the key and the object's path, e.g. "spec: duplicate key
    'in_features' in layers[1].ternary_linear", as the server and the CLI do."""
    duplicates = []  # (key, the object's dict), innermost first

    def pairs(items: List[Tuple[str, Any]]) -> Dict[str, Any]:
        obj = {}
        for key, value in items:
            if key in obj and not duplicates:
                duplicates.append(key)
                duplicates.append(obj)
            obj[key] = value
        return obj

    data = json.loads(text, object_pairs_hook=pairs)
    if duplicates:
        key, target = duplicates

        def find(node: Any, path: str) -> Optional[str]:
            if node is target:
                return path
            children = (node.items() if isinstance(node, dict) else
                        enumerate(node) if isinstance(node, list) else ())
            for k, child in children:
                found = find(child, f"{path}[{k}]" if isinstance(node, list) else
                             f"{path}.{k}" if path else k)
                if found is not None:
                    return found
            return None
        where = find(data, "")
        raise ValueError(f"spec: duplicate key '{key}' "
                         f"{f'in {where}' if where else 'at the top level'} (JSON keeps only one "
                         f"of them; give each key once)")
    return data


def _is_local(target: str) -> bool:
    """Whether a gRPC target stays on this machine: loopback, or a unix socket."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    where = _diagnose.host_port(target)
    if where is None:
        return False
    if where[0] == "localhost":
        return True
    try:
        return ipaddress.ip_address(where[0]).is_loopback
    except ValueError:
        return False


def _unknown_outcome(method: str, expected_step: int, error: Error) -> Optional[str]:
    """The message of an exactly-once call's failure (a tscale.Error) that leaves open whether it
    was applied, saying so; None for failures that say nothing was applied (the server's
    refusals, a connection never made)."""
    if error.code not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE,
                          grpc.StatusCode.CANCELLED):
        return None
    if any(t in error.details for t in ("nothing was", "failed to connect",
                                        "DNS resolution failed")):
        return None
    message = error.message
    return (f"{message} ({method} with expected_step {expected_step} may have been applied: read "
            f"the model's step (get_model): {expected_step + 1} means it was, {expected_step} "
            f"that it was not; sending it again with expected_step {expected_step} is safe: the "
            f"server answers it as a replay when it was applied)")


def to_spec(spec: SpecLike) -> trainer_pb2.ModelSpec:
    """A ``trainer_pb2.ModelSpec`` from a ModelSpec, a dict in the proto's JSON form
    (``{"layers": [{"name": "fc1", "ternary_linear": {"in_features": 64, ...}}]}``) or that JSON
    as a string (as in a state file's ``spec`` metadata). Raises ValueError for anything else,
    or JSON that does not parse as a ModelSpec."""
    if isinstance(spec, trainer_pb2.ModelSpec):
        return spec
    if isinstance(spec, (str, bytes)):
        spec = _loads_without_duplicates(spec)
    if isinstance(spec, dict):
        try:
            return json_format.ParseDict(spec, trainer_pb2.ModelSpec())
        except json_format.ParseError as e:
            raise ValueError(f"spec: {e}") from None
    raise ValueError(f"spec: expected a ModelSpec, a dict or a JSON string, got "
                     f"{type(spec).__name__}")


def _like(given: TensorLike, array: np.ndarray) -> TensorLike:
    """array as the caller gave its input: a torch tensor on the same device when ``given`` is
    one, else the numpy array itself."""
    return numpy_to_torch(array, given) if is_torch(given) else array


def _normalized_spec(spec: trainer_pb2.ModelSpec) -> trainer_pb2.ModelSpec:
    """A copy of a ModelSpec with the defaults spelt out (group size 32, threshold 0.05), as the
    server fills them in."""
    spec = trainer_pb2.ModelSpec.FromString(spec.SerializeToString())

    def fill(layers: Iterable[trainer_pb2.Layer]) -> None:
        for layer in layers:
            kind = layer.WhichOneof("kind")
            if kind == "ternary_linear":
                layer.ternary_linear.group_size = layer.ternary_linear.group_size or 32
                layer.ternary_linear.threshold = layer.ternary_linear.threshold or 0.05
            elif kind == "ternary_rms_norm":
                layer.ternary_rms_norm.group_size = layer.ternary_rms_norm.group_size or 32
            elif kind == "residual":
                fill(layer.residual.layers)
    fill(spec.layers)
    return spec


def _differences(request: trainer_pb2.CreateModelRequest,
                 info: trainer_pb2.ModelInfo) -> List[str]:
    """What differs between a CreateModelRequest and an existing model's ModelInfo."""
    out = []
    if _normalized_spec(request.spec) != _normalized_spec(info.spec):
        out.append("spec " + json_format.MessageToJson(info.spec, indent=None))
    want = request.compute or trainer_pb2.COMPUTE_FP32
    if want != info.compute:
        out.append(f"compute {trainer_pb2.ComputeType.Name(info.compute)}, not "
                   f"{trainer_pb2.ComputeType.Name(want)}")
    if request.device and request.device != info.device and \
            not (request.device == "cuda" and info.device.startswith("cuda:")):
        out.append(f"device {info.device}, not {request.device}")
    return out


class Client:
    """A connection to one tscale server.

    Args:
        address: "HOST:PORT", or "HOST" for port 50051.
        timeout: seconds allowed for each attempt of a call (per-call ``timeout=`` overrides).
        retries: most extra attempts of a call that is safe to repeat (see the module docstring);
            None: as many as ``retry_seconds`` allows; 0: none.
        retry_seconds: how long after a call's first failure it may still be retried (default
            60 s: a server restart that restores its checkpoints).
        credentials: ``grpc.ChannelCredentials`` for TLS (e.g. ``grpc.ssl_channel_credentials``);
            None: an insecure channel, unless one of the TLS options below is given.
        token: sent as ``authorization: Bearer <token>`` on every call (server --auth-token-file).
        The CLI's options, by the same names (paths to PEM files; not with ``credentials``):
        tls: True for TLS trusting the system's root certificates (the CLI's ``--tls``).
        tls_ca: TLS, trusting the root certificates in this file (``--tls-ca``).
        tls_cert, tls_key: the client certificate chain and its key, for mutual TLS (``--tls-cert``,
            ``--tls-key``; both or neither).
        tls_server_name: the name the server's certificate must hold, when the address is not
            one of its names, e.g. through a tunnel or proxy (``--tls-server-name``; gRPC's
            ``grpc.ssl_target_name_override``); implies TLS.
        token_file: a file holding the token, surrounding whitespace stripped
            (``--auth-token-file``; not with ``token``).
        backoff: seconds before the first retry; doubles per retry, at most 2 s.
        options: extra gRPC channel options; they replace the defaults of the same name.
        wire_dtype: "fp32" (default), "bf16" or "fp16": how float32 inputs, grad outputs and MSE
            targets travel, and what the server is asked to send outputs and input gradients in
            (they come back as float32 arrays). Half the bytes each way, at the cost of rounding:
            relative error at most 2^-9 (bf16) or 2^-11 (fp16, which also overflows beyond
            65504); docs/wire.md.
        compression: None or "gzip": compresses every message this client sends, and asks the
            server to compress its answers (gRPC's message compression). Worth it on slow links
            for compressible data (integer-valued inputs, zeros); random floats barely shrink.

    A token sent in plaintext to an address that is not this machine's (loopback, a unix
    socket) makes the client warn (``warnings.warn``, a UserWarning): anyone on the way can read
    it.

    Message size limits are lifted on the client side (-1) so that the server's
    --max-message-bytes is the one that applies, and the channel tries to reconnect at least every
    2 s (gRPC's default backoff grows to 2 minutes, too slow to notice a restarted server). Use as
    a context manager or call ``close()``. ``address`` is then the address in use, port included.
    """

    def __init__(self, address: str, timeout: Optional[float] = 60.0,
                 retries: Optional[int] = None,
                 credentials: Optional[grpc.ChannelCredentials] = None,
                 token: Optional[str] = None, backoff: float = 0.05,
                 options: Union[Mapping[str, Any], Iterable[Tuple[str, Any]]] = (),
                 tls: bool = False, tls_ca: Optional[Union[str, os.PathLike]] = None,
                 tls_cert: Optional[Union[str, os.PathLike]] = None,
                 tls_key: Optional[Union[str, os.PathLike]] = None,
                 token_file: Optional[Union[str, os.PathLike]] = None,
                 retry_seconds: float = RETRY_SECONDS, tls_server_name: Optional[str] = None,
                 wire_dtype: str = "fp32", compression: Optional[str] = None) -> None:
        self.address = _target(address)
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype: expected one of {', '.join(WIRE_DTYPES)}, got "
                             f"{wire_dtype!r}")
        self._wire = WIRE_DTYPES[wire_dtype]
        if compression not in (None, "gzip"):
            raise ValueError(f"compression: expected None or 'gzip', got {compression!r}")
        self._compression = grpc.Compression.Gzip if compression == "gzip" else None
        self.timeout = timeout
        self.retries = None if retries is None else int(retries)
        self.retry_seconds = float(retry_seconds)
        self.backoff = backoff
        self._answered = False  # whether the server has answered this client yet
        tls_files = {"tls_ca": tls_ca, "tls_cert": tls_cert, "tls_key": tls_key}
        # What the TLS diagnosis may look into: None for credentials given ready-made.
        self._tls = _diagnose.Tls(False) if credentials is None else None
        if tls_server_name is not None and (not isinstance(tls_server_name, str)
                                            or not tls_server_name):
            raise ValueError(f"tls_server_name: expected a host name, got {tls_server_name!r}")
        if tls or tls_server_name or any(v is not None for v in tls_files.values()):
            if credentials is not None:
                raise ValueError("credentials: expected either credentials or the tls options, "
                                 "got both")
            if (tls_cert is None) != (tls_key is None):
                raise ValueError("tls_cert, tls_key: expected both (mutual TLS) or neither, got "
                                 f"only {'tls_cert' if tls_key is None else 'tls_key'}")
            pem = {k: _read_file(k, v) for k, v in tls_files.items() if v is not None}
            credentials = grpc.ssl_channel_credentials(
                root_certificates=pem.get("tls_ca"), private_key=pem.get("tls_key"),
                certificate_chain=pem.get("tls_cert"))
            self._tls = _diagnose.Tls(True, pem.get("tls_ca"), pem.get("tls_cert"),
                                      pem.get("tls_key"), tls_server_name)
        if token_file is not None:
            if token is not None:
                raise ValueError("token_file: expected either token or token_file, got both")
            token = _read_file("token_file", token_file).decode("utf-8", "replace").strip()
            if not token:
                raise ValueError(f"token_file: expected a token in {token_file}, got an empty file")
        if token and credentials is None and not _is_local(self.address):
            warnings.warn(f"tscale.Client: the token goes to {self.address} in plaintext, "
                          f"readable by anyone on the way; use TLS (tls_ca=FILE or tls=True)",
                          UserWarning, stacklevel=2)
        opts = dict([("grpc.max_send_message_length", -1),
                     ("grpc.max_receive_message_length", -1),
                     ("grpc.initial_reconnect_backoff_ms", 100),
                     ("grpc.max_reconnect_backoff_ms", 2000),
                     # Keepalive, as the C++ client: a ping every 60 s and the connection given
                     # up when no answer comes within 20 s. gRPC also sets TCP_USER_TIMEOUT to
                     # those 20 s, which is what ends a call whose request was being written
                     # when the link died: without it the call outlives its deadline until the
                     # kernel gives up on the connection (about 15 minutes). tscale-server
                     # accepts pings down to one per 10 s.
                     ("grpc.keepalive_time_ms", 60000),
                     ("grpc.keepalive_timeout_ms", 20000),
                     ("grpc.keepalive_permit_without_calls", 1),
                     ("grpc.http2.max_pings_without_data", 0)])
        if tls_server_name:
            opts["grpc.ssl_target_name_override"] = tls_server_name
        opts.update(options)
        opts = list(opts.items())
        if credentials is not None:
            self._channel = grpc.secure_channel(self.address, credentials, options=opts,
                                                compression=self._compression)
        else:
            self._channel = grpc.insecure_channel(self.address, options=opts,
                                                  compression=self._compression)
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        if compression == "gzip":
            metadata += (("tscale-compression", "gzip"),)  # the answers too
        self._metadata = metadata or None
        self._stub = trainer_pb2_grpc.TernaryTrainerStub(self._channel)
        # Raw-bytes methods: there are no Python modules for these services (see _wire).
        self._health_check = self._channel.unary_unary(_wire.HEALTH_CHECK)
        self._reflection = self._channel.stream_stream(_wire.REFLECTION_INFO)

    # ------------------------------------------------------------ plumbing

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> bool:
        self.close()
        return False

    def _call(self, name: str, fn: Callable[[Optional[float]], _T], idempotent: bool,
              timeout: Optional[float], expected_step: Optional[int] = None) -> _T:
        """Runs fn(timeout) with the retry policy; grpc errors become tscale.Error.
        expected_step: of an exactly-once call, for the message of an unknown outcome."""
        t = self.timeout if timeout is None else timeout
        retried = 0
        first_failure = None
        while True:
            try:
                result = fn(t)
                self._answered = True
                return result
            except grpc.RpcError as e:
                code = e.code()
                if code == grpc.StatusCode.CANCELLED and name in _EXACTLY_ONCE:
                    code = grpc.StatusCode.UNAVAILABLE  # the server gave it up (see above)
                if code not in _RETRYABLE:
                    self._answered = True
                if code == grpc.StatusCode.UNAVAILABLE:
                    # A TLS set-up that does not match the server's fails every attempt alike:
                    # said plainly, and not retried.
                    diagnosis = _diagnose.diagnose(self.address, self._tls, e.details() or "")
                    if diagnosis is not None:
                        raise Error(grpc.StatusCode.UNAVAILABLE, diagnosis, name,
                                    details=e.details()) from None
                now = time.monotonic()
                if first_failure is None:
                    first_failure = now
                left = self.retry_seconds - (now - first_failure)
                if idempotent and code in _RETRYABLE and left > 0 and self._may_retry(retried):
                    time.sleep(min(self.backoff * (2 ** min(retried, 32)), _MAX_BACKOFF, left))
                    retried += 1
                    continue
                error = self._error(e, name)
                if expected_step is not None:
                    message = _unknown_outcome(name, expected_step, error)
                    if message is not None:
                        error = Error(error.code, message, name, details=error.details)
                raise error from None

    def _may_retry(self, retried: int) -> bool:
        """Whether a call retried `retried` times so far may be retried again (time aside)."""
        limit = self.retries
        if limit is None and not self._answered:
            limit = _FIRST_CONTACT_RETRIES
        return limit is None or retried < limit

    def _error(self, rpc_error: grpc.RpcError, method: str) -> Error:
        """tscale.Error of a grpc.RpcError; a failed connection described in the client's words."""
        error = Error.from_rpc_error(rpc_error, method)
        if error.code == grpc.StatusCode.UNAVAILABLE:
            message = _connection_failure(self.address, error.message)
            if message is not None:
                error = Error(error.code, message, method, details=error.message)
        return error

    def _unary(self, name: str, request: Message, idempotent: bool,
               timeout: Optional[float] = None) -> Any:
        """Calls the TernaryTrainer method ``name`` with ``request`` through _call; its answer."""
        method = getattr(self._stub, name)
        expected_step = request.expected_step if name in _EXACTLY_ONCE else None
        return self._call(name, lambda t: method(request, timeout=t, metadata=self._metadata),
                          idempotent, timeout, expected_step)

    # ------------------------------------------------------------ server

    def health(self, service: str = "", timeout: Optional[float] = None) -> str:
        """The standard gRPC health check: "SERVING", "NOT_SERVING", ... for ``service`` ("" is
        the whole server; "tscale.v1.TernaryTrainer" the API). An unknown service name raises
        Error with code NOT_FOUND."""
        return self._health(service, timeout, retry=True)

    def _health(self, service: str, timeout: Optional[float], retry: bool) -> str:
        req = _wire.health_request(service)
        resp = self._call("Health.Check",
                          lambda t: self._health_check(req, timeout=t, metadata=self._metadata),
                          retry, timeout)
        return _wire.health_status(resp)

    def wait_ready(self, timeout: float = 30.0, service: str = "") -> None:
        """Waits until health(service) is SERVING; raises Error(UNAVAILABLE) after ``timeout``."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            try:
                # No retries inside: this loop is the retry, bounded by its own timeout.
                status = self._health(service, max(0.1, min(2.0, deadline - time.monotonic())),
                                      retry=False)
                if status == "SERVING":
                    return
                last = f"health status {status}"
            except Error as e:
                last = str(e)
            if time.monotonic() >= deadline:
                raise Error(grpc.StatusCode.UNAVAILABLE,
                            f"server {self.address} not serving after {timeout} s ({last})")
            time.sleep(0.1)

    def list_services(self, timeout: Optional[float] = None) -> List[str]:
        """The services the server offers, from gRPC server reflection (list of names)."""
        req = _wire.list_services_request()

        def fn(t: Optional[float]) -> List[str]:
            names = []
            for resp in self._reflection(iter([req]), timeout=t, metadata=self._metadata):
                names.extend(_wire.list_services(resp))
            return names
        return self._call("ServerReflectionInfo", fn, True, timeout)

    def server_info(self, timeout: Optional[float] = None) -> trainer_pb2.ServerInfo:
        """trainer_pb2.ServerInfo: version, default_device, devices, limits, models."""
        return self._unary("GetServerInfo", trainer_pb2.GetServerInfoRequest(), True, timeout)

    # ------------------------------------------------------------ models

    def create_model(self, model_id: str, spec: SpecLike, seed: int = 0, device: str = "",
                     compute: EnumLike = "COMPUTE_TYPE_UNSPECIFIED", exist_ok: bool = False,
                     timeout: Optional[float] = None) -> trainer_pb2.ModelInfo:
        """Creates a model; returns its trainer_pb2.ModelInfo.

        spec: a ModelSpec, a dict in the proto's JSON form or a JSON string (see ``to_spec``).
        compute: a ComputeType value or name ("fp32", "tf32", "bf16", "COMPUTE_FP32", ...).
        exist_ok: when a model of that id exists already with the same spec (defaults filled in),
            compute type and, when given, device, return its ModelInfo (at whatever step it has
            reached) instead of raising ALREADY_EXISTS; the seed cannot be compared (the server
            does not keep it). A model that differs still raises ALREADY_EXISTS, saying what
            differs. With exist_ok the call is retried like a read; without, it is sent once (a
            retry could meet its own model: ALREADY_EXISTS).
        """
        req = trainer_pb2.CreateModelRequest(
            model_id=model_id, spec=to_spec(spec), seed=seed, device=device,
            compute=_enum(trainer_pb2.ComputeType, compute, "COMPUTE_", "compute"))
        try:
            return self._unary("CreateModel", req, exist_ok, timeout)
        except Error as e:
            if not exist_ok or e.code != grpc.StatusCode.ALREADY_EXISTS:
                raise
            error = e
        try:
            info = self.get_model(model_id, timeout=timeout)
        except Error:
            raise error from None  # the id is taken by something that is not a model now
        differs = _differences(req, info)
        if differs:
            raise Error(error.code, f"{error.message} (exist_ok: the existing model differs: "
                                    f"{'; '.join(differs)})", error.method) from None
        return info

    def get_model(self, model_id: str, timeout: Optional[float] = None) -> trainer_pb2.ModelInfo:
        """trainer_pb2.ModelInfo of the model (step, device, sizes, pending passes)."""
        return self._unary("GetModel", trainer_pb2.GetModelRequest(model_id=model_id), True,
                           timeout)

    def list_models(self, timeout: Optional[float] = None) -> List[trainer_pb2.ModelInfo]:
        """A list of trainer_pb2.ModelInfo, one per model."""
        return list(self._unary("ListModels", trainer_pb2.ListModelsRequest(), True,
                                timeout).models)

    def delete_model(self, model_id: str, delete_checkpoints: bool = False,
                     timeout: Optional[float] = None) -> None:
        """Deletes the model (and releases its passes). Returns None.

        Its checkpoints (server --checkpoint-dir) move to the server's trash of deleted models,
        so that a restart does not bring the model back and its id is free; restore_checkpoint
        with from_deleted takes them back within --deleted-retention-hours. delete_checkpoints
        removes them instead, also for a model not loaded now.
        """
        req = trainer_pb2.DeleteModelRequest(model_id=model_id)
        if delete_checkpoints:  # only set when asked: servers built before the field ignore it
            req.delete_checkpoints = True
        self._unary("DeleteModel", req, False, timeout)

    # ------------------------------------------------------------ training

    def forward(self, model_id: str, x: TensorLike, train: bool = False,
                timeout: Optional[float] = None) -> ForwardResult:
        """Runs the model on x (numpy [batch, in_features], usually float32).

        Returns ForwardResult(output, pass_id, step); output is a torch tensor on x's device
        when x is one. With train=True the server keeps what Backward needs under pass_id, until
        the next update of the model's step. Retried only when train is False.
        """
        req = trainer_pb2.ForwardRequest(model_id=model_id,
                                         input=to_wire_tensor(x, "input", self._wire),
                                         train=train, output_dtype=self._wire)
        resp = self._unary("Forward", req, not train, timeout)
        return ForwardResult(_like(x, to_float32(resp.output, "output")), resp.pass_id,
                             resp.step)

    def backward(self, model_id: str, pass_id: str, grad_output: TensorLike,
                 want_grad_input: bool = False,
                 timeout: Optional[float] = None) -> Optional[TensorLike]:
        """Backward of one training pass with grad_output (numpy, the pass's output shape).

        Returns the gradient w.r.t. the input when want_grad_input (numpy, or a torch tensor on
        grad_output's device when grad_output is one), else None. Never retried: a pass takes
        exactly one backward.
        """
        req = trainer_pb2.BackwardRequest(
            model_id=model_id, pass_id=pass_id,
            grad_output=to_wire_tensor(grad_output, "grad_output", self._wire),
            want_grad_input=want_grad_input, grad_input_dtype=self._wire)
        resp = self._unary("Backward", req, False, timeout)
        if want_grad_input or resp.HasField("grad_input"):
            return _like(grad_output, to_float32(resp.grad_input, "grad_input"))
        return None

    def release_passes(self, model_id: str, pass_ids: Optional[Sequence[str]] = None,
                       timeout: Optional[float] = None) -> trainer_pb2.ReleasePassesResponse:
        """Releases training passes that will get no Backward: every pending pass of the model
        (pass_ids None), or those of pass_ids, each of which must be pending (else the error
        names it and nothing is released). Returns trainer_pb2.ReleasePassesResponse (released,
        pending_passes). Retried: releasing again what is released already fails, so a retry
        after a lost answer reports FAILED_PRECONDITION for given ids; for all, it releases 0."""
        req = trainer_pb2.ReleasePassesRequest(model_id=model_id, pass_ids=list(pass_ids or []))
        return self._unary("ReleasePasses", req, not pass_ids, timeout)

    def update_correlation(self, model_id: str, expected_step: int,
                           timeout: Optional[float] = None
                           ) -> trainer_pb2.UpdateCorrelationResponse:
        """Applies the correlation update if the model's step is expected_step.

        Returns trainer_pb2.UpdateCorrelationResponse (step, replayed, layers: LayerUpdate with
        layer, score_sum, mean_abs_drift). Exactly once on the server, hence retried safely.
        """
        req = trainer_pb2.UpdateCorrelationRequest(model_id=model_id, expected_step=expected_step)
        return self._unary("UpdateCorrelation", req, True, timeout)

    def train_step(self, model_id: str, x: TensorLike, target: TensorLike, loss: EnumLike = "mse",
                   expected_step: Optional[int] = None, want_output: bool = False,
                   timeout: Optional[float] = None) -> TrainStepResult:
        """Forward, loss, backward and update in one call.

        loss: "mse" or "cross_entropy" ("ce"), in any case, as the CLI's --loss; or the enum.
        target: float32 [batch, out] for "mse"; class indices [batch] for "cross_entropy" (any
        integer dtype; sent as int64). x and target: numpy arrays or torch tensors.
        expected_step: the model's current step; None reads it with get_model first (then the
        call is exactly-once only against other retries of itself). Returns
        TrainStepResult(loss, step, output, layers, replayed); output is a torch tensor on x's
        device when x is one.
        """
        loss_value = _enum(trainer_pb2.TrainStepRequest.Loss, loss, "", "loss", _LOSS_ALIASES)
        if is_torch(target):
            target = torch_to_numpy(target, "target")
        if loss_value == trainer_pb2.TrainStepRequest.CROSS_ENTROPY and \
                hasattr(target, "dtype") and target.dtype.kind in "iu":
            target = target.astype("int64", copy=False)
        if expected_step is None:
            expected_step = self.get_model(model_id, timeout=timeout).step
        req = trainer_pb2.TrainStepRequest(
            model_id=model_id, input=to_wire_tensor(x, "input", self._wire),
            target=to_wire_tensor(target, "target", self._wire), loss=loss_value,
            expected_step=expected_step, want_output=want_output, output_dtype=self._wire)
        resp = self._unary("TrainStep", req, True, timeout)
        output = _like(x, to_float32(resp.output, "output")) if resp.HasField("output") else None
        return TrainStepResult(resp.loss, resp.step, output, list(resp.layers), resp.replayed)

    def train_stream(self, model_id: str, batches: Iterable[Tuple[TensorLike, TensorLike]],
                     loss: EnumLike = "mse", expected_step: Optional[int] = None,
                     want_output: bool = False) -> Iterator[TrainStepResult]:
        """TrainSteps of ``batches`` (an iterable of (x, target) pairs, numpy arrays or torch
        tensors) over one TrainStream: each is sent without waiting for the answers before it,
        with expected_step counting up from ``expected_step`` (None: the model's step, read
        first). Yields each step's TrainStepResult in order, as train_step returns it.

        The server applies the steps in the order sent, each exactly once, and holds back a
        producer that runs ahead of it by more than its window (ServerInfo.stream_window). A step
        that fails raises tscale.Error naming its expected_step; nothing after it is applied.
        A stream that breaks (UNAVAILABLE: a restart, a dropped link) is resumed within
        ``retry_seconds`` from the model's step: the steps the server applied are not sent
        again; one applied whose answer was lost, older than the last, yields a result with
        loss NaN and replayed=True.
        """
        from tscale import stream  # noqa: PLC0415 (the module imports this one's helpers)
        loss_value = _enum(trainer_pb2.TrainStepRequest.Loss, loss, "", "loss", _LOSS_ALIASES)
        return stream.train_stream(self, model_id, batches, loss_value, expected_step,
                                   want_output, TrainStepResult, _like)

    # ------------------------------------------------------------ state

    def export_state(self, model_id: str, timeout: Optional[float] = None) -> bytes:
        """The model's whole persistent state as the bytes of one safetensors file (read it with
        tscale.safetensors.loads)."""
        req = trainer_pb2.ExportStateRequest(model_id=model_id)

        def fn(t: Optional[float]) -> bytes:
            stream = self._stub.ExportState(req, timeout=t, metadata=self._metadata)
            return b"".join(chunk.data for chunk in stream)
        return self._call("ExportState", fn, True, timeout)

    def import_state(self, model_id: str,
                     data: Union[bytes, bytearray, memoryview, str, os.PathLike],
                     spec: Optional[SpecLike] = None, device: str = "",
                     compute: EnumLike = "COMPUTE_TYPE_UNSPECIFIED", replace: bool = False,
                     timeout: Optional[float] = None,
                     chunk_bytes: int = CHUNK_BYTES) -> trainer_pb2.ModelInfo:
        """Creates (or with replace=True replaces) a model from a state file.

        data: the file's bytes, or a path to it. spec: optional (dict/JSON/ModelSpec); without it
        the file's ``__metadata__.spec`` is used. Sends a header, then the file in chunks of
        chunk_bytes (1 MiB; at most the server's --max-message-bytes). Returns
        trainer_pb2.ModelInfo. Never retried.
        """
        if isinstance(data, (str, os.PathLike)):
            with open(data, "rb") as f:
                data = f.read()
        data = memoryview(data).cast("B")
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes: expected >= 1, got {chunk_bytes}")
        header = trainer_pb2.ImportHeader(
            model_id=model_id, device=device, replace=replace,
            compute=_enum(trainer_pb2.ComputeType, compute, "COMPUTE_", "compute"))
        if spec is not None:
            header.spec.CopyFrom(to_spec(spec))

        def requests() -> Iterator[trainer_pb2.ImportStateRequest]:
            yield trainer_pb2.ImportStateRequest(header=header)
            for off in range(0, len(data), chunk_bytes):
                yield trainer_pb2.ImportStateRequest(data=bytes(data[off:off + chunk_bytes]))

        return self._call(
            "ImportState",
            lambda t: self._stub.ImportState(requests(), timeout=t, metadata=self._metadata),
            False, timeout)

    def save_checkpoint(self, model_id: str,
                        timeout: Optional[float] = None) -> trainer_pb2.CheckpointInfo:
        """Writes a checkpoint (server --checkpoint-dir); returns trainer_pb2.CheckpointInfo."""
        return self._unary("SaveCheckpoint", trainer_pb2.SaveCheckpointRequest(model_id=model_id),
                           False, timeout)

    def list_checkpoints(self, model_id: str,
                         timeout: Optional[float] = None) -> List[trainer_pb2.CheckpointInfo]:
        """A list of trainer_pb2.CheckpointInfo of the model's checkpoints."""
        return list(self._unary("ListCheckpoints",
                                trainer_pb2.ListCheckpointsRequest(model_id=model_id), True,
                                timeout).checkpoints)

    def restore_checkpoint(self, model_id: str, name: str = "", device: str = "",
                           compute: EnumLike = "COMPUTE_TYPE_UNSPECIFIED",
                           timeout: Optional[float] = None, new_model_id: str = "",
                           discard_newer: bool = False,
                           from_deleted: bool = False) -> trainer_pb2.ModelInfo:
        """Loads a checkpoint (name "" = the newest valid one); returns trainer_pb2.ModelInfo.

        new_model_id restores it as a new model of that id (a branch; model_id's model and
        checkpoints stay). Restoring in place a checkpoint older than the newest is refused
        (FAILED_PRECONDITION) unless discard_newer, which removes the later checkpoints.
        from_deleted first takes back the checkpoints of the model last deleted under model_id
        (kept by the server for --deleted-retention-hours).
        """
        req = trainer_pb2.RestoreCheckpointRequest(
            model_id=model_id, name=name, device=device,
            compute=_enum(trainer_pb2.ComputeType, compute, "COMPUTE_", "compute"),
            new_model_id=new_model_id, discard_newer=discard_newer, from_deleted=from_deleted)
        return self._unary("RestoreCheckpoint", req, False, timeout)

    # ------------------------------------------------------------ statistics

    def scale_stats(self, model_id: str, per_group: bool = False,
                    timeout: Optional[float] = None) -> trainer_pb2.ScaleStats:
        """trainer_pb2.ScaleStats: per ternary layer the drift (log2 S - E) mean, min, max, mean
        of |drift|, saturated fraction and a histogram; with per_group each layer's log2 S per
        group as an FP32 Tensor (tscale.to_numpy(layer.log2_scale))."""
        req = trainer_pb2.GetScaleStatsRequest(model_id=model_id, include_per_group=per_group)
        return self._unary("GetScaleStats", req, True, timeout)
