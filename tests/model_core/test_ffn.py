"""swiglu equals transformers' DeepSeek MLP (one gate-and-up matmul, or separate ones), widened weights included."""

from __future__ import annotations

import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MLP

from model_core.ffn import silu_and_mul, swiglu
from model_core.make_model import preset_config

H, I = 24, 20


def test_swiglu_equals_the_transformers_mlp_and_silu_and_mul_splits_gate_first():
    gen = torch.Generator().manual_seed(0)
    mlp = DeepseekV3MLP(DeepseekV3Config(**{**preset_config("tiny-v3"), "hidden_size": H}), intermediate_size=I)
    for proj in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        proj.weight.data.copy_(torch.randn(proj.weight.shape, generator=gen) / proj.weight.shape[1] ** 0.5)
    x = torch.randn(7, H, generator=gen)
    w_gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()  # [2I, H]
    w_down = mlp.down_proj.weight.detach()
    with torch.no_grad():
        expected = mlp(x)
    torch.testing.assert_close(swiglu(x, w_gate_up, w_down), expected, rtol=0, atol=1e-6)
    gate_up = torch.randn(3, 2 * I, generator=gen)
    assert torch.equal(silu_and_mul(gate_up), torch.nn.functional.silu(gate_up[:, :I]) * gate_up[:, I:])


def test_swiglu_with_widened_weights_keeps_the_activation_dtype():
    """half_matmul: bf16 weights held in float32 give a bf16 result close to the native bf16 computation."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, H, generator=gen).bfloat16()
    w_gate_up = (torch.randn(2 * I, H, generator=gen) / H**0.5).bfloat16()
    w_down = (torch.randn(H, I, generator=gen) / I**0.5).bfloat16()
    native = swiglu(x, w_gate_up, w_down)
    widened = swiglu(x, w_gate_up.float(), w_down.float())
    assert widened.dtype == native.dtype == torch.bfloat16
    torch.testing.assert_close(widened, native, atol=2e-2 * native.abs().max().item(), rtol=0)
