"""gRPC channel options both ends of an ExpertService channel share (so they enforce the same message limit)."""

from __future__ import annotations

MAX_MESSAGE_BYTES = 256 * 1024 * 1024


def channel_options(max_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Send/receive limits for an expert channel or server."""
    if max_bytes <= 0:
        raise ValueError(f"max_bytes={max_bytes}: expected a positive byte count")
    return [
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
    ]
