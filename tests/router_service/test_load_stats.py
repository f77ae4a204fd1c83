"""Balance measures against a hand-computed example (N=4 experts, K=2, T=2 tokens, D=2 devices)."""

from __future__ import annotations

import pytest
import torch

from router_service.load_stats import (
    LayerWindow,
    communication_balance,
    device_balance,
    expert_balance,
    layer_report,
    max_over_mean,
    observe_routing,
)

# token 0 picks experts {0, 1}, token 1 picks {0, 2}; scores already sum to 1 per token
IDS = torch.tensor([[0, 1], [0, 2]])
SCORES = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.5, 0.1, 0.3, 0.1]])
DEVICE = torch.tensor([0, 0, 1, 1])
COUNTS = torch.tensor([2, 1, 1, 0])
SCORE_SUM = SCORES.sum(0).double()


def test_expert_balance():
    # f = N/(K·T)·counts = [2, 1, 1, 0]; P = [0.45, 0.2, 0.25, 0.1]; Σ f·P = 0.9 + 0.2 + 0.25 = 1.35
    assert expert_balance(COUNTS, SCORE_SUM, tokens=2, top_k=2) == pytest.approx(1.35)


def test_device_balance():
    # f' = [mean(2, 1), mean(1, 0)] = [1.5, 0.5]; P' = [0.65, 0.35]; 0.975 + 0.175 = 1.15
    assert device_balance(COUNTS, SCORE_SUM, 2, 2, DEVICE, 2) == pytest.approx(1.15)


def test_communication_balance():
    # tokens sent: device 0 ← both, device 1 ← token 1; with M = 2: f'' = 2/(2·2)·[2, 1] = [1, 0.5]
    assert communication_balance(torch.tensor([2, 1]), SCORE_SUM, 2, 2.0, DEVICE) == pytest.approx(0.825)
    # with M = the observed 1.5 devices per token: f'' = [4/3, 2/3] -> 0.8667 + 0.2333
    assert communication_balance(torch.tensor([2, 1]), SCORE_SUM, 2, 1.5, DEVICE) == pytest.approx(1.1)


def test_uniform_routing_scores_one_everywhere():
    ids = torch.tensor([[0, 1], [2, 3]])
    scores = torch.full((2, 4), 0.25)
    w = observe_routing(ids, scores, DEVICE, 2)
    r = layer_report(1, w, 2, DEVICE, 2)
    assert (r.expert_balance, r.device_balance, r.communication_balance) == pytest.approx((1.0, 1.0, 1.0))
    assert r.expert_max_over_mean == 1.0 and r.device_max_over_mean == 1.0


def test_observed_window_and_report_normalise_scores_and_count_devices():
    w = observe_routing(IDS, 2 * SCORES, DEVICE, 2, changed=1)  # unnormalised scores: normalised inside
    assert w.counts.tolist() == [2, 1, 1, 0] and w.device_tokens.tolist() == [2, 1] and w.tokens == 2
    # sequence-wise: each token its own sequence: [2, 2, 0, 0]·s0 = 1.4 and [2, 0, 2, 0]·s1 = 1.6
    w.seq_balance_sum = expert_balance(torch.tensor([1, 1, 0, 0]), SCORES[0].double(), 1, 2) + expert_balance(
        torch.tensor([1, 0, 1, 0]), SCORES[1].double(), 1, 2
    )
    w.sequences = 2
    r = layer_report(3, w, 2, DEVICE, 2)
    assert r.expert_balance == pytest.approx(1.35) and r.device_balance == pytest.approx(1.15)
    assert r.communication_balance == pytest.approx(1.1)  # M defaults to the observed devices per token
    assert r.sequence_balance == pytest.approx(1.5)
    assert r.expert_max_over_mean == pytest.approx(2 / 1.0) and r.device_max_over_mean == pytest.approx(3 / 2)
    assert r.changed_share == 0.5


def test_windows_add_up_and_empty_windows_report_zero():
    a = LayerWindow.empty(4, 2)
    a.add(observe_routing(IDS, SCORES, DEVICE, 2))
    a.add(observe_routing(IDS, SCORES, DEVICE, 2))
    assert a.counts.tolist() == [4, 2, 2, 0] and a.tokens == 4
    empty = layer_report(0, LayerWindow.empty(4, 2), 2, DEVICE, 2)
    assert empty.expert_balance == 0.0 and empty.sequence_balance == 0.0
    assert max_over_mean(torch.zeros(3)) == 0.0
