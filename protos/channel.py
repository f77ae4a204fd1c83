"""What both ends of an ExpertService channel share: message limits, TLS material and the shared token."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
TOKEN_METADATA_KEY = "authorization"


def channel_options(max_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Send/receive limits for an expert channel or server."""
    if max_bytes <= 0:
        raise ValueError(f"max_bytes={max_bytes}: expected a positive byte count")
    return [
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
    ]


def bearer(token: str) -> str:
    """The `authorization` metadata value that carries the shared token."""
    return f"Bearer {token}"


@dataclass(frozen=True)
class RpcSecurity:
    """A deployment's gRPC security, read once from its files: PEM bytes and the shared token, never paths.

    TLS is on when `tls_cert` is set (the config requires cert, key and CA together): servers present
    cert/key, clients verify them against `tls_ca`, checking `tls_server_name` instead of the dialled host
    when set. With a `token`, servers accept ExpertService calls only with `authorization: Bearer <token>`.
    The key and the token stay out of repr (and so out of logs and error messages).
    """

    tls_cert: bytes | None = None
    tls_key: bytes | None = field(default=None, repr=False)
    tls_ca: bytes | None = None
    tls_server_name: str | None = None
    token: str | None = field(default=None, repr=False)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.tls_key, self.tls_cert)])

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.tls_ca)

    def client_options(self) -> list[tuple[str, str | int]]:
        """Channel options beyond the message limits: never through an HTTP proxy (expert traffic goes straight
        to the group, whatever http_proxy says), and the name to verify the server certificate against."""
        options: list[tuple[str, str | int]] = [("grpc.enable_http_proxy", 0)]
        if self.tls and self.tls_server_name:
            options.append(("grpc.ssl_target_name_override", self.tls_server_name))
        return options

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((TOKEN_METADATA_KEY, bearer(self.token)),) if self.token else ()
