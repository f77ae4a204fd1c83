"""Dispatch plans and combining: which token rows go to which device, and how partial outputs come back."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Shape legend: T = tokens in the layer, K = experts per token, H = hidden, n = rows sent to one device.


@dataclass(frozen=True)
class DeviceBatch:
    """What one expert group receives for one layer."""

    device: int
    rows: torch.Tensor  # [n] int64 token indices into the layer's batch
    ids: torch.Tensor  # [n, K] global expert ids, -1 where the expert lives on another device
    weights: torch.Tensor  # [n, K] float32


def plan_dispatch(
    ids: torch.Tensor, weights: torch.Tensor, expert_device: torch.Tensor, n_devices: int
) -> list[DeviceBatch]:
    """One batch per device that any token reaches; a token goes to a device once, with all its experts there.

    ids, weights: [T, K]; expert_device: [E] -> batches in device order.
    """
    device_of = expert_device[ids]  # [T, K]
    batches = []
    for d in range(n_devices):
        here = device_of == d  # [T, K]
        rows = torch.nonzero(here.any(dim=1)).flatten()
        if rows.numel() == 0:
            continue
        batches.append(DeviceBatch(d, rows, torch.where(here[rows], ids[rows], -1), weights[rows]))
    return batches


def combine(n_tokens: int, hidden_size: int, batches: list[DeviceBatch], partials: list[torch.Tensor],
            dtype: torch.dtype) -> torch.Tensor:
    """Scatter-add each device's partial output back in token order (devices summed in device order)."""
    out = torch.zeros(n_tokens, hidden_size, dtype=dtype)
    for batch, partial in zip(batches, partials, strict=True):
        out.index_add_(0, batch.rows, partial.to(dtype))
    return out


class DispatchStats:
    """Counters per (layer, device): token rows sent, calls, bytes out and back."""

    def __init__(self, n_devices: int) -> None:
        self.n_devices = n_devices
        self.tokens: dict[int, torch.Tensor] = {}
        self.calls = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.layers = 0  # layer dispatches completed
        self.wait_seconds = 0.0  # their wall time, send to combine

    def record(self, layer: int, batches: list[DeviceBatch], hidden_itemsize: int, hidden_size: int) -> None:
        counts = self.tokens.setdefault(layer, torch.zeros(self.n_devices, dtype=torch.long))
        for b in batches:
            n, k = b.ids.shape
            counts[b.device] += n
            self.calls += 1
            self.bytes_sent += n * hidden_size * hidden_itemsize + n * k * (b.ids.element_size() + 4)
            self.bytes_received += n * hidden_size * hidden_itemsize
