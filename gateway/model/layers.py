"""Small gateway layers: RMSNorm and rotary embeddings (default and YaRN, interleaved or half-split)."""

from __future__ import annotations

import math

import torch

from model_core.spec import RopeSpec, yarn_mscale


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, as DeepSeek/transformers do. x: [..., D]; weight: [D]."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def rope_inv_freq(rope: RopeSpec, dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the cos/sin scale (YaRN's attention factor, else 1)."""
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    if rope.kind == "default":
        return 1.0 / pos_freqs, 1.0
    # YaRN (Peng et al. 2023): blend interpolated and extrapolated frequencies with a linear ramp.
    factor = rope.factor
    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = yarn_mscale(factor, rope.mscale) / yarn_mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        orig = rope.original_max_position_embeddings
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class RotaryEmbedding:
    """Applies rotary embeddings at given positions.

    `interleave=True` rotates pairs (x0, x1), (x2, x3), … (DeepSeek's layout) and returns the rotated
    pairs de-interleaved as [evens | odds]; queries and keys get the same permutation, so their dot
    products are those of the interleaved rotation (this is also what transformers returns).
    """

    def __init__(self, rope: RopeSpec, dim: int, interleave: bool, device: torch.device | str = "cpu") -> None:
        inv_freq, self.scale = rope_inv_freq(rope, dim)  # computed on the host in float32, then moved: same values
        self.inv_freq = inv_freq.to(device)
        self.interleave = interleave

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [N] on inv_freq's device -> cos, sin: [N, dim/2] (scaled)."""
        freqs = positions.to(self.inv_freq.device)[:, None].float() * self.inv_freq[None, :]
        return freqs.cos() * self.scale, freqs.sin() * self.scale

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [N, ..., dim]; cos, sin: [N, dim/2] -> [N, ..., dim]."""
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
        c, s = cos.view(shape).to(x.dtype), sin.view(shape).to(x.dtype)
        if self.interleave:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            half = x.shape[-1] // 2
            x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
