"""The transport interface: one call record (`ExpertCall`) in, one `ExpertReply` out, the same for every transport.

Per MoE layer the dispatcher builds one `ExpertCall` per device batch, hands each to `Transport.send`, calls
`flush` once, and later `receive`s every call with the handles `send` returned, in the same order. Transports
differ only in how the call's bytes move (in-process, Ray actor calls, a compiled graph, gRPC, Ray Direct
Transport); none builds a positional argument tuple of its own: they read the call's fields by name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

# Shape legend: T = tokens in the layer, n = rows sent to one device, K = experts per token, H = hidden.


class DispatchError(RuntimeError):
    """An expert group failed or did not answer in time; the message names the device and layer."""


@dataclass(frozen=True, eq=False)
class ExpertCall:
    """One device's batch for one MoE layer: what a transport sends (and a replica transport sends again, to
    another replica, when the first one fails).

    `hidden` is the layer's whole batch [T, H] with `rows` naming the device's rows (the dispatcher's way: a
    transport gathers them where it copies the bytes anyway, or shares the whole batch with every call of the
    layer), or the device's own rows [n, H] when `rows` is None."""

    device: int  # the expert group (placement device) that computes it
    layer: int  # the MoE layer
    hidden: torch.Tensor  # [T, H] with rows, or [n, H]
    ids: torch.Tensor  # [n, K] global expert ids, -1 where the expert is served by another device
    weights: torch.Tensor  # [n, K] float32 combine weights
    rows: torch.Tensor | None = None  # [n] int64 indices into hidden
    carrier: dict[str, str] | None = None  # W3C trace context for the group's server span (None: tracing off)
    version: int | None = None  # the placement version the ids follow (the group serves from its experts)

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden.dtype

    @property
    def n_rows(self) -> int:
        return self.ids.shape[0]

    def device_rows(self) -> torch.Tensor:
        """The device's rows [n, H] (a gather when `rows` is set)."""
        return take_rows(self.hidden, self.rows)


@dataclass(frozen=True)
class ExpertReply:
    output: torch.Tensor  # [n, H] the weighted sum of the call's experts per row
    compute_ms: float  # the group's own compute time


class Transport(ABC):
    """How a layer's calls reach the expert groups (see the module docstring for the order of calls).

    `tracer` is set when tracing is on (only in-process groups record server spans with it; remote groups have
    their own). The placement methods load, switch and free placement versions on the groups behind the
    transport; a transport with a fixed topology refuses `stage_placement`."""

    tracer: Any = None

    @abstractmethod
    def send(self, call: ExpertCall) -> Any:
        """Start computing `call`; returns this transport's handle for it (give it back to `receive`)."""

    @abstractmethod
    def flush(self) -> None:
        """The layer's sends are over (a compiled graph sends them all now; others have already sent)."""

    @abstractmethod
    def receive(self, calls: list[ExpertCall], handles: list[Any]) -> list[ExpertReply]:
        """Wait for every call (with the handle `send` returned for it); the replies in the same order. Raises
        DispatchError naming the device and layer when a call fails for good."""

    @abstractmethod
    def close(self) -> None: ...

    def stage_placement(self, placement) -> None:
        """Every group loads `placement` beside the current one while serving; returns when all have."""
        raise ValueError(f"{type(self).__name__}: re-placement needs a replica pool or in-process groups")

    def switch_placement(self, placement) -> None:
        """Groups started or restarted from now on load `placement` (already staged)."""
        return None  # in-process groups and a fixed topology start no groups

    def release_placements(self, keep: int) -> None:
        """Every group frees the placement versions other than `keep`."""
        return None  # a transport that cannot stage holds only its one placement


def take_rows(hidden: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """The device's rows of a layer's batch (ExpertCall.rows), or hidden itself when rows is None
    (index_select: about 3× faster than advanced indexing on CPU, from 8 to 2048 rows)."""
    return hidden if rows is None else hidden.index_select(0, rows)


def describe_error(exc: BaseException) -> str:
    """`TypeName: first line of the message`, for logs and DispatchError messages."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
