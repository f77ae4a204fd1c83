"""RouterService: the shared live-load picture and bias, fed by every gateway; runs as one named Ray actor."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from router_service.bias import BalanceConfig, BiasController
from router_service.load_stats import LayerReport, LayerWindow, layer_report

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
        self.gateways: dict[str, int] = {}  # pushes per gateway
        self.restored = self._restore()

    def push(self, gateway: str, windows: dict) -> int:
        """Add one gateway's per-layer windows ({layer: wire dict}); returns the current bias version."""
        self.gateways[gateway] = self.gateways.get(gateway, 0) + 1
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
                                  self.devices_per_token)
            bias = self.controller.bias(layer)
            report.bias_min, report.bias_max = float(bias.min()), float(bias.max())
            reports.append(asdict(report))
        self.controller.update({layer: self.window[layer].counts for layer in self.layers})
        self.history.append(reports)
        del self.history[: -self.config.history_windows]
        self.windows_closed += 1
        n = len(self.expert_device)
        self.window = {layer: LayerWindow.empty(n, self.n_devices) for layer in self.layers}

    def snapshot(self, known_version: int = -1) -> tuple[int, dict[int, list[float]] | None]:
        """(version, {layer: bias}) — the bias only when it is newer than `known_version`."""
        version = self.controller.version
        if version == known_version:
            return version, None
        return version, {layer: self.controller.bias(layer).tolist() for layer in self.layers}

    def stats(self) -> dict:
        """The last closed window's per-layer reports, the open window's token counts, and bookkeeping."""
        return {
            "mode": self.config.mode, "version": self.controller.version, "windows_closed": self.windows_closed,
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
            "history": self.history, "gateways": self.gateways,
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
