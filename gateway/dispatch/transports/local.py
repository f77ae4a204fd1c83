"""The in-process transport: expert groups in the gateway's own process, the reference path (no bytes move)."""

from __future__ import annotations

from typing import Any

from expert_workers.spans import traced_run
from gateway.dispatch.transports.interface import ExpertCall, ExpertReply, Transport


class LocalTransport(Transport):
    """Each send runs its group at once; receive hands the replies back."""

    def __init__(self, groups: list) -> None:
        self.groups = groups  # ExpertGroup per device
        self.tracer = None

    def send(self, call: ExpertCall) -> ExpertReply:
        result = traced_run(self.groups[call.device], self.tracer, call.carrier, "local", call.layer,
                            call.device_rows(), call.ids, call.weights, version=call.version)
        return ExpertReply(result.output, result.compute_ms)

    def flush(self) -> None:
        pass  # each send already ran

    def receive(self, calls: list[ExpertCall], handles: list[Any]) -> list[ExpertReply]:
        return list(handles)

    def close(self) -> None:
        self.groups = []

    def stage_placement(self, placement) -> None:
        for d, group in enumerate(self.groups):
            group.stage(placement.version, placement.experts_on(d), placement.layer_overrides(d))

    def release_placements(self, keep: int) -> None:
        for group in self.groups:
            group.release(keep)
