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


def test_bias_changes_selection_never_weights():
    spec = ModelSpec.from_dict(preset_config("tiny-v3")).router
    scores = torch.rand(40, 16, generator=torch.Generator().manual_seed(0))
    c = BiasController({1: torch.zeros(16)}, BalanceConfig(mode="adapt", gamma=0.3, max_bias=1.0))
    load = torch.bincount(select_experts(scores, spec).ids.flatten(), minlength=16)
    c.update({1: load})
    r = select_experts(scores, spec, bias=c.bias(1))
    expected = scores.gather(1, r.ids)
    torch.testing.assert_close(r.weights, expected / expected.sum(-1, keepdim=True) * spec.routed_scaling_factor)


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
