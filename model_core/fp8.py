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


def fp8_to_float32(q: torch.Tensor, out: torch.Tensor, work: torch.Tensor | None = None,
                   nan: bool = True) -> torch.Tensor:
    """q (float8_e4m3fn) exactly in float32, written into `out` (float32, q's shape) by integer operations: torch's
    own conversion is element by element on a CPU (~4x slower). The 7 exponent and mantissa bits placed at bit 20
    make a float32 whose value is q's times 2^-120 (e4m3fn's subnormals become float32 subnormals, exactly), then
    one multiply by 2^120. work: an int32 buffer of q's shape (allocated when None); nan: map e4m3fn's NaN
    encoding (S.1111.111) to NaN (a caller whose weights were checked finite may skip that pass)."""
    bits = out.view(torch.int32)
    bits.copy_(q.view(torch.uint8))  # zero-extended
    sign = torch.bitwise_and(bits, 0x80, out=work if work is not None else torch.empty_like(bits))
    bits.bitwise_and_(0x7F)
    nans = bits == 0x7F if nan else None  # e4m3fn's NaN, decided before the bits move
    bits.bitwise_left_shift_(20).bitwise_or_(sign.bitwise_left_shift_(24))
    out.mul_(2.0 ** 120)
    if nans is not None:
        out.masked_fill_(nans, float("nan"))
    return out


def dequantize_blocks(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                      out: torch.Tensor | None = None, work_float: torch.Tensor | None = None,
                      work_int: torch.Tensor | None = None, nan: bool = True) -> torch.Tensor:
    """W = q · scale_inv tile by tile, in float32 (written into `out`, any float dtype of q's shape, when given).

    q: [N, K] float8_e4m3fn; scale_inv: [ceil(N/bo), ceil(K/bi)]. Each tile's product is q's exact value times
    its scale in float32, rounded once to out's dtype: the same values whatever tile order or buffer is used.
    work_float, work_int: float32 and int32 buffers of q's shape (allocated when None; the float one is used only
    for an `out` that is not float32); nan: see fp8_to_float32."""
    n, k = q.shape
    bo, bi = block
    if tuple(scale_inv.shape) != scale_grid((n, k), block):
        raise ValueError(f"scale_inv.shape={list(scale_inv.shape)}: expected {list(scale_grid((n, k), block))} "
                         f"for a {[n, k]} weight in blocks of {list(block)}")
    wide_out = out is not None and out.dtype == torch.float32
    wide = out if wide_out else (work_float if work_float is not None else torch.empty(n, k, device=q.device))
    fp8_to_float32(q, wide, work_int, nan=nan)
    cols = scale_inv.float().repeat_interleave(bi, 1)[:, :k]  # [nN, K]: each row tile's scale per column
    full = n // bo * bo
    if full:
        wide[:full].view(n // bo, bo, k).mul_(cols[: n // bo, None, :])
    if full < n:
        wide[full:].mul_(cols[-1])
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
