"""The aux-loss-free bias controller (DeepSeek-V3): nudge each expert's selection bias toward balanced load."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model_core.settings import check_settings, setting

MODES = ("off", "observe", "adapt", "eplb", "eplb+bias")
BIAS_MODES = ("adapt", "eplb+bias")  # the live bias changes routing
EPLB_MODES = ("eplb", "eplb+bias")  # the router service proposes placements with redundant experts


@dataclass(frozen=True)
class BalanceConfig:
    """mode: off (no statistics, no bias change) | observe (statistics only) | adapt (update the bias) | eplb
    (re-place experts with redundant copies; answers unchanged) | eplb+bias (placement first; the bias takes
    the rest while the share of changed expert slots stays within max_changed_slots)."""

    mode: str = setting("off", choices=MODES)
    gamma: float = setting(0.01, gt=0)  # bias step per window
    # None: constant γ (DeepSeek-V3); τ: step w uses γ / (1 + w/τ)
    gamma_decay_windows: float | None = setting(None, gt=0)
    max_bias: float = setting(0.5, gt=0)  # bound on the live adjustment, |b - b_model| <= max_bias
    window_tokens: int = setting(4096, ge=1)  # tokens per MoE layer that close a window
    # where the router service runs: auto (Ray when the backend uses Ray) | local | ray
    service: str = setting("auto", choices=("auto", "local", "ray"))
    name: str = "router-service"  # the named Ray actor; engines naming the same service share one bias
    checkpoint: str | None = None  # file the service saves its state to after every update (survives restarts)
    push_every_steps: int = setting(1, ge=1)  # gateway steps between pushes of load counts
    # unanswered pushes before a gateway holds its counts back (keeps memory bounded)
    max_pending_pushes: int = setting(8, ge=1)
    history_windows: int = setting(100, ge=1)  # closed windows' reports the service keeps (and checkpoints)
    redundant_slots: int = setting(0, ge=0)  # eplb: extra expert copies per MoE layer (physical slots = experts + this)
    # eplb: closed windows between proposals (their loads are what is planned)
    rebalance_every_windows: int = setting(4, ge=1)
    min_gain: float = setting(0.05, ge=0)  # eplb: propose only when predicted device max/mean drops by more than this
    # eplb+bias: the bias holds still while a window's changed slots exceed this
    max_changed_slots: float = setting(0.05, ge=0, le=1)

    def __post_init__(self) -> None:
        if self.mode is False:  # YAML 1.1 reads an unquoted `mode: off` as false
            object.__setattr__(self, "mode", "off")
        check_settings(self, "balancing")


def bias_step(delta: torch.Tensor, load: torch.Tensor, gamma: float, max_bias: float) -> torch.Tensor:
    """δ_i ← clip(δ_i + γ·sign(mean_load − load_i), ±max_bias). delta: [N] float32; load: [N] token counts."""
    load = load.double()
    step = gamma * torch.sign(load.mean() - load)
    return (delta.double() + step).clamp(-max_bias, max_bias).to(torch.float32)


class BiasController:
    """Per MoE layer: the model's own bias b_model (V3's e_score_correction_bias, zeros for V2) plus a live δ.

    Selection uses b_model + δ in adapt mode and b_model otherwise; combine weights never include either.
    """

    def __init__(self, model_bias: dict[int, torch.Tensor], config: BalanceConfig) -> None:
        self.config = config
        self.model_bias = {layer: b.float().clone() for layer, b in model_bias.items()}
        self.delta = {layer: torch.zeros_like(b) for layer, b in self.model_bias.items()}
        self.version = 0

    def bias(self, layer: int) -> torch.Tensor:
        if self.config.mode in BIAS_MODES:
            return self.model_bias[layer] + self.delta[layer]
        return self.model_bias[layer]

    def update(self, loads: dict[int, torch.Tensor], changed_slots: dict[int, float] | None = None) -> bool:
        """Apply one window's per-expert loads; returns whether the bias changed (adapt and eplb+bias modes).
        changed_slots: per layer, the window's share of expert slots the live bias changed; in eplb+bias a
        layer above `max_changed_slots` keeps its bias (the fidelity budget)."""
        if self.config.mode not in BIAS_MODES:
            return False
        gamma = self.gamma_at(self.version)
        for layer, load in loads.items():
            over = (self.config.mode == "eplb+bias" and changed_slots is not None
                    and changed_slots.get(layer, 0.0) > self.config.max_changed_slots)
            if not over:
                self.delta[layer] = bias_step(self.delta[layer], load, gamma, self.config.max_bias)
        self.version += 1
        return True

    def gamma_at(self, window: int) -> float:
        """The step of the window-th update: constant, or harmonically decaying when gamma_decay_windows is set
        (steps still sum without bound, so the bias can travel as far as it needs, while the ±γ jitter of
        sign updates shrinks)."""
        tau = self.config.gamma_decay_windows
        return self.config.gamma if tau is None else self.config.gamma / (1 + window / tau)
