"""CallMerger: an expert group's calls for one MoE layer and placement version, from any number of gateways,
computed in one grouped pass when they wait together (no barrier, no added wait: an idle group computes at once)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from expert_workers.expert_group import ExpertGroup, ExpertLayout, ExpertRequestError, ExpertResult
from expert_workers.joined_pass import Call, JoinedPass

# Shape legend: T = one call's tokens, H = hidden, K = experts per token, E = the layer's local experts.


@dataclass(eq=False)
class _Call:
    """One caller's call: waiting, then answered by the pass that computed it (output or error)."""

    layer: int
    version: int | None  # resolved by `ExpertGroup.check` once it waited (None only for a call computed at once)
    hidden: torch.Tensor  # [T, H]
    ids: torch.Tensor  # [T, K]
    weights: torch.Tensor  # [T, K]
    layout: ExpertLayout | None = None  # what the check resolved `version` to
    output: torch.Tensor | None = None  # [T, H] in hidden's dtype and device
    tokens_per_expert: torch.Tensor | None = None  # [E]: the pass's counts when it computed this call alone
    compute_ms: float = 0.0
    calls_in_pass: int = 0
    error: BaseException | None = None
    refused: bool = False  # the group's run refused it (a call computed at once is checked there)
    done: bool = False

    @property
    def key(self) -> tuple[int, int | None, int]:
        """Calls merge by layer and placement version; K too, so that their routings stack as they are."""
        return self.layer, self.version, self.ids.shape[1]


@dataclass
class _Counts:
    calls: int = 0
    passes: int = 0
    rows: int = 0
    merged_calls: int = 0  # calls that shared their pass with at least one other
    compute_s: float = 0.0
    max_calls_per_pass: int = 0


