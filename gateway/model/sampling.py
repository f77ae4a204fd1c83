"""Next-token sampling on the gateway's device: greedy, or temperature with nucleus (top-p) filtering.

Logits never leave the device; the caller copies only the sampled ids to the host. Seeded sampling uses a
per-request torch.Generator created on the same device (a CPU generator cannot drive CUDA sampling): a seed
reproduces its tokens on the same kind of device, but CPU and CUDA generators are different random streams,
so the same seed may sample different tokens on a CPU and a GPU gateway. Greedy is the same everywhere.
"""

from __future__ import annotations

import torch


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits: [B, V] float32 -> token ids [B] on logits' device. temperature 0 means greedy (argmax).

    generator: on logits' device (see the module docstring); ignored by greedy.
    """
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: expected >= 0")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}: expected 0 < top_p <= 1")
    if temperature == 0:
        return logits.argmax(dim=-1)
    if generator is not None and generator.device.type != logits.device.type:
        raise ValueError(f"generator.device={generator.device}: expected a generator on the logits' device "
                         f"({logits.device}), e.g. torch.Generator(device={str(logits.device)!r})")
    probs = (logits / temperature).softmax(dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already reach top_p (the first one always stays).
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
