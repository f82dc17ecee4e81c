"""The exception every failed tscale call raises."""

from __future__ import annotations

from typing import Optional

import grpc


class Error(Exception):
    """A call to the tscale server failed.

    Attributes:
        code: the gRPC status code (a ``grpc.StatusCode``), e.g. ``grpc.StatusCode.NOT_FOUND``.
        message: the server's message; it names the field, what was expected and what came,
            e.g. ``"input: expected 64 features, got 63"``.
        method: the API method that failed, e.g. ``"Forward"`` (empty when unknown).
        details: gRPC's own text of the failure; the same as ``message`` unless the client put
            it in its own words (a connection failure: "no tscale-server answering at
            HOST:PORT (connection refused)").
    """

    def __init__(self, code: grpc.StatusCode, message: str, method: str = "",
                 details: Optional[str] = None) -> None:
        self.code = code
        self.message = message
        self.method = method
        self.details = message if details is None else details
        name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        where = f"{method}: " if method else ""
        super().__init__(f"{where}{name}: {message}")

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError, method: str = "") -> Error:
        """Wraps a ``grpc.RpcError`` (as raised by the generated stubs) in an Error of its code
        and details; ``method`` names the API method that failed."""
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        details = err.details() if hasattr(err, "details") else str(err)
        return cls(code if code is not None else grpc.StatusCode.UNKNOWN, details or "", method)
