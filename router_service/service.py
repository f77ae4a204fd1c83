"""RouterService: the shared live-load picture and bias, fed by every gateway; runs as one named Ray actor."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from router_service.bias import EPLB_MODES, BalanceConfig, BiasController
from router_service.eplb import plan_placement
from router_service.load_stats import LayerReport, LayerWindow, layer_report
from router_service.placement import Placement

logger = logging.getLogger(__name__)


def window_to_wire(w: LayerWindow) -> dict:
    """A LayerWindow as plain lists (what crosses Ray: no pickled torch tensors)."""
    return {"counts": w.counts.tolist(), "score_sum": w.score_sum.tolist(), "device_tokens": w.device_tokens.tolist(),
            "tokens": w.tokens, "seq_balance_sum": w.seq_balance_sum, "sequences": w.sequences, "changed": w.changed,
            "changed_slots": w.changed_slots}


def window_from_wire(d: dict) -> LayerWindow:
    return LayerWindow(torch.tensor(d["counts"], dtype=torch.long), torch.tensor(d["score_sum"], dtype=torch.float64),
                       torch.tensor(d["device_tokens"], dtype=torch.long), int(d["tokens"]),
                       float(d["seq_balance_sum"]), int(d["sequences"]), int(d["changed"]), int(d["changed_slots"]))


class RouterService:
    """Accumulates gateways' per-layer load windows; when a layer has seen `window_tokens` tokens the window
    closes: the balance report is recorded and (in adapt mode) the bias takes one step. State is saved to
    `config.checkpoint` after each push, so a restarted actor resumes with the same bias and window.
    """

    def __init__(
        self, model_bias: dict[int, list[float]], expert_device: list[int], n_devices: int, top_k: int,
        config: BalanceConfig, devices_per_token: float | None = None,
    ) -> None:
        self.config = config
        self.expert_device = torch.tensor(expert_device, dtype=torch.long)
        self.n_devices, self.top_k, self.devices_per_token = n_devices, top_k, devices_per_token
        self.controller = BiasController({int(k): torch.tensor(v) for k, v in model_bias.items()}, config)
        self.layers = sorted(self.controller.model_bias)
        n = len(expert_device)
        self.window = {layer: LayerWindow.empty(n, n_devices) for layer in self.layers}
        self.windows_closed = 0
        self.history: list[list[dict]] = []  # layer reports of the last `history_windows` closed windows
        self.expert_loads: list[dict[int, list[int]]] = []  # per closed window: {layer: tokens per expert}
        self.proposed_at = 0  # windows_closed when the last proposal was made
        self.proposals = 0  # proposals that carried a placement
        self.current_placement: dict | None = None  # the placement the gateways last reported (propose calls)
        self._queued: dict | None = None  # a plan `expertmesh rebalance` asked for: the next propose returns it
        self.gateways: dict[str, int] = {}  # pushes per gateway
        self.restored = self._restore()

    def push(self, gateway: str, windows: dict, placement: dict | None = None) -> int:
        """Add one gateway's per-layer windows ({layer: wire dict}); returns the current bias version. placement:
        the gateway's placement when it changed since its last push (device load splits over its copies)."""
        self.gateways[gateway] = self.gateways.get(gateway, 0) + 1
        if placement is not None and placement.get("version", 0) >= (self.current_placement or {}).get("version", 0):
            self.current_placement = placement
        for layer, wire in windows.items():
            self.window[int(layer)].add(window_from_wire(wire))
        if min(self.window[layer].tokens for layer in self.layers) >= self.config.window_tokens:
            self._close_window()
        self._save()
        return self.controller.version

    def _close_window(self) -> None:
        reports = []
        for layer in self.layers:
            report = layer_report(layer, self.window[layer], self.top_k, self.expert_device, self.n_devices,
                                  self.devices_per_token, self._copy_share(layer))
            bias = self.controller.bias(layer)
            report.bias_min, report.bias_max = float(bias.min()), float(bias.max())
            reports.append(asdict(report))
        slot_share = {r["layer"]: r["changed_slot_share"] for r in reports}
        self.controller.update({layer: self.window[layer].counts for layer in self.layers}, slot_share)
        self.history.append(reports)
        del self.history[: -self.config.history_windows]
        self.expert_loads.append({layer: self.window[layer].counts.tolist() for layer in self.layers})
        del self.expert_loads[: -self.config.history_windows]
        self.windows_closed += 1
        n = len(self.expert_device)
        self.window = {layer: LayerWindow.empty(n, self.n_devices) for layer in self.layers}

    def snapshot(self, known_version: int = -1) -> tuple[int, dict[int, list[float]] | None]:
        """(version, {layer: bias}) — the bias only when it is newer than `known_version`."""
        version = self.controller.version
        if version == known_version:
            return version, None
        return version, {layer: self.controller.bias(layer).tolist() for layer in self.layers}

    def _copy_share(self, layer: int) -> torch.Tensor | None:
        """[D, E] each device's share of each expert's work in `layer` under the gateways' current placement (None
        until a gateway reported one that gives the layer its own layout)."""
        current = self.current_placement
        layout = None if current is None else (current.get("layers") or {}).get(layer)
        if layout is None and current is not None:
            layout = (current.get("layers") or {}).get(str(layer))
        if layout is None:
            return None
        share = torch.zeros(self.n_devices, len(self.expert_device), dtype=torch.float64)
        for d, experts in enumerate(layout):
            share[d, list(experts)] = 1.0
        return share / share.sum(dim=0).clamp(min=1)

    def propose(self, current: dict, force: bool = False) -> dict | None:
        """A placement for the load of the last `rebalance_every_windows` closed windows (EPLB modes), or None
        when fewer windows closed since the last proposal (unless `force`: `expertmesh rebalance`).

        current: the gateway's placement (`Placement.to_dict()`). Returns {"placement": the new placement's dict
        (version + 1), or None when the predicted device max/mean improves by `min_gain` or less, "current",
        "predicted", "gain" (worst layer's max/mean now and after), "per_layer", "windows"}."""
        cfg = self.config
        self.current_placement = current
        queued, self._queued = self._queued, None
        if queued is not None and queued["placement"]["version"] > current.get("version", 0):
            self.proposals += 1
            return queued
        if not force and (cfg.mode not in EPLB_MODES
                          or self.windows_closed < self.proposed_at + cfg.rebalance_every_windows):
            return None
        self.proposed_at = self.windows_closed
        answer = self._plan(current, cfg.min_gain)
        if answer is not None and answer["placement"] is not None:
            self.proposals += 1
        return answer

    def rebalance(self, dry_run: bool = True) -> dict:
        """`expertmesh rebalance`: the plan for the recent load against the gateways' current placement (never
        held back by `min_gain`, only by no gain at all). Unless `dry_run`, the gateways switch to it at their
        next poll. Raises ValueError when no gateway has reported a placement (a mode other than eplb)."""
        if self.current_placement is None:
            raise ValueError("no gateway has reported its placement yet: balancing.mode must be eplb or eplb+bias "
                             "and a window must have closed")
        answer = self._plan(self.current_placement, 0.0)
        if answer is None:
            raise ValueError("no closed window yet: nothing to plan from")
        answer["applied"] = not dry_run and answer["placement"] is not None
        if answer["applied"]:
            self._queued = answer
        return answer

    def _plan(self, current: dict, min_gain: float) -> dict | None:
        cfg = self.config
        recent = self.expert_loads[-cfg.rebalance_every_windows:]
        if not recent:
            return None
        n = len(self.expert_device)
        placement = Placement.from_device_lists(current["devices"], n, current.get("layers"), self.layers,
                                                current.get("version", 0))
        loads = torch.tensor([[sum(w[layer][e] for w in recent) for e in range(n)] for layer in self.layers],
                             dtype=torch.float64)  # [L, E]
        plan = plan_placement(loads, placement.n_devices, cfg.redundant_slots, current=placement,
                              moe_layers=self.layers)
        gain = plan.worst_current - plan.worst_predicted
        better = gain > min_gain
        new = plan.to_placement(self.layers, base=placement, version=placement.version + 1) if better else None
        return {"placement": new.to_dict() if new else None, "current": plan.worst_current,
                "predicted": plan.worst_predicted, "gain": gain, "windows": len(recent),
                "per_layer": [{"layer": layer, "current": c, "predicted": p} for layer, c, p in
                              zip(self.layers, plan.current_max_over_mean, plan.predicted_max_over_mean, strict=True)]}

    def stats(self) -> dict:
        """The last closed window's per-layer reports, the open window's token counts, and bookkeeping."""
        return {
            "mode": self.config.mode, "version": self.controller.version, "windows_closed": self.windows_closed,
            "proposals": self.proposals,
            "last_window": self.history[-1] if self.history else [],
            "open_window_tokens": {layer: self.window[layer].tokens for layer in self.layers},
            "gateways": dict(self.gateways), "restored_from_checkpoint": self.restored,
        }

    def report_history(self) -> list[list[dict]]:
        """The per-layer reports of the last `history_windows` closed windows, oldest first."""
        return self.history

    # -- persistence ------------------------------------------------------------------------------------
    def _state(self) -> dict:
        return {
            "version": self.controller.version, "windows_closed": self.windows_closed,
            "delta": {layer: self.controller.delta[layer].tolist() for layer in self.layers},
            "window": {layer: window_to_wire(self.window[layer]) for layer in self.layers},
            "history": self.history, "gateways": self.gateways, "expert_loads": self.expert_loads,
            "proposed_at": self.proposed_at, "proposals": self.proposals,
        }

    def _save(self) -> None:
        if not self.config.checkpoint:
            return
        path = Path(self.config.checkpoint)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self._state(), f)
        os.replace(tmp, path)  # atomic: a crash mid-write leaves the previous state

    def _restore(self) -> bool:
        path = Path(self.config.checkpoint) if self.config.checkpoint else None
        if path is None or not path.is_file():
            return False
        state = json.loads(path.read_text())
        saved_layers = sorted(int(k) for k in state["delta"])
        if saved_layers != self.layers:
            raise ValueError(f"{path}: checkpoint has layers {saved_layers}, the model's MoE layers are {self.layers}")
        self.controller.version = state["version"]
        self.controller.delta = {int(k): torch.tensor(v, dtype=torch.float32) for k, v in state["delta"].items()}
        self.window = {int(k): window_from_wire(v) for k, v in state["window"].items()}
        self.windows_closed = state["windows_closed"]
        self.history = state["history"][-self.config.history_windows :]
        self.gateways = state["gateways"]
        self.expert_loads = [{int(k): v for k, v in w.items()} for w in state.get("expert_loads", [])]
        self.expert_loads = self.expert_loads[-self.config.history_windows:]
        self.proposed_at, self.proposals = state.get("proposed_at", 0), state.get("proposals", 0)
        logger.info("router service restored from %s at bias version %d", path, self.controller.version)
        return True


def report_table(reports: list[dict]) -> str:
    """A readable per-layer table of LayerReport dicts."""
    head = (f"{'layer':>5} {'tokens':>7} {'expert max/mean':>15} {'device max/mean':>15} {'expert bal':>10} "
            f"{'device bal':>10} {'comm bal':>9} {'seq bal':>8} {'bias range':>17} {'changed tokens':>14} {'slots':>6}")
    lines = [head]
    for r in reports:
        lines.append(
            f"{r['layer']:>5} {r['tokens']:>7} {r['expert_max_over_mean']:>15.2f} {r['device_max_over_mean']:>15.2f} "
            f"{r['expert_balance']:>10.3f} {r['device_balance']:>10.3f} {r['communication_balance']:>9.3f} "
            f"{r['sequence_balance']:>8.3f} {r['bias_min']:>+8.3f}..{r['bias_max']:<+7.3f} {r['changed_share']:>14.1%} "
            f"{r['changed_slot_share']:>6.1%}"
        )
    return "\n".join(lines)


__all__ = ["LayerReport", "RouterService", "report_table", "window_from_wire", "window_to_wire"]
