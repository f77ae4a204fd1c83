"""ExpertGroup: the routed experts placed on one device, loaded from the checkpoint, computed grouped."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from expert_workers.grouped_ffn import grouped_expert_ffn
from model_core.checkpoint import CheckpointReader, expert_shapes, expert_weight_names
from model_core.spec import ModelSpec


class ExpertGroup:
    """Holds, for every MoE layer, the stacked weights of the experts in `expert_ids` and nothing else.

    Transports (in-process, Ray, gRPC) are thin shells around `forward`.
    """

    def __init__(
        self,
        model_dir: str | Path,
        expert_ids: Sequence[int],
        dtype: torch.dtype = torch.float32,
        spec: ModelSpec | None = None,
    ) -> None:
        self.spec = spec or ModelSpec.from_dir(model_dir)
        n = self.spec.n_routed_experts
        bad = [e for e in expert_ids if not 0 <= e < n]
        if bad or len(set(expert_ids)) != len(expert_ids) or not expert_ids:
            raise ValueError(f"expert_ids={list(expert_ids)}: expected distinct ids in [0, {n})")
        self.expert_ids = list(expert_ids)
        self.dtype = dtype
        # global id -> local row, -1 where the expert lives elsewhere
        self.local_index = torch.full((n,), -1, dtype=torch.long)
        self.local_index[torch.tensor(self.expert_ids)] = torch.arange(len(self.expert_ids))
        self.reader = CheckpointReader(model_dir)
        self.w_gate_up: dict[int, torch.Tensor] = {}
        self.w_down: dict[int, torch.Tensor] = {}
        shapes = expert_shapes(self.spec)
        for layer in self.spec.moe_layers:
            gate_up, down = [], []
            for e in self.expert_ids:
                g, u, d = (
                    self.reader.get(name, shape, dtype)
                    for name, shape in zip(expert_weight_names(layer, e), shapes, strict=True)
                )
                gate_up.append(torch.cat([g, u], dim=0))
                down.append(d)
            self.w_gate_up[layer] = torch.stack(gate_up)  # [E_local, 2I, H]
            self.w_down[layer] = torch.stack(down)  # [E_local, H, I]

    @property
    def weight_bytes(self) -> int:
        tensors = list(self.w_gate_up.values()) + list(self.w_down.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    def forward(
        self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """Partial routed output of this group's experts.

        hidden: [T, H]; topk_ids: [T, K] global ids (-1 or experts hosted elsewhere contribute nothing);
        topk_weights: [T, K] -> [T, H].
        """
        if layer not in self.w_gate_up:
            raise ValueError(f"layer={layer}: not an MoE layer of this model (MoE layers: {self.spec.moe_layers})")
        local = torch.where(topk_ids >= 0, self.local_index[topk_ids.clamp(min=0)], -1)
        return grouped_expert_ffn(
            hidden.to(self.dtype), self.w_gate_up[layer], self.w_down[layer], local, topk_weights
        ).to(hidden.dtype)
