"""The grouped expert FFN equals transformers' experts module and a per-token reference, edge cases included."""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts

from expert_workers.expert_group import ExpertGroup
from expert_workers.expert_pairs import sort_by_expert
from expert_workers.grouped_ffn import grouped_expert_ffn
from model_core.checkpoint import is_routed_expert_tensor
from model_core.ffn import swiglu
from model_core.make_model import preset_config

E, H, I, K = 8, 24, 20, 3


def weights(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(E, 2 * I, H, generator=gen) / H**0.5, torch.randn(E, H, I, generator=gen) / I**0.5


def per_token_reference(hidden, w_gate_up, w_down, ids, w):
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e >= 0:
                out[t] += w[t, k] * swiglu(hidden[t : t + 1], w_gate_up[e], w_down[e])[0]
    return out


def random_routing(t: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(t)]) if t else torch.empty(0, K).long()
    return ids, torch.rand(t, K, generator=gen)


@pytest.mark.parametrize("impl", ["grouped_mm", "loop", "padded_bmm", "auto"])
@pytest.mark.parametrize("t", [1, 7, 64])
def test_matches_transformers_experts_module(t, impl):
    w_gate_up, w_down = weights()
    ids, w = random_routing(t, seed=t)
    hidden = torch.randn(t, H, generator=torch.Generator().manual_seed(9))
    cfg = DeepseekV3Config(
        **{
            **preset_config("tiny-v3"),
            "n_routed_experts": E,
            "hidden_size": H,
            "moe_intermediate_size": I,
            "num_experts_per_tok": K,
            "n_group": 1,
            "topk_group": 1,
        }
    )
    ref = DeepseekV3Experts(cfg)
    ref.gate_up_proj.data.copy_(w_gate_up)
    ref.down_proj.data.copy_(w_down)
    with torch.no_grad():
        expected = ref(hidden, ids, w)
    got = grouped_expert_ffn(hidden, w_gate_up, w_down, ids, w, impl=impl)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("impl", ["grouped_mm", "loop", "padded_bmm", "auto"])
def test_edge_cases_minus_one_ids_empty_experts_one_hot_expert_and_no_tokens(impl):
    w_gate_up, w_down = weights(1)
    hidden = torch.randn(30, H, generator=torch.Generator().manual_seed(2))
    ids, w = random_routing(30, seed=3)
    ids[::3, 0] = -1  # not on this device
    ids[ids == 5] = 6  # expert 5 gets no tokens
    ids[:, 1] = torch.where(ids[:, 1] >= 0, ids[:, 1], 2)
    got = grouped_expert_ffn(hidden, w_gate_up, w_down, ids, w, impl=impl)
    torch.testing.assert_close(got, per_token_reference(hidden, w_gate_up, w_down, ids, w), atol=1e-5, rtol=1e-5)
    all_one = torch.full((30, 1), 4)
    got = grouped_expert_ffn(hidden, w_gate_up, w_down, all_one, w[:, :1], impl=impl)
    torch.testing.assert_close(got, per_token_reference(hidden, w_gate_up, w_down, all_one, w[:, :1]))
    assert torch.equal(
        grouped_expert_ffn(hidden, w_gate_up, w_down, torch.full((30, K), -1), w), torch.zeros_like(hidden)
    )
    assert grouped_expert_ffn(hidden[:0], w_gate_up, w_down, ids[:0], w[:0], impl=impl).shape == (0, H)
    with pytest.raises(ValueError, match="impl='cuda'"):
        grouped_expert_ffn(hidden, w_gate_up, w_down, ids, w, impl="cuda")


def test_sort_by_expert_counts_and_order():
    ids = torch.tensor([[2, 0], [-1, 2], [0, 1]])
    pairs = sort_by_expert(ids, 4)
    assert pairs.counts.tolist() == [2, 1, 2, 0]
    assert pairs.offsets.tolist() == [0, 2, 3, 5, 5]
    assert ids.flatten()[pairs.pair_index].tolist() == pairs.expert.tolist() == [0, 0, 1, 2, 2]
    assert pairs.token.tolist() == [0, 2, 2, 0, 1]  # tokens keep their order within an expert
    assert pairs.rank_in_expert().tolist() == [0, 1, 0, 0, 1]
    assert (pairs.top_k, pairs.n_slots) == (2, 6)


def test_expert_group_sorts_each_call_once_and_counts_from_that_sort(model_dirs, monkeypatch):
    """The FFN reuses the group's sort by expert (sorting again fails here), and the reply's counts are its counts."""
    group = ExpertGroup(model_dirs["tiny-v3"], [2, 7, 11])
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(6, 64, generator=gen)
    ids = torch.tensor([[7, 2], [11, -1], [7, 11], [-1, -1], [2, 7], [7, -1]])
    w = torch.rand(6, 2, generator=gen)
    expected = group.run(1, hidden, ids, w).output

    def no_second_sort(*args, **kwargs):
        raise AssertionError("the FFN sorted the pairs again")

    monkeypatch.setattr("expert_workers.grouped_ffn.sort_by_expert", no_second_sort)
    result = group.run(1, hidden, ids, w)
    assert torch.equal(result.output, expected)
    assert result.tokens_per_expert.tolist() == [2, 4, 2]  # experts [2, 7, 11], in experts_in(1) order


