"""Multi-head latent attention (DeepSeek-V2/V3) over the latent cache: expanded at prefill, absorbed at decode."""

from __future__ import annotations

import torch

from gateway.model.kv_cache import AttentionPlan, PagedLatentCache
from gateway.model.layers import RotaryEmbedding, rms_norm
from gateway.model.step import StepBatch
from model_core.half_matmul import einsum, linear
from model_core.spec import ModelSpec

SCORE_ELEMENTS = 1 << 24  # the most elements of one attention score (or gathered context) tensor: 64 MiB at fp32
# Gathered context per decode group on a CPU, at the matmul dtype, so both products read it from cache (64 sequences
# of 592 positions on the 2-core dev VM: one group 11.0 ms per layer; with the float32-widened context a decode
# step took 181 ms at 4 MiB groups, 184 at 8 MiB and 188-213 at 2 MiB).
CPU_DECODE_GROUP_BYTES = 4 << 20

# Shape legend: N = new tokens in the step, n = one sequence's new tokens, S = its cached length,
# D = one-token sequences decoded together, h = heads, r = kv_lora_rank, p = qk_rope_head_dim,
# d = qk_nope_head_dim, v = v_head_dim, H = hidden, w = r + p.


class MLAttention:
    """One layer's MLA weights and forward. `weights` maps the short names ('q_proj', …) to tensors."""

    def __init__(self, spec: ModelSpec, layer: int, weights: dict[str, torch.Tensor], rope: RotaryEmbedding) -> None:
        self.spec, self.layer, self.w, self.rope = spec, layer, weights, rope
        h, d, v, r = spec.num_attention_heads, spec.qk_nope_head_dim, spec.v_head_dim, spec.kv_lora_rank
        kv_b = weights["kv_b_proj.weight"].view(h, d + v, r)
        self.w_uk = kv_b[:, :d]  # [h, d, r]: absorbed into the query at decode
        self.w_uv = kv_b[:, d:]  # [h, v, r]: absorbed into the output at decode
        self.scale = spec.attention_scale
        self.wide = kv_b.dtype  # matmuls run in the weights' dtype: the model's, or float32 (half_matmul)
        self.use_kernel = False  # decode with the Triton paged-MLA kernel (the model turns it on on CUDA)

    def forward(self, x: torch.Tensor, step: StepBatch, cache: PagedLatentCache | None,
                plan: AttentionPlan | None = None, absorb: bool | None = None) -> torch.Tensor:
        """x: [N, H] (already normed) -> [N, H]. Writes this step's c_kv and k_pe to the cache's pool.

        plan: the step's pool rows (cache.plan); its decode batch holds the one-token sequences, attended together
        in latent space (absorbed); every other sequence attends alone over its context, expanded or absorbed,
        whichever costs fewer multiply-adds (`absorb` forces one). cache None: whole sequences scored at once with
        no cache (absorbed for a one-token sequence unless `absorb` says otherwise).
        """
        spec, w = self.spec, self.w
        n_tok, h = x.shape[0], spec.num_attention_heads
        if spec.q_lora_rank is None:
            q = linear(x, w["q_proj.weight"])
        else:
            q_a = linear(x, w["q_a_proj.weight"], w.get("q_a_proj.bias"))
            q = linear(rms_norm(q_a, w["q_a_layernorm.weight"], spec.rms_norm_eps), w["q_b_proj.weight"])
        q = q.view(n_tok, h, spec.qk_head_dim)
        q_nope, q_pe = q.split([spec.qk_nope_head_dim, spec.qk_rope_head_dim], dim=-1)  # [N, h, d], [N, h, p]
        kv = linear(x, w["kv_a_proj_with_mqa.weight"], w.get("kv_a_proj_with_mqa.bias"))
        c_kv, k_pe = kv.split([spec.kv_lora_rank, spec.qk_rope_head_dim], dim=-1)
        c_kv = rms_norm(c_kv, w["kv_a_layernorm.weight"], spec.rms_norm_eps)  # [N, r]
        cos, sin = self.rope.cos_sin(step.positions)
        q_pe = self.rope.apply(q_pe, cos, sin)
        k_pe = self.rope.apply(k_pe, cos, sin)  # [N, p]

        if cache is None:  # one-shot scoring: every sequence starts at 0 and attends only to this step's tokens
            return self._project(self._uncached(q_nope, q_pe, c_kv, k_pe, step, absorb), n_tok)
        rows = cache.layer_rows(self.layer)  # [B * b, w]: writes land in the pool
        rows.index_copy_(0, plan.slots, torch.cat([c_kv, k_pe], dim=-1).to(rows.dtype))
        out = x.new_empty(n_tok, h, spec.v_head_dim)
        if plan.decode_rows is not None:
            out[plan.decode_rows] = self._decode(q_nope[plan.decode_rows], q_pe[plan.decode_rows], cache, plan)
        r = spec.kv_lora_rank
        for i, (start, n, off) in enumerate(zip(step.starts, step.lengths, step.offsets, strict=True)):
            if plan.context[i] is None:
                continue
            ctx = rows[plan.context[i]]  # [S, w]
            latent = absorb if absorb is not None else self._absorbed_is_cheaper(n, start + n)
            attend = self._absorbed if latent else self._expanded
            out[off : off + n] = attend(q_nope[off : off + n], q_pe[off : off + n], ctx[:, :r], ctx[:, r:], start)
        return self._project(out, n_tok)

    def _absorbed_is_cheaper(self, n: int, s_len: int) -> bool:
        """Multiply-adds of attending n queries over S positions: expanding c_kv to per-head keys and values costs
        S·h·(r(d+v) + n(d+p+v)), staying in latent space n·h·(r(d+v) + S(2r+p)). A short chunk late in a long
        prompt (chunked prefill) is cheaper absorbed; a whole prompt expanded."""
        spec = self.spec
        r, d, v, p = spec.kv_lora_rank, spec.qk_nope_head_dim, spec.v_head_dim, spec.qk_rope_head_dim
        expanded = s_len * (r * (d + v) + n * (d + p + v))
        absorbed = n * (r * (d + v) + s_len * (2 * r + p))
        return absorbed < expanded

    def _project(self, out: torch.Tensor, n_tok: int) -> torch.Tensor:
        w = self.w
        return linear(out.reshape(n_tok, -1), w["o_proj.weight"], w.get("o_proj.bias"))

    def _uncached(self, q_nope, q_pe, c_kv, k_pe, step: StepBatch, absorb: bool | None) -> torch.Tensor:
        """Attention of whole sequences over their own new tokens (no cache): the unpaged reference path."""
        out = q_nope.new_empty(q_nope.shape[0], self.spec.num_attention_heads, self.spec.v_head_dim)
        for start, n, off in zip(step.starts, step.lengths, step.offsets, strict=True):
            if start != 0:
                raise ValueError(f"a step without a cache starts every sequence at 0, got a start of {start}")
            rows = slice(off, off + n)
            attend = self._absorbed if (n == 1 if absorb is None else absorb) else self._expanded
            out[rows] = attend(q_nope[rows], q_pe[rows], c_kv[rows], k_pe[rows], 0)
        return out

    def _decode(self, q_nope, q_pe, cache: PagedLatentCache, plan: AttentionPlan) -> torch.Tensor:
        """Absorbed decode of every one-token sequence at once over its pool rows. q_*: [D, h, *] -> [D, h, v]."""
        r = self.spec.kv_lora_rank
        q_lat = einsum("bhd,hdr->bhr", q_nope, self.w_uk)  # [D, h, r]
        if self.use_kernel:
            from gateway.model.paged_mla_kernel import paged_mla_decode

            o_lat = paged_mla_decode(q_lat, q_pe, cache.pool[self.layer], plan.decode_tables, plan.decode_lens, r,
                                     self.scale)
            return einsum("bhr,hvr->bhv", o_lat, self.w_uv)
        pool = cache.pool[self.layer]  # [B, b, w]
        dtype, wide = q_nope.dtype, self.wide
        q = torch.cat([q_lat, q_pe], dim=-1).to(wide)  # [D, h, w]: one product against c_kv and k_pe together
        d, width = plan.decode_tables.shape
        s_max = width * pool.shape[1]
        o_lat = q_nope.new_empty(d, self.spec.num_attention_heads, r)
        # Sequences in groups, so the gathered blocks [g, S, w] and the scores [g, h, S] stay under the bound;
        # on a CPU, groups small enough that both products read the gathered context from cache, not memory.
        per = max(1, SCORE_ELEMENTS // (s_max * (pool.shape[-1] + self.spec.num_attention_heads)))
        if pool.device.type == "cpu":
            per = min(per, max(1, CPU_DECODE_GROUP_BYTES // (s_max * pool.shape[-1] * wide.itemsize)))
        for lo in range(0, d, per):
            hi = min(d, lo + per)
            # Whole blocks, gathered through the block tables (block-sized copies, not one row at a time).
            ctx = pool.index_select(0, plan.decode_tables[lo:hi].flatten()).view(hi - lo, s_max, -1)  # [g, S, w]
            ctx = ctx.to(wide)
            # The gathered context is the left operand of both products, in the layout it was gathered in (on
            # CPU this is faster than transposing it; the k_pe columns of the second product are dropped).
            scores = self._mm(ctx, q[lo:hi].transpose(1, 2), dtype).transpose(1, 2) * self.scale  # [g, h, S]
            scores = scores.masked_fill(~plan.decode_valid[lo:hi, None, :], float("-inf"))
            probs = scores.softmax(dim=-1, dtype=torch.float32).to(dtype)
            o_lat[lo:hi] = self._mm(ctx.transpose(1, 2), probs.transpose(1, 2), dtype)[:, :r].transpose(1, 2)
        return einsum("bhr,hvr->bhv", o_lat, self.w_uv)  # [D, h, v]: W_UV once for every group

    def _mm(self, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """a @ b in the matmul dtype (operands widened unless they already are), rounded to `dtype` as a native
        half-precision product is (model_core.half_matmul); a plain matmul when the model multiplies natively."""
        return torch.matmul(a.to(self.wide), b.to(self.wide)).to(dtype)

    def _query_chunks(self, n: int, s_len: int) -> range:
        """Query row starts so that no [h, chunk, S] score tensor exceeds SCORE_ELEMENTS."""
        return range(0, n, max(1, SCORE_ELEMENTS // (self.spec.num_attention_heads * s_len)))

    def _expanded(self, q_nope, q_pe, ckv, kpe, start: int) -> torch.Tensor:
        """Prefill: expand c_kv into per-head keys and values. q_*: [n, h, *]; ckv: [S, r] -> [n, h, v]."""
        spec = self.spec
        s_len, h, n = ckv.shape[0], spec.num_attention_heads, q_nope.shape[0]
        kv = linear(ckv, self.w["kv_b_proj.weight"]).view(s_len, h, -1)  # [S, h, d + v]
        k_nope, value = kv.split([spec.qk_nope_head_dim, spec.v_head_dim], dim=-1)
        dtype, wide = q_nope.dtype, self.wide
        query = torch.cat([q_nope, q_pe], dim=-1).transpose(0, 1).to(wide)  # [h, n, d + p]
        key = torch.cat([k_nope, kpe[:, None, :].expand(s_len, h, -1)], dim=-1).permute(1, 2, 0).to(wide)  # [h, d+p, S]
        value = value.transpose(0, 1).to(wide)  # [h, S, v]
        out = q_nope.new_empty(n, h, spec.v_head_dim)
        step = self._query_chunks(n, s_len).step
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            scores = self._mm(query[:, lo:hi], key, dtype) * self.scale  # [h, c, S]
            probs = self._causal_softmax(scores, start + lo)
            out[lo:hi] = self._mm(probs, value, dtype).transpose(0, 1)
        return out

    def _absorbed(self, q_nope, q_pe, ckv, kpe, start: int) -> torch.Tensor:
        """Latent-space attention of one sequence: q·W_UK against c_kv directly, then W_UV. -> [n, h, v]."""
        n = q_nope.shape[0]
        dtype, wide = q_nope.dtype, self.wide
        q_lat = einsum("nhd,hdr->hnr", q_nope, self.w_uk).to(wide)  # [h, n, r]
        q_pe = q_pe.transpose(0, 1).to(wide)  # [h, n, p]
        ckv, kpe = ckv.to(wide), kpe.to(wide)
        out = q_nope.new_empty(n, self.spec.num_attention_heads, self.spec.v_head_dim)
        step = self._query_chunks(n, ckv.shape[0]).step
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            scores = self._mm(q_lat[:, lo:hi], ckv.T, dtype) + self._mm(q_pe[:, lo:hi], kpe.T, dtype)  # [h, c, S]
            probs = self._causal_softmax(scores * self.scale, start + lo)
            out[lo:hi] = einsum("hnr,hvr->nhv", self._mm(probs, ckv, dtype), self.w_uv)
        return out

    @staticmethod
    def _causal_softmax(scores: torch.Tensor, start: int) -> torch.Tensor:
        """scores: [h, n, S] where query i sits at position start + i; keys after it are masked."""
        n, s_len = scores.shape[1], scores.shape[2]
        if n > 1:
            q_pos = torch.arange(start, start + n, device=scores.device)[:, None]
            mask = torch.arange(s_len, device=scores.device)[None, :] > q_pos  # [n, S]
            scores = scores.masked_fill(mask, float("-inf"))
        return scores.softmax(dim=-1, dtype=torch.float32).to(scores.dtype)
