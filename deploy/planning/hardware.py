"""Hardware rates for the planner: a GPU's and its links' nominal rates (deploy/hardware/*.yaml), and the transport,
expert-compute and gateway-step rates `expertmesh plan --calibrate` measures on the machine at hand. Read and written
as YAML, validated once here; errors name the field."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from model_core.yaml_file import read_yaml_mapping


@dataclass(frozen=True)
class TransportRate:
    """A transport measured on this machine: one call's fixed cost and its cost per MB moved (out + back); of the
    fixed cost, `caller_us` is spent on the caller's own thread (sending the call, taking its reply), which a
    gateway's calls to several groups pay one after another (0: not measured)."""

    call_us: float
    us_per_mb: float
    caller_us: float = 0.0

    def seconds(self, nbytes: float) -> float:
        return (self.call_us + self.us_per_mb * nbytes / 1e6) * 1e-6


@dataclass(frozen=True)
class ExpertRate:
    """An expert group's compute measured on this machine: a fixed cost per call plus, per expert hit, a cost that
    depends on the rows it computes (`per_expert_us`: (rows, us) points, interpolated linearly, extended along
    the last segment). Small batches are far from linear on a CPU: a matmul of 1 row and of 6 rows of the same
    weights cost nearly the same (both read the weights), so the rows per expert matter, not only the pairs."""

    base_us: float
    per_expert_us: tuple[tuple[float, float], ...]

    def expert_us(self, rows: float) -> float:
        pts = self.per_expert_us
        if len(pts) == 1:
            return pts[0][1]
        for (r0, t0), (r1, t1) in zip(pts, pts[1:], strict=False):
            if rows <= r1 or (r1, t1) == pts[-1]:
                return max(t0 + (t1 - t0) * (rows - r0) / (r1 - r0), 0.0)
        return pts[-1][1]

    def seconds(self, pairs: int, experts_hit: int) -> float:
        """A device batch of `pairs` (token, expert) pairs over `experts_hit` experts (their mean rows each)."""
        if pairs == 0:
            return 0.0
        return (self.base_us + experts_hit * self.expert_us(pairs / experts_hit)) * 1e-6


@dataclass(frozen=True)
class GatewayRate:
    """A gateway's own decode step measured on this machine, everything but the routed experts (attention, dense
    layers, shared experts, router, dispatch plan and combine, sampling, scheduler): `base_us + per_token_us` per
    token in the step, with `threads` torch threads."""

    base_us: float
    per_token_us: float
    threads: int

    def seconds(self, tokens: int) -> float:
        return (self.base_us + self.per_token_us * tokens) * 1e-6


class HardwareError(ValueError):
    """A hardware file is missing a rate, has an unknown key or a value out of range; the message names it."""


_UNITS = {
    "matmul_tflops": "dense bf16 matmul TFLOP/s per GPU",
    "hbm_gbytes_per_s": "HBM GB/s per GPU",
    "intra_node_gbytes_per_s": "NVLink GB/s per GPU, one direction",
    "intra_node_latency_us": "microseconds per message inside a node",
    "inter_node_gbytes_per_s": "InfiniBand GB/s per GPU, one direction",
    "inter_node_latency_us": "microseconds per message between nodes",
}


OPTIONAL = ("transports", "experts", "gateway", "cores")  # Hardware fields only a calibrated file has
UNKNOWN_OK = ("memory_gb",)  # fields a file may leave out (older files): unknown, and what needs them says so


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _numbers(name: str, raw: Any, keys: tuple[str, ...], numbers: tuple[str, ...] | None = None) -> dict[str, Any]:
    """A mapping with exactly `keys`, those in `numbers` (default: all) numbers >= 0; errors name the field."""
    if not isinstance(raw, dict) or sorted(raw) != sorted(keys):
        raise HardwareError(f"{name}={raw!r}: expected a mapping with {list(keys)}")
    for key in numbers if numbers is not None else keys:
        if not _is_number(raw[key]) or raw[key] < 0:
            raise HardwareError(f"{name}.{key}={raw[key]!r}: expected a number >= 0")
    return raw


def _rate_keys(rate: Any) -> tuple[str, ...]:
    """A transport rate's keys: call_us and us_per_mb, and caller_us where the file has it (older files do not)."""
    return ("call_us", "us_per_mb", "caller_us") if isinstance(rate, dict) and "caller_us" in rate else \
        ("call_us", "us_per_mb")


