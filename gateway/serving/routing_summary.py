"""Per-layer routing counts accumulated by the engine: how many tokens each expert served."""

from __future__ import annotations

import torch

from router_service.routing import Routing


class RoutingSummary:
    """tokens_per_expert[layer]: [E] int64 counts over every token routed since the engine started.

    The sums stay on the device the counts come from (the gateway's: adding them costs no host sync per step);
    `rows()` and `table()` read them back to the host.
    """

    def __init__(self, moe_layers: list[int], n_experts: int, device: torch.device | str = "cpu") -> None:
        self.tokens_per_expert = {layer: torch.zeros(n_experts, dtype=torch.long, device=device)
                                  for layer in moe_layers}
        self.tokens = dict.fromkeys(moe_layers, 0)
        self.changed_by_serving = dict.fromkeys(moe_layers, 0)  # experts changed by top-M or live bias

    def add(self, routings: dict[int, Routing]) -> None:
        """Add one step's routings (counted by GatewayModel.forward's accounting pass: no recount here)."""
        for layer, r in routings.items():
            self.tokens_per_expert[layer] += r.counts.tokens_per_expert
            self.tokens[layer] += r.ids.shape[0]
            self.changed_by_serving[layer] += r.changed_tokens()

    def rows(self) -> list[dict]:
        """One dict per MoE layer: tokens, experts hit, max/mean load, busiest experts."""
        out = []
        for layer, counts in self.tokens_per_expert.items():
            counts = counts.cpu()
            mean = counts.float().mean().item()
            top = counts.topk(min(3, counts.numel()))
            out.append(
                {
                    "layer": layer,
                    "tokens": self.tokens[layer],
                    "experts_hit": int((counts > 0).sum()),
                    "max_over_mean": counts.max().item() / mean if mean else 0.0,
                    "busiest": [(int(e), int(c)) for c, e in zip(top.values, top.indices, strict=True)],
                    "changed": self.changed_by_serving[layer],
                }
            )
        return out

    def table(self) -> str:
        lines = [f"{'layer':>5} {'tokens':>7} {'experts hit':>12} {'max/mean':>9} {'changed':>14}  "
                 "busiest (expert:tokens)"]
        for r in self.rows():
            busiest = " ".join(f"{e}:{c}" for e, c in r["busiest"])
            n = len(self.tokens_per_expert[r["layer"]])
            changed = f"{r['changed']} ({r['changed'] / max(r['tokens'], 1):.0%})"
            lines.append(
                f"{r['layer']:>5} {r['tokens']:>7} {r['experts_hit']:>6}/{n:<5} {r['max_over_mean']:>9.2f} "
                f"{changed:>14}  {busiest}"
            )
        return "\n".join(lines)
