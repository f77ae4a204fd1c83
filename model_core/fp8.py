"""Block-wise FP8 (DeepSeek-V3's release format): weight tiles with one scale each, activations per token-group."""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
SCALE_EPS = 1e-10  # an all-zero tile or group gets this scale (not 0, which would divide by zero)


def scale_grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """The scale_inv shape of a [out, in] weight in blocks of (block_out, block_in): partial tiles count."""
    out, inp = shape[-2], shape[-1]
    return -(-out // block[0]), -(-inp // block[1])


_BITS_MASK = 0x87F00000 - (1 << 32)  # float32 bit 31 (sign) and bits 26..20 (e4m3's exponent and mantissa), as int32
_UNSCALE = 2.0 ** 120  # the float32 made of e4m3's bits placed at bit 20 is its value times 2^-120


def _place_bits(q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (float32, q's shape) = q's value × 2^-120, by three integer passes: q sign-extended to int32 and shifted
    left by 20 puts its sign at bit 31 and its 7 exponent and mantissa bits at 26..20; the mask clears the rest.
    e4m3fn's subnormals become float32 subnormals, exactly. (torch's own float8 conversion is element by element
    on a CPU, several times slower.)"""
    bits = out.view(torch.int32)
    bits.copy_(q.view(torch.int8))
    bits.bitwise_left_shift_(20).bitwise_and_(_BITS_MASK)
    return out


def nan_codes(q: torch.Tensor) -> torch.Tensor:
    """Where q holds e4m3fn's NaN encoding (S.1111.111), which _place_bits turns into ±480."""
    return q.view(torch.uint8).bitwise_and(0x7F) == 0x7F


def dequantize_blocks(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                      out: torch.Tensor | None = None, work: torch.Tensor | None = None,
                      nan: bool = True) -> torch.Tensor:
    """W = q · scale_inv tile by tile, in float32 (written into `out`, any float dtype of q's shape, when given).

    q: [N, K] float8 (e4m3fn by integer operations; e5m2 by torch's conversion); scale_inv: [ceil(N/bo),
    ceil(K/bi)]. Each element is q's exact value times its tile's scale, rounded once in float32 (2^120 is folded
    into the scales where that is exact), then once to out's dtype: the values of q.float() * scale whatever tile
    order or buffer is used. work: a float32 buffer of q's shape for an `out` that is not float32 (allocated when
    None); nan: keep e4m3fn's NaN code NaN (a caller whose weights were checked finite may skip that pass)."""
    n, k = q.shape
    bo, bi = block
    if tuple(scale_inv.shape) != scale_grid((n, k), block):
        raise ValueError(f"scale_inv.shape={list(scale_inv.shape)}: expected {list(scale_grid((n, k), block))} "
                         f"for a {[n, k]} weight in blocks of {list(block)}")
    e4m3 = q.dtype == FP8  # DeepSeek's format; another float8 (e5m2) is widened by torch, NaN and inf kept
    nans = nan_codes(q) if nan and e4m3 else None
    wide_out = out is not None and out.dtype == torch.float32
    wide = out if wide_out else (work if work is not None else torch.empty(n, k, device=q.device))
    scale = scale_inv.float()
    if not e4m3:
        wide.copy_(q)
    elif bool(scale.abs().max() < 2.0 ** 8):  # scale · 2^120 stays finite and exact
        _place_bits(q, wide)
        scale = scale * _UNSCALE
    else:
        _place_bits(q, wide).mul_(_UNSCALE)
    cols = scale.repeat_interleave(bi, 1)[:, :k]  # [nN, K]: each row tile's scale per column
    full = n // bo * bo
    if full:
        wide[:full].view(n // bo, bo, k).mul_(cols[: n // bo, None, :])
    if full < n:
        wide[full:].mul_(cols[-1])
    if nans is not None:
        wide.masked_fill_(nans, float("nan"))
    if out is not None and not wide_out:
        return out.copy_(wide)
    return wide


def quantize_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn [N, K], scale_inv float32 [ceil(N/bo), ceil(K/bi)]): each tile scaled so its largest |w|
    is FP8_MAX (the inverse of dequantize_blocks)."""
    n, k = w.shape
    bo, bi = block
    grid = scale_grid((n, k), block)
    padded = w.float().new_zeros(grid[0] * bo, grid[1] * bi)
    padded[:n, :k] = w.float()
    tiles = padded.view(grid[0], bo, grid[1], bi)
    scale = (tiles.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=SCALE_EPS)  # [nN, nK]
    q = (tiles / scale[:, None, :, None]).view(grid[0] * bo, grid[1] * bi)[:n, :k]
    return q.to(FP8), scale


def quantize_activations(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token-group quantization (DeepSeek-V3's inference code, vLLM's per_token_group_quant_fp8):
    (x_q float8_e4m3fn [T, H], scales float32 [T, ceil(H/group)]) with x ≈ x_q · scale per group of `group`
    columns, scale = max(|x| in the group) / FP8_MAX (at least SCALE_EPS)."""
    t, h = x.shape
    n_groups = -(-h // group)
    padded = x.float().new_zeros(t, n_groups * group)
    padded[:, :h] = x.float()
    groups = padded.view(t, n_groups, group)
    scale = (groups.abs().amax(dim=2) / FP8_MAX).clamp(min=SCALE_EPS)  # [T, nG]
    q = (groups / scale[:, :, None]).view(t, n_groups * group)[:, :h]
    return q.to(FP8), scale
