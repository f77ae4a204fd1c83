"""Multi-head latent attention (DeepSeek-V2/V3) over the latent cache: expanded at prefill, absorbed at decode."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gateway.model.kv_cache import LatentCache
from gateway.model.layers import RotaryEmbedding, rms_norm
from gateway.model.step import StepBatch
from model_core.spec import ModelSpec

# Shape legend: N = new tokens in the step, n = one sequence's new tokens, S = its cached length,
# h = heads, r = kv_lora_rank, p = qk_rope_head_dim, d = qk_nope_head_dim, v = v_head_dim, H = hidden.


class MLAttention:
    """One layer's MLA weights and forward. `weights` maps the short names ('q_proj', …) to tensors."""

    def __init__(self, spec: ModelSpec, layer: int, weights: dict[str, torch.Tensor], rope: RotaryEmbedding) -> None:
        self.spec, self.layer, self.w, self.rope = spec, layer, weights, rope
        h, d, v, r = spec.num_attention_heads, spec.qk_nope_head_dim, spec.v_head_dim, spec.kv_lora_rank
        kv_b = weights["kv_b_proj.weight"].view(h, d + v, r)
        self.w_uk = kv_b[:, :d]  # [h, d, r]: absorbed into the query at decode
        self.w_uv = kv_b[:, d:]  # [h, v, r]: absorbed into the output at decode
        self.scale = spec.attention_scale

    def forward(self, x: torch.Tensor, step: StepBatch, cache: LatentCache, absorb: bool | None = None) -> torch.Tensor:
        """x: [N, H] (already normed) -> [N, H]. Writes this step's c_kv and k_pe to the cache.

        absorb: compute attention in latent space; default: per sequence, absorbed for a one-token step (decode)
        and expanded for more (prefill), so a sequence's decode math does not depend on what shares the step.
        """
        spec, w = self.spec, self.w
        n_tok, h = x.shape[0], spec.num_attention_heads
        if spec.q_lora_rank is None:
            q = F.linear(x, w["q_proj.weight"])
        else:
            q_a = F.linear(x, w["q_a_proj.weight"], w.get("q_a_proj.bias"))
            q = F.linear(rms_norm(q_a, w["q_a_layernorm.weight"], spec.rms_norm_eps), w["q_b_proj.weight"])
        q = q.view(n_tok, h, spec.qk_head_dim)
        q_nope, q_pe = q.split([spec.qk_nope_head_dim, spec.qk_rope_head_dim], dim=-1)  # [N, h, d], [N, h, p]
        kv = F.linear(x, w["kv_a_proj_with_mqa.weight"], w.get("kv_a_proj_with_mqa.bias"))
        c_kv, k_pe = kv.split([spec.kv_lora_rank, spec.qk_rope_head_dim], dim=-1)
        c_kv = rms_norm(c_kv, w["kv_a_layernorm.weight"], spec.rms_norm_eps)  # [N, r]
        cos, sin = self.rope.cos_sin(step.positions)
        q_pe = self.rope.apply(q_pe, cos, sin)
        k_pe = self.rope.apply(k_pe, cos, sin)  # [N, p]

        out = x.new_empty(n_tok, h, spec.v_head_dim)
        for seq_id, start, n, off in zip(step.seq_ids, step.starts, step.lengths, step.offsets, strict=True):
            rows = slice(off, off + n)
            cache.write(self.layer, seq_id, start, c_kv[rows], k_pe[rows])
            ckv_all, kpe_all = cache.read(self.layer, seq_id, start + n)  # [S, r], [S, p]
            attend = self._absorbed if (n == 1 if absorb is None else absorb) else self._expanded
            out[rows] = attend(q_nope[rows], q_pe[rows], ckv_all, kpe_all, start)
        return F.linear(out.reshape(n_tok, -1), w["o_proj.weight"], w.get("o_proj.bias"))

    def _expanded(self, q_nope, q_pe, ckv, kpe, start: int) -> torch.Tensor:
        """Prefill: expand c_kv into per-head keys and values. q_*: [n, h, *]; ckv: [S, r] -> [n, h, v]."""
        spec = self.spec
        s_len, h = ckv.shape[0], spec.num_attention_heads
        kv = F.linear(ckv, self.w["kv_b_proj.weight"]).view(s_len, h, -1)  # [S, h, d + v]
        k_nope, value = kv.split([spec.qk_nope_head_dim, spec.v_head_dim], dim=-1)
        query = torch.cat([q_nope, q_pe], dim=-1).transpose(0, 1)  # [h, n, d + p]
        key = torch.cat([k_nope, kpe[:, None, :].expand(s_len, h, -1)], dim=-1).transpose(0, 1)  # [h, S, d + p]
        scores = torch.matmul(query, key.transpose(1, 2)) * self.scale  # [h, n, S]
        probs = self._causal_softmax(scores, start)
        return torch.matmul(probs, value.transpose(0, 1)).transpose(0, 1)  # [n, h, v]

    def _absorbed(self, q_nope, q_pe, ckv, kpe, start: int) -> torch.Tensor:
        """Decode: q·W_UK against c_kv directly, then W_UV on the latent output. -> [n, h, v]."""
        q_lat = torch.einsum("nhd,hdr->hnr", q_nope, self.w_uk)  # [h, n, r]
        scores = torch.matmul(q_lat, ckv.T) + torch.matmul(q_pe.transpose(0, 1), kpe.T)  # [h, n, S]
        probs = self._causal_softmax(scores * self.scale, start)
        o_lat = torch.matmul(probs, ckv)  # [h, n, r]
        return torch.einsum("hnr,hvr->nhv", o_lat, self.w_uv)

    @staticmethod
    def _causal_softmax(scores: torch.Tensor, start: int) -> torch.Tensor:
        """scores: [h, n, S] where query i sits at position start + i; keys after it are masked."""
        n, s_len = scores.shape[1], scores.shape[2]
        if n > 1:
            q_pos = torch.arange(start, start + n, device=scores.device)[:, None]
            mask = torch.arange(s_len, device=scores.device)[None, :] > q_pos  # [n, S]
            scores = scores.masked_fill(mask, float("-inf"))
        return scores.softmax(dim=-1, dtype=torch.float32).to(scores.dtype)
