"""Per-request routing traces: for every token position and MoE layer, the experts, weights and devices used."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from router_service.routing import Routing

logger = logging.getLogger(__name__)

# Shape legend: P = token positions routed so far, L = MoE layers, K = experts per token, N = a step's tokens,
# M = devices top-M routing chose per token.


def _own(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A compact CPU copy: a row slice of a step's [N, ...] tensor would otherwise pin the whole tensor."""
    return t.to(device="cpu", dtype=dtype, memory_format=torch.contiguous_format, copy=True)


@dataclass
class RequestTrace:
    """The routing one request received. Position p is the p-th token fed to the model (prompt, then generated)."""

    request_id: str
    layers: list[int]
    top_k: int
    prompt_tokens: int = 0
    tokens: list[int] = field(default_factory=list)  # the token at each position
    prompt: list[int] = field(default_factory=list, repr=False)  # the prompt's ids, when given at start
    _ids: list[torch.Tensor] = field(default_factory=list)  # chunks [n, L, K] int32
    _weights: list[torch.Tensor] = field(default_factory=list)  # chunks [n, L, K] float32
    _devices: list[torch.Tensor] = field(default_factory=list)  # chunks [n, L, K] int32
    _by_limit: list[torch.Tensor] = field(default_factory=list)  # chunks [n, L] bool
    _by_bias: list[torch.Tensor] = field(default_factory=list)
    nbytes: int = 0  # bytes of the tensor chunks held

    def add(self, tokens: list[int], ids, weights, devices, by_limit, by_bias) -> int:
        """Append n positions (compact copies of the given [n, ...] rows); returns the bytes added."""
        chunks = (_own(ids, torch.int32), _own(weights, torch.float32), _own(devices, torch.int32),
                  _own(by_limit, torch.bool), _own(by_bias, torch.bool))
        self.tokens.extend(tokens)
        for kept, chunk in zip((self._ids, self._weights, self._devices, self._by_limit, self._by_bias), chunks,
                               strict=True):
            kept.append(chunk)
        added = sum(c.nbytes for c in chunks)
        self.nbytes += added
        return added

    def add_cached(self, n: int) -> None:
        """Append n prompt positions whose latent cache came from the prefix cache: this request never routed
        them (expert and device -1, weight 0; the token ids are filled in from the prompt when known)."""
        start = len(self.tokens)
        self.add(self.prompt[start:start + n] if len(self.prompt) >= start + n else [-1] * n,
                 torch.full((n, len(self.layers), self.top_k), -1, dtype=torch.int32),
                 torch.zeros(n, len(self.layers), self.top_k), torch.full((n, len(self.layers), self.top_k), -1,
                                                                          dtype=torch.int32),
                 torch.zeros(n, len(self.layers), dtype=torch.bool), torch.zeros(n, len(self.layers), dtype=torch.bool))

    def snapshot(self) -> RequestTrace:
        """A copy that later appends do not change (chunks are never modified, so they are shared)."""
        return dataclasses.replace(self, tokens=list(self.tokens), _ids=list(self._ids),
                                   _weights=list(self._weights), _devices=list(self._devices),
                                   _by_limit=list(self._by_limit), _by_bias=list(self._by_bias))

    def _cat(self, chunks: list[torch.Tensor], shape_tail: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.cat(chunks) if chunks else torch.empty((0, *shape_tail), dtype=dtype)

    @property
    def ids(self) -> torch.Tensor:
        """[P, L, K] int32 global expert ids."""
        return self._cat(self._ids, (len(self.layers), self.top_k), torch.int32)

    @property
    def weights(self) -> torch.Tensor:
        return self._cat(self._weights, (len(self.layers), self.top_k), torch.float32)

    @property
    def devices(self) -> torch.Tensor:
        return self._cat(self._devices, (len(self.layers), self.top_k), torch.int32)

    @property
    def changed_by_top_m(self) -> torch.Tensor:
        return self._cat(self._by_limit, (len(self.layers),), torch.bool)

    @property
    def changed_by_bias(self) -> torch.Tensor:
        return self._cat(self._by_bias, (len(self.layers),), torch.bool)

    def routed_experts(self) -> np.ndarray:
        """int32 [tokens, layers, top_k]: the "routed experts" array other serving engines return."""
        return self.ids.numpy().astype(np.int32)

    def to_json(self) -> dict:
        return {
            "request_id": self.request_id, "layers": self.layers, "top_k": self.top_k,
            "prompt_tokens": self.prompt_tokens, "tokens": self.tokens,
            "expert_ids": self.ids.tolist(), "weights": self.weights.tolist(), "devices": self.devices.tolist(),
            "changed_by_top_m": self.changed_by_top_m.tolist(), "changed_by_bias": self.changed_by_bias.tolist(),
        }

    @classmethod
    def from_json(cls, d: dict) -> RequestTrace:
        trace = cls(d["request_id"], d["layers"], d["top_k"], d["prompt_tokens"])
        if d["tokens"]:
            trace.add(d["tokens"], torch.tensor(d["expert_ids"], dtype=torch.int32),
                      torch.tensor(d["weights"], dtype=torch.float32), torch.tensor(d["devices"], dtype=torch.int32),
                      torch.tensor(d["changed_by_top_m"]), torch.tensor(d["changed_by_bias"]))
        return trace

    def expert_counts(self, n_experts: int) -> np.ndarray:
        """[L, n_experts] how many of this request's tokens each expert served, per layer (positions taken from
        the prefix cache, id -1, were served for another request and are not counted)."""
        ids = self.ids
        out = np.zeros((len(self.layers), n_experts), dtype=np.int64)
        for j in range(len(self.layers)):
            routed = ids[:, j].flatten().long()
            out[j] = torch.bincount(routed[routed >= 0], minlength=n_experts).numpy()
        return out

    def table(self) -> str:
        """One line per (position, layer): token, experts with weights and devices, what changed the choice."""
        lines = [f"request {self.request_id}: {len(self.tokens)} positions ({self.prompt_tokens} prompt), "
                 f"MoE layers {self.layers}, top-{self.top_k}",
                 f"{'pos':>4} {'token':>6} {'layer':>5}  experts (weight @ device)"]
        ids, w, dev = self.ids, self.weights, self.devices
        lim, bias = self.changed_by_top_m, self.changed_by_bias
        for p, tok in enumerate(self.tokens):
            for j, layer in enumerate(self.layers):
                slots = zip(ids[p, j].tolist(), w[p, j].tolist(), dev[p, j].tolist(), strict=True)
                experts = " ".join(f"{e}({x:.3f}@{d})" for e, x, d in slots)
                notes = ("  [top-M changed]" if lim[p, j] else "") + ("  [bias changed]" if bias[p, j] else "")
                lines.append(f"{p:>4} {tok:>6} {layer:>5}  {experts}{notes}")
        return "\n".join(lines)

    def heatmap_png(self, path: str | Path, n_experts: int) -> Path:
        """A layer × expert heatmap of this request's token counts (needs matplotlib)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise RuntimeError("--png needs matplotlib: pip install matplotlib") from None
        counts = self.expert_counts(n_experts)
        fig, ax = plt.subplots(figsize=(max(6, n_experts * 0.18), 1.2 + 0.45 * len(self.layers)))
        im = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(len(self.layers)), [f"layer {layer}" for layer in self.layers])
        ax.set_xlabel("expert")
        ax.set_title(f"request {self.request_id}: tokens per expert ({len(self.tokens)} positions)")
        fig.colorbar(im, ax=ax, label="tokens")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


class RoutingTraceStore:
    """Request traces bounded by count and bytes, optionally mirrored as <dir>/<request_id>.json.

    Only finished traces are evicted (the one finished longest ago first): a running request keeps its trace.
    Thread-safe: the engine thread starts, records and finishes traces while HTTP handlers read them.
    """

    def __init__(self, capacity: int, directory: str | None = None, max_bytes: int = 256 << 20) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.directory = Path(directory) if directory else None
        self._lock = threading.Lock()
        self._traces: dict[str, RequestTrace] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()  # in finishing order; only these are evicted
        self.nbytes = 0  # tensor bytes of every trace held
        self.evicted = 0

    def start(self, request_id: str, layers: list[int], top_k: int, prompt: int | list[int]) -> RequestTrace:
        """A new running trace; `prompt` is the prompt's token ids (or just its length)."""
        with self._lock:
            if request_id in self._traces:
                raise ValueError(f"request_id={request_id!r}: already traced; request ids must be unique")
            ids = list(prompt) if isinstance(prompt, (list, tuple)) else []
            trace = RequestTrace(request_id, layers, top_k, len(ids) if ids else prompt, prompt=ids)
            self._traces[request_id] = trace
            self._evict()
            return trace

    def finish(self, request_id: str) -> None:
        """Mark a trace complete (evictable from now on) and mirror it to the directory, if one is configured."""
        with self._lock:
            trace = self._traces.get(request_id)
            if trace is None or request_id in self._finished:
                return
            self._finished[request_id] = None
            if self.directory is not None:
                try:
                    self.directory.mkdir(parents=True, exist_ok=True)
                    (self.directory / f"{request_id}.json").write_text(json.dumps(trace.to_json()))
                except OSError:  # the mirror is best effort; the request itself has finished
                    logger.exception("routing trace %s: cannot write it to %s", request_id, self.directory)
            self._evict()

    def get(self, request_id: str) -> RequestTrace:
        """A snapshot of the trace (a running request's trace keeps growing in the store, not in the snapshot)."""
        with self._lock:
            trace = self._traces.get(request_id)
            if trace is None:
                raise KeyError(f"request_id={request_id!r}: no routing trace (never seen, or evicted: the store keeps "
                               f"the last {self.capacity} requests within {self.max_bytes / 2**20:g} MB)")
            return trace.snapshot()

    def __contains__(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._traces

    def __len__(self) -> int:
        with self._lock:
            return len(self._traces)

    def _evict(self) -> None:
        """Drop finished traces, oldest first, until both bounds hold (or only running traces are left)."""
        while self._finished and (len(self._traces) > self.capacity or self.nbytes > self.max_bytes):
            old, _ = self._finished.popitem(last=False)
            self.nbytes -= self._traces.pop(old).nbytes
            self.evicted += 1
            if self.directory is not None:
                (self.directory / f"{old}.json").unlink(missing_ok=True)

    def record_step(
        self, traces: list[RequestTrace], starts: list[int], offsets: list[int], lengths: list[int],
        tokens: list[list[int]], routings: dict[int, Routing],
    ) -> None:
        """Append one forward step's routing to the traces of the sequences in it. Sequence i's rows are its
        positions starts[i]...; positions a trace already holds (recomputed after a preemption) are not added
        again, and positions before starts[i] that it lacks (taken from the prefix cache) are added as cached.
        Each pair's device is the one its dispatch sent it to (`Routing.served`: per-layer layouts and copies)."""
        layers = sorted(routings)
        if not layers:
            with self._lock:
                for trace, start, toks in zip(traces, starts, tokens, strict=True):
                    trace.tokens.extend(toks[len(trace.tokens) - start:])
            return
        ids = torch.stack([routings[layer].ids for layer in layers], dim=1).to(torch.int32)  # [N, L, K]
        weights = torch.stack([routings[layer].weights for layer in layers], dim=1).float()
        flags = [routings[layer].change_flags() for layer in layers]
        by_limit = torch.stack([f[0] for f in flags], dim=1)  # [N, L]
        by_bias = torch.stack([f[1] for f in flags], dim=1)
        devices = torch.stack([routings[layer].served for layer in layers], dim=1).to(torch.int32)  # [N, L, K]
        ids, weights, devices, by_limit, by_bias = (t.cpu() for t in (ids, weights, devices, by_limit, by_bias))
        with self._lock:
            for trace, start, off, n, toks in zip(traces, starts, offsets, lengths, tokens, strict=True):
                held = len(trace.tokens)
                if held < start:
                    trace.add_cached(start - held)
                skip = max(0, held - start)
                if skip >= n:
                    continue
                rows = slice(off + skip, off + n)
                added = trace.add(toks[skip:], ids[rows], weights[rows], devices[rows], by_limit[rows],
                                  by_bias[rows])
                if self._traces.get(trace.request_id) is trace:
                    self.nbytes += added
            self._evict()