class CallMerger:
    """The one way into an ExpertGroup's compute for every transport of a replica (Ray, RDT, compiled graphs, gRPC).

    One pass at a time, through `ExpertGroup.run`. A call arriving while the group is idle is computed at once;
    calls arriving during a pass wait, and the next pass takes the oldest waiting call's (layer, placement version,
    K) and every waiting call with the same key, concatenated (other keys wait their turn: FIFO by oldest call).
    A call is checked on its own before it waits, so a malformed call raises its own error and never reaches a
    merged pass. A row's output is its row of the concatenation's forward: equal to the call computed alone
    wherever the device's kernels give a row the same bits in batches of any size (float32 on CPU: where its BLAS
    does; always for rows whose experts see no other call's rows). enabled=False: every pass computes one call
    (still counted).

    Joining (join=True, where the pass runs the torch FFN's per-expert loop: the torch kernel on CPU, bfloat16, or
    float32 steps the loop serves; expert_workers/joined_pass.py): a call of the running pass's key that arrives
    while it computes joins it before its next expert, and the experts it missed are computed at the end of the
    pass, so gateways whose calls alternate fall into step. Elsewhere (Triton, grouped_mm, padded_bmm) passes
    merge whole calls only. A joined call counts as merged; the pass's rows and compute time include it.
    `before_expert(e)`, when set, is called before each expert of a joinable pass (tests hold a pass there).
    """

    def __init__(self, group: ExpertGroup, enabled: bool = True, join: bool = True) -> None:
        self.group = group
        self.enabled = enabled
        self.join = join
        self.before_expert: Callable[[int], None] | None = None
        self._cond = threading.Condition()  # guards everything below
        self._waiting: deque[_Call] = deque()
        self._busy = False  # a pass is computing
        self._counts = _Counts()

    def run(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
            version: int | None = None) -> ExpertResult:
        """ExpertGroup.run's contract (hidden [T, H], topk_ids [T, K], topk_weights [T, K] -> ExpertResult), computed
        in a pass with the calls waiting beside it; compute_ms is that pass's compute time."""
        with self._cond:
            at_once = not self._busy and not self._waiting
            self._busy = self._busy or at_once
        if at_once:  # the group is idle: this call is the pass (the group's run checks it)
            call = _Call(layer, version, hidden, topk_ids, topk_weights)
            self._pass([call])
        else:  # checked before it waits: a malformed call raises here and never reaches a merged pass
            layout = self.group.check(layer, hidden, topk_ids, topk_weights, version)
            call = _Call(layer, layout.version, hidden, topk_ids, topk_weights, layout)
            with self._cond:
                self._waiting.append(call)
            self._wait_or_lead(call)
        if call.error is not None:
            raise call.error
        counts = call.tokens_per_expert
        if counts is None:  # computed with others: count this call's own pairs (the server span reads them)
            local_index = call.layout.local_index[layer]
            ids = topk_ids.to(local_index.device, torch.long)
            counts = torch.bincount(local_index[ids[ids >= 0]], minlength=len(call.layout.layer_experts[layer]))
        return ExpertResult(call.output, counts, call.compute_ms, call.calls_in_pass)

    def waiting(self) -> int:
        """Calls checked and waiting for a pass (not those in the pass computing now)."""
        with self._cond:
            return len(self._waiting)

    def stats(self) -> dict[str, int | float]:
        """Since creation or `reset_stats`: calls and passes computed, rows, rows_per_pass, merged_calls (calls that
        shared their pass), merged_share (merged_calls / calls), compute_s (summed pass compute time) and
        max_calls_per_pass. Calls refused by their check are not counted."""
        with self._cond:
            c = self._counts
            return {
                "calls": c.calls, "passes": c.passes, "rows": c.rows,
                "rows_per_pass": c.rows / c.passes if c.passes else 0.0,
                "merged_calls": c.merged_calls, "merged_share": c.merged_calls / c.calls if c.calls else 0.0,
                "compute_s": c.compute_s, "max_calls_per_pass": c.max_calls_per_pass,
            }

    def reset_stats(self) -> None:
        with self._cond:
            self._counts = _Counts()

    def _wait_or_lead(self, call: _Call) -> None:
        """Wait until a pass answered `call`; whenever no pass runs, compute the next one here (the oldest key's)."""
        while True:
            with self._cond:
                while self._busy and not call.done:
                    self._cond.wait()
                if call.done:
                    return
                batch = self._take()
                self._busy = True
            self._pass(batch)

    def _take(self) -> list[_Call]:
        """The next pass (under the lock): the oldest waiting call and, merging, every waiting call with its key."""
        if not self.enabled:
            return [self._waiting.popleft()]
        key = self._waiting[0].key
        batch = [c for c in self._waiting if c.key == key]
        self._waiting = deque(c for c in self._waiting if c.key != key)
        return batch

    def _pass(self, batch: list[_Call]) -> None:
        """Compute `batch` (outside the lock: calls keep arriving and waiting meanwhile), then count it and wake its
        callers; the caller set `_busy`."""
        seconds = 0.0
        try:
            seconds = self._compute(batch)
        finally:
            with self._cond:
                self._busy = False
                self._record(batch, seconds)
                self._cond.notify_all()

    def _compute(self, batch: list[_Call]) -> float:
        """One forward over the batch's calls through the group's run, answered to each call (its rows, or the
        pass's error); the seconds it took."""
        first, g = batch[0], self.group
        start = time.perf_counter()
        try:
            joined = self._joinable(batch)
            if joined is not None:  # one expert at a time: calls of its key join it as they arrive
                answers = joined.run(lambda e: self._join(batch, e))
                outputs = [out for out, _ in answers]
                for c, (_, counts) in zip(batch, answers, strict=True):
                    c.tokens_per_expert = counts
            elif len(batch) == 1:
                result = g.run(first.layer, first.hidden, first.ids, first.weights, first.version)
                outputs = [result.output]
                first.tokens_per_expert = result.tokens_per_expert
            else:  # in the forms the group's compute converts each call to anyway (dtype, device, int64 ids)
                hidden = torch.cat([c.hidden.to(g.torch_device, g.dtype) for c in batch])  # [ΣT, H]
                ids = torch.cat([c.ids.to(g.torch_device, torch.long) for c in batch])  # [ΣT, K]
                weights = torch.cat([c.weights.to(g.torch_device) for c in batch])  # [ΣT, K] (exact widening)
                outputs = g.run(first.layer, hidden, ids, weights, first.version).output.split(
                    [c.hidden.shape[0] for c in batch])
            seconds = time.perf_counter() - start
            for c, out in zip(batch, outputs, strict=True):
                c.output = out.to(c.hidden.device, c.hidden.dtype)
                c.compute_ms, c.calls_in_pass = seconds * 1e3, len(batch)
        except ExpertRequestError as exc:  # only a call computed at once is checked here; merged ones passed before
            first.error, first.refused = exc, len(batch) == 1
            for c in batch[1:]:
                c.error = exc
        except Exception as exc:  # the pass failed: every call in it gets the error
            for c in batch:
                c.error = exc
        return time.perf_counter() - start

    def _joinable(self, batch: list[_Call]) -> JoinedPass | None:
        """The batch as a JoinedPass where calls can join it (merging and joining on, the torch kernel on CPU, the
        loop); a call computed at once is checked here first (ExpertRequestError: refused, as by the group's run)."""
        g, first = self.group, batch[0]
        if not (self.enabled and self.join and g.kernel == "torch" and g.torch_device.type == "cpu"):
            return None
        if first.layout is None:
            first.layout = g.check(first.layer, first.hidden, first.ids, first.weights, first.version)
            first.version = first.layout.version  # the pass's key: joiners name the version it resolved to
        if not JoinedPass.would_loop(g, first.layout, first.layer, [(c.hidden, c.ids, c.weights) for c in batch]):
            return None  # padded_bmm (float32 decode steps): whole calls only, sorted once by the group's run
        joined = JoinedPass(g, first.layout, first.layer)
        for c in batch:
            joined.add(c.hidden, c.ids, c.weights)
        return joined if joined.uses_loop() else None

    def _join(self, batch: list[_Call], expert: int) -> list[Call]:
        """Before `expert` of a joined pass: take the waiting calls of the pass's key into it (and into `batch`)."""
        if self.before_expert is not None:
            self.before_expert(expert)
        with self._cond:
            key = batch[0].key
            joiners = [c for c in self._waiting if c.key == key]
            if joiners:
                self._waiting = deque(c for c in self._waiting if c.key != key)
                batch.extend(joiners)
        return [(c.hidden, c.ids, c.weights) for c in joiners]

    def _record(self, batch: list[_Call], seconds: float) -> None:
        """Count the pass and mark its calls answered (under the lock); a pass cut short answers them with an error.
        A call the group's check refused is not counted."""
        for c in batch:
            if c.output is None and c.error is None:
                c.error = RuntimeError("expert forward: the pass computing this call was interrupted")
            c.done = True
        if batch[0].refused:
            return
        n, counts = len(batch), self._counts
        counts.calls += n
        counts.passes += 1
        counts.rows += sum(c.hidden.shape[0] for c in batch)
        counts.merged_calls += n if n > 1 else 0
        counts.compute_s += seconds
        counts.max_calls_per_pass = max(counts.max_calls_per_pass, n)
