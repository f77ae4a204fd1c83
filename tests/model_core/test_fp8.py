"""Block-wise FP8 checkpoints (DeepSeek-V3's release format) are dequantized on read, tile by tile."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from gateway import Engine
from model_core.checkpoint import CheckpointError, CheckpointReader
from model_core.fp8 import dequantize_blocks, quantize_blocks
from model_core.make_model import make_model
from model_core.spec import ConfigError, ModelSpec
from tests.conftest import random_prompts

BLOCK = (16, 8)  # small tiles so the tiny model's shapes have partial blocks


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tile absmax scaling to float8_e4m3fn; returns (fp8 weight, scale_inv [ceil(out/bo), ceil(in/bi)])."""
    bo, bi = BLOCK
    out, inp = w.shape
    scale = torch.zeros(-(-out // bo), -(-inp // bi))
    q = torch.empty(out, inp, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = w[i * bo:(i + 1) * bo, j * bi:(j + 1) * bi]
            scale[i, j] = tile.abs().max().clamp(min=1e-12) / 448.0
            q[i * bo:(i + 1) * bo, j * bi:(j + 1) * bi] = (tile / scale[i, j]).to(torch.float8_e4m3fn)
    return q, scale


@pytest.fixture(scope="module")
def fp8_and_dequantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    src = make_model("tiny-v3", root / "src", seed=4)
    reader = CheckpointReader(src)
    fp8, deq = {}, {}
    for name in reader.names():
        w = reader.get(name)
        quantizable = w.dim() == 2 and name.endswith("proj.weight")  # linear projections, as DeepSeek-V3 ships
        if quantizable:
            q, s = quantize(w)
            fp8[name], fp8[f"{name}_scale_inv"] = q, s
            full = s.repeat_interleave(BLOCK[0], 0)[: w.shape[0]].repeat_interleave(BLOCK[1], 1)[:, : w.shape[1]]
            deq[name] = q.float() * full
        else:
            fp8[name] = deq[name] = w
    config = json.loads((src / "config.json").read_text())
    out = {}
    for kind, tensors, cfg in (("fp8", fp8, {**config, "quantization_config": {"quant_method": "fp8",
                                                                              "weight_block_size": list(BLOCK)}}),
                               ("deq", deq, config)):
        d = root / kind
        d.mkdir()
        save_file(tensors, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(cfg))
        out[kind] = d
    return out["fp8"], out["deq"], src


def test_fp8_checkpoint_serves_exactly_its_dequantized_weights(fp8_and_dequantized):
    fp8, deq, src = fp8_and_dequantized
    prompts = random_prompts(272, [9, 4], seed=2)
    with (Engine.from_pretrained(fp8, quantization="none") as a, Engine.from_pretrained(deq) as b,
          Engine.from_pretrained(src) as c):
        la, lb, lc = a.logits(prompts), b.logits(prompts), c.logits(prompts)
        assert all(torch.equal(x, y) for x, y in zip(la, lb, strict=True))
        assert all(not torch.equal(x, z) for x, z in zip(la, lc, strict=True))  # fp8 is an approximation ...
        assert max(((x - z).abs().max() / z.abs().max()).item() for x, z in zip(la, lc, strict=True)) < 0.25
        assert any(n.endswith("_scale_inv") for n in a.model.reader.loaded)


def test_fp8_without_config_or_scales_is_refused(fp8_and_dequantized, tmp_path):
    fp8, _, _ = fp8_and_dequantized
    reader = CheckpointReader(fp8)  # no fp8_block: the config's quantization_config was not passed
    name = "model.layers.1.mlp.experts.0.up_proj.weight"
    with pytest.raises(CheckpointError, match="float8_e4m3fn but config.json has no quantization_config"):
        reader.get(name)
    with pytest.raises(ConfigError, match="quant_method='awq'"):
        ModelSpec.from_dict({**json.loads((fp8 / "config.json").read_text()),
                             "quantization_config": {"quant_method": "awq"}})
    assert ModelSpec.from_dir(fp8).fp8_block == BLOCK


def test_the_integer_widening_is_exact_for_every_fp8_code():
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(16, 16)
    want = codes.float()
    got = dequantize_blocks(codes, torch.ones(1, 1), (16, 16))  # unit scales: the codes' own values
    assert torch.equal(got.isnan(), want.isnan()) and int(got.isnan().sum()) == 2  # S.1111.111
    assert torch.equal(got[~want.isnan()], want[~want.isnan()])  # subnormals, ±0 and ±448 included


@pytest.mark.parametrize("shape, block", [((70, 45), (24, 16)), ((256, 384), (128, 128)), ((5, 3), (16, 16))])
def test_dequantized_blocks_are_each_tiles_float32_product_rounded_once(shape, block):
    gen = torch.Generator().manual_seed(shape[0])
    for magnitude in (3.0, 1e6):  # scales below 2^8 (2^120 folded into them) and above (multiplied separately)
        q, s = quantize_blocks(torch.randn(*shape, generator=gen) * magnitude, block)
        full = s.repeat_interleave(block[0], 0)[: shape[0]].repeat_interleave(block[1], 1)[:, : shape[1]]
        want = q.float() * full
        assert torch.equal(dequantize_blocks(q, s, block), want)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            out = torch.full(shape, float("nan"), dtype=dtype)  # poisoned
            assert torch.equal(dequantize_blocks(q, s, block, out, nan=False), want.to(dtype))
    q.view(torch.uint8)[0, 0] = 0xFF  # e4m3fn's NaN: kept NaN (the reader then refuses it)
    assert dequantize_blocks(q, s, block).isnan().sum() == 1
    e5m2 = (torch.randn(*shape, generator=gen) * 3).to(torch.float8_e5m2)  # the other float8 the reader accepts
    full = s.repeat_interleave(block[0], 0)[: shape[0]].repeat_interleave(block[1], 1)[:, : shape[1]]
    assert torch.equal(dequantize_blocks(e5m2, s, block), e5m2.float() * full)
    with pytest.raises(ValueError, match=rf"scale_inv.shape=\[{2 * s.shape[0]}, {s.shape[1]}\]: expected"):
        dequantize_blocks(q, s.repeat(2, 1), block)
