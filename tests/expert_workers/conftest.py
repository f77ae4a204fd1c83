"""Fixtures the expert-group tests share: one tiny-v3 group hosting experts 0-7, and a gRPC server for it.
Imports stay inside the fixtures: the Triton kernel tests here collect without gRPC or Ray."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

HOSTED = [0, 1, 2, 3, 4, 5, 6, 7]  # the experts the shared group holds


@pytest.fixture(scope="module")
def group(model_dirs):
    from expert_workers.expert_group import ExpertGroup

    return ExpertGroup(model_dirs["tiny-v3"], HOSTED, device=0)


@pytest.fixture(scope="module")
def channel(group) -> Iterator:
    """A channel to a real ExpertServer on 127.0.0.1 serving `group`."""
    import grpc

    from expert_workers.grpc_server import ExpertServer
    from protos.channel import channel_options

    with ExpertServer(group) as srv, grpc.insecure_channel(srv.address, options=channel_options()) as ch:
        yield ch