@dataclass(frozen=True)
class Hardware:
    """Rates of one GPU and its links, and its memory (GB = 1e9 bytes). Loaded from a YAML file
    (deploy/hardware/*.yaml)."""

    name: str
    matmul_tflops: float
    hbm_gbytes_per_s: float
    intra_node_gbytes_per_s: float
    intra_node_latency_us: float
    inter_node_gbytes_per_s: float
    inter_node_latency_us: float
    gpus_per_node: int
    memory_gb: float | None = None  # memory per GPU, GB (1e9 bytes); None: unknown (files written before it)
    # Measured on the machine at hand by `expertmesh plan --calibrate` (absent from the nominal files):
    transports: dict[str, TransportRate] = field(default_factory=dict)  # backend -> per-call and per-MB cost
    experts: ExpertRate | None = None  # an expert group's compute on this machine (its CPU kernels)
    gateway: GatewayRate | None = None  # a gateway's own step on this machine (None: priced at the roofline)
    cores: float | None = None  # cores' worth of work this machine's Ray workers got at once when calibrated

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise HardwareError(f"name={self.name!r}: expected a non-empty string")
        for name, unit in _UNITS.items():
            value = getattr(self, name)
            zero_ok = name.endswith("latency_us")
            number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            if not number or value < 0 or (value == 0 and not zero_ok):
                raise HardwareError(f"{name}={value!r}: expected a number {'>= 0' if zero_ok else '> 0'} ({unit})")
        if isinstance(self.gpus_per_node, bool) or not isinstance(self.gpus_per_node, int) or self.gpus_per_node < 1:
            raise HardwareError(f"gpus_per_node={self.gpus_per_node!r}: expected an integer >= 1")
        if self.memory_gb is not None and (not _is_number(self.memory_gb) or self.memory_gb <= 0):
            raise HardwareError(f"memory_gb={self.memory_gb!r}: expected a number > 0 (GB of memory per GPU)")
        if self.cores is not None and (not _is_number(self.cores) or self.cores <= 0):
            raise HardwareError(f"cores={self.cores!r}: expected a number > 0 (cores' worth of work at once)")
        if not isinstance(self.transports, dict) or not all(isinstance(t, TransportRate)
                                                            for t in self.transports.values()):
            raise HardwareError(f"transports={self.transports!r}: expected "
                                "{backend: {call_us, us_per_mb[, caller_us]}}")

    @classmethod
    def from_dict(cls, raw: Any, source: str = "hardware") -> Hardware:
        """Validate a mapping with exactly the dataclass's fields; errors name `source` and the field."""
        if not isinstance(raw, dict):
            raise HardwareError(f"{source}: expected a mapping of rates, got {type(raw).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(raw) - set(names))
        if unknown:
            raise HardwareError(f"{source}: unknown keys {unknown} (expected {names})")
        missing = [n for n in names if n not in raw and n not in OPTIONAL + UNKNOWN_OK]
        if missing:
            raise HardwareError(f"{source}: {missing[0]}: missing ({_UNITS.get(missing[0], 'required')})")
        raw = dict(raw)
        try:
            raw["transports"] = {name: TransportRate(**_numbers(f"transports.{name}", rate, _rate_keys(rate)))
                                 for name, rate in (raw.get("transports") or {}).items()}
            if raw.get("experts") is not None:
                e = _numbers("experts", raw["experts"], ("base_us", "per_expert_us"), numbers=("base_us",))
                points = e["per_expert_us"]
                if not isinstance(points, list) or not points or not all(
                        isinstance(p, (list, tuple)) and len(p) == 2 and all(_is_number(v) and v >= 0 for v in p)
                        for p in points):
                    raise HardwareError(f"experts.per_expert_us={points!r}: expected [[rows, us], ...] numbers >= 0")
                raw["experts"] = ExpertRate(e["base_us"], tuple((float(r), float(t)) for r, t in points))
            if raw.get("gateway") is not None:
                g = _numbers("gateway", raw["gateway"], ("base_us", "per_token_us", "threads"))
                if isinstance(g["threads"], float) or g["threads"] < 1:
                    raise HardwareError(f"gateway.threads={g['threads']!r}: expected an integer >= 1")
                raw["gateway"] = GatewayRate(float(g["base_us"]), float(g["per_token_us"]), g["threads"])
            return cls(**raw)
        except HardwareError as exc:
            raise HardwareError(f"{source}: {exc}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> Hardware:
        return cls.from_dict(read_yaml_mapping(path, "the hardware file", HardwareError), str(path))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.experts is not None:
            out["experts"]["per_expert_us"] = [list(p) for p in self.experts.per_expert_us]
        return out

    @property
    def calibrated(self) -> bool:
        """Whether `expertmesh plan --calibrate` measured any rate of this file (the nominal files: no)."""
        return bool(self.transports) or self.experts is not None or self.gateway is not None or self.cores is not None

    @property
    def flops(self) -> float:
        return self.matmul_tflops * 1e12

    @property
    def hbm(self) -> float:
        return self.hbm_gbytes_per_s * 1e9


def hardware_yaml(hw: Hardware, where: dict[str, str]) -> str:
    """A hardware file with each value's origin in a comment."""
    lines = ["# written by `expertmesh plan --calibrate`"]
    for key, value in hw.to_dict().items():
        lines.append(f"{key}: {json.dumps(value)}  # {where.get(key, '')}".rstrip(" #"))
    return "\n".join(lines) + "\n"