def test_expert_group_loads_only_its_experts_and_computes_their_share(model_dirs):
    path = model_dirs["tiny-v3"]
    mine = [1, 4, 9, 12]
    group = ExpertGroup(path, mine)
    loaded = {int(n.split(".")[5]) for n in group.reader.loaded}
    assert loaded == set(mine) and all(is_routed_expert_tensor(n) for n in group.reader.loaded)
    full = ExpertGroup(path, list(range(16)))
    assert group.weight_bytes * 4 == full.weight_bytes
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 64, generator=gen)
    ids = torch.stack([torch.randperm(16, generator=gen)[:4] for _ in range(10)])
    w = torch.rand(10, 4, generator=gen)
    masked = torch.where(torch.isin(ids, torch.tensor(mine)), ids, -1)
    torch.testing.assert_close(group.run(1, hidden, masked, w).output, full.run(1, hidden, masked, w).output)
    with pytest.raises(ValueError, match="layer=0: not an MoE layer"):
        group.run(0, hidden, masked, w)
    with pytest.raises(ValueError, match="are not hosted on this group"):
        group.run(1, hidden, ids, w)
    with pytest.raises(ValueError, match="expert_ids"):
        ExpertGroup(path, [3, 16])


def bf16_reference(hidden, w_gate_up, w_down, ids, w):
    """The native bfloat16 computation, each product rounded to bf16 where a native kernel rounds, in float64."""
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    x, gu, dn = hidden.double(), w_gate_up.double(), w_down.double()
    for t in range(hidden.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e >= 0:
                g = (x[t] @ gu[e].T).bfloat16()
                h = (torch.nn.functional.silu(g[:I]) * g[I:]).double()
                out[t] += float(w[t, k].bfloat16()) * (h @ dn[e].T).bfloat16().double()
    return out


@pytest.mark.parametrize("impl", ["loop", "padded_bmm"])
def test_float32_weights_of_a_bfloat16_model_compute_the_bfloat16_ffn(impl):
    """half_matmul: a bf16 model's experts held in float32 give bf16 outputs of the same computation as the native
    bf16 kernels (every product rounded where they round): both within a bf16 ulp or so of the float64 reference."""
    w_gate_up, w_down = (t.bfloat16() for t in weights(4))
    hidden = torch.randn(24, H, generator=torch.Generator().manual_seed(5)).bfloat16()
    ids, w = random_routing(24, seed=6)
    ids[::4, 1] = -1
    native = grouped_expert_ffn(hidden, w_gate_up, w_down, ids, w, impl=impl)
    widened = grouped_expert_ffn(hidden, w_gate_up.float(), w_down.float(), ids, w, impl=impl)
    assert widened.dtype == native.dtype == torch.bfloat16
    reference = bf16_reference(hidden, w_gate_up, w_down, ids, w)
    scale = reference.abs().max()
    err_widened = ((widened.double() - reference).abs().max() / scale).item()
    err_native = ((native.double() - reference).abs().max() / scale).item()
    assert err_widened < 5e-3 and err_native < 5e-3  # the output's own bf16 rounding: 2^-8 of its scale
    torch.testing.assert_close(widened, native, atol=5e-3 * scale.item(), rtol=0)


def test_expert_group_holds_float32_stacks_for_half_matmul_float32(model_dirs):
    path = model_dirs["tiny-v3"]
    native = ExpertGroup(path, [0, 3, 5], dtype=torch.bfloat16, half_matmul="native")
    widened = ExpertGroup(path, [0, 3, 5], dtype=torch.bfloat16, half_matmul="float32")
    assert native.matmul_dtype == torch.bfloat16 and widened.matmul_dtype == torch.float32
    assert widened.w_gate_up[1].dtype == torch.float32
    assert widened.weight_bytes == 2 * native.weight_bytes  # the memory it costs is reported
    assert torch.equal(widened.w_down[2], native.w_down[2].float())  # exactly the bf16 values, widened
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(9, 64, generator=gen).bfloat16()
    ids = torch.stack([torch.tensor([0, 3, 5])[torch.randperm(3, generator=gen)[:2]] for _ in range(9)])
    w = torch.rand(9, 2, generator=gen)
    a, b = native.run(1, hidden, ids, w).output, widened.run(1, hidden, ids, w).output
    assert b.dtype == torch.bfloat16
    torch.testing.assert_close(b, a, atol=5e-3 * a.abs().max().item(), rtol=0)
