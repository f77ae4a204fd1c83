"""The aux-free bias update follows b ← b + γ·sign(mean − load), clipped; off/observe change nothing."""

from __future__ import annotations

import pytest
import torch

from model_core.make_model import preset_config
from model_core.spec import ModelSpec
from router_service.bias import BalanceConfig, BiasController, bias_step
from router_service.routing import select_experts


def test_step_moves_against_load_and_clips():
    delta = torch.tensor([0.0, 0.0, 0.0, 0.49])
    load = torch.tensor([10, 2, 6, 0])  # mean 4.5
    out = bias_step(delta, load, gamma=0.1, max_bias=0.5)
    assert out.tolist() == pytest.approx([-0.1, 0.1, -0.1, 0.5])  # overloaded down, underloaded up, clipped
    assert bias_step(torch.full((3,), -0.5), torch.tensor([9, 0, 0]), 0.1, 0.5).tolist()[0] == pytest.approx(-0.5)
    exactly_mean = bias_step(torch.zeros(2), torch.tensor([3, 3]), 0.1, 0.5)
    assert exactly_mean.tolist() == [0.0, 0.0]  # sign(0) = 0


def test_controller_starts_from_the_model_bias_and_only_adapt_changes_it():
    model_bias = {1: torch.tensor([0.3, -0.2, 0.0, 0.1])}
    load = {1: torch.tensor([8, 0, 4, 4])}
    for mode in ("off", "observe"):
        c = BiasController(model_bias, BalanceConfig(mode=mode, gamma=0.05))
        assert not c.update(load) and c.version == 0
        assert torch.equal(c.bias(1), model_bias[1])
    c = BiasController(model_bias, BalanceConfig(mode="adapt", gamma=0.05, max_bias=0.08))
    assert c.update(load) and c.update(load) and c.version == 2
    assert c.bias(1).tolist() == pytest.approx([0.3 - 0.08, -0.2 + 0.08, 0.0, 0.1])  # |δ| ≤ max_bias


def test_decaying_gamma_is_harmonic():
    c = BiasController({1: torch.zeros(2)}, BalanceConfig(mode="adapt", gamma=0.1, gamma_decay_windows=4))
    assert [c.gamma_at(w) for w in (0, 4, 12)] == pytest.approx([0.1, 0.05, 0.025])


def unbiased_weights(scores: torch.Tensor, ids: torch.Tensor, scaling: float) -> torch.Tensor:
    """The DeepSeek-V3 combine weights of the chosen experts: their unbiased scores, normalised, scaled."""
    picked = scores.gather(1, ids)
    return picked / picked.sum(-1, keepdim=True) * scaling


def test_bias_changes_selection_never_weights():
    spec = ModelSpec.from_dict(preset_config("tiny-v3")).router  # sigmoid, 16 experts in 4 groups, top-2 groups, K=4
    gen = torch.Generator().manual_seed(0)
    scores = 0.1 + 0.4 * torch.rand(40, 16, generator=gen)  # every score in [0.1, 0.5)
    scores[:, 15] = 0.01  # expert 15 is every token's last choice: unbiased routing never picks it
    bias = torch.zeros(16)
    bias[15] = 1.0  # ...and with it every token's first: sel = 1.01 > 0.5 > any other, so its group makes the top 2
    plain, biased = select_experts(scores, spec), select_experts(scores, spec, bias=bias)
    assert not (plain.ids == 15).any() and (biased.ids == 15).any(dim=1).all()  # the bias changed every selection
    torch.testing.assert_close(biased.weights, unbiased_weights(scores, biased.ids, spec.routed_scaling_factor))
    w15 = biased.weights[biased.ids == 15]  # expert 15 weighs what its score says, not its score plus bias
    assert (w15 < 0.01 / 0.31 * spec.routed_scaling_factor).all()
    with_bias = unbiased_weights(scores + bias, biased.ids, spec.routed_scaling_factor)
    assert not torch.allclose(biased.weights, with_bias)

    # The same through the controller: one adapt window from the unbiased load moves some tokens' experts.
    scores = torch.rand(40, 16, generator=torch.Generator().manual_seed(0))
    c = BiasController({1: torch.zeros(16)}, BalanceConfig(mode="adapt", gamma=0.3, max_bias=1.0))
    plain = select_experts(scores, spec)
    c.update({1: torch.bincount(plain.ids.flatten(), minlength=16)})
    r = select_experts(scores, spec, bias=c.bias(1))
    changed = (plain.ids.sort(dim=1).values != r.ids.sort(dim=1).values).any(dim=1)
    assert changed.any()
    torch.testing.assert_close(r.weights, unbiased_weights(scores, r.ids, spec.routed_scaling_factor))


@pytest.mark.parametrize(
    "kwargs, field",
    [({"mode": "on"}, "mode"), ({"gamma": 0}, "gamma"), ({"max_bias": -1}, "max_bias"),
     ({"window_tokens": 0}, "window_tokens"), ({"service": "k8s"}, "service"),
     ({"gamma_decay_windows": 0}, "gamma_decay_windows"), ({"push_every_steps": 0}, "push_every_steps"),
     ({"max_pending_pushes": 0}, "max_pending_pushes"), ({"history_windows": 0}, "history_windows"),
     ({"history_windows": 2.5}, "history_windows")],
)
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"balancing.{field}"):
        BalanceConfig(**kwargs)
