"""RouterService: windows close on token count, versions advance in adapt mode, state survives a restart."""

from __future__ import annotations

import pytest
import torch

from router_service.bias import BalanceConfig
from router_service.load_stats import observe_routing
from router_service.service import RouterService, report_table, window_from_wire, window_to_wire

DEVICE = [0, 0, 1, 1]


def skewed_push(service: RouterService, gateway: str, tokens: int = 10) -> int:
    ids = torch.tensor([[0, 1]] * tokens)  # everything on device 0
    scores = torch.rand(tokens, 4, generator=torch.Generator().manual_seed(tokens))
    w = window_to_wire(observe_routing(ids, scores, torch.tensor(DEVICE), 2))
    return service.push(gateway, {1: w, 2: w})


def make(tmp_path, mode="adapt", window=20, **balancing) -> RouterService:
    cfg = BalanceConfig(mode=mode, gamma=0.1, window_tokens=window, checkpoint=str(tmp_path / "router.json"),
                        **balancing)
    return RouterService({1: [0.0] * 4, 2: [0.5, 0, 0, 0]}, DEVICE, 2, 2, cfg)


def test_window_closes_after_window_tokens_and_bias_steps(tmp_path):
    s = make(tmp_path)
    assert skewed_push(s, "a") == 0 and s.windows_closed == 0
    assert skewed_push(s, "b") == 1 and s.windows_closed == 1  # 20 tokens from two gateways close it
    version, bias = s.snapshot(-1)
    assert version == 1
    assert bias[1] == pytest.approx([-0.1, -0.1, 0.1, 0.1]) and bias[2] == pytest.approx([0.4, -0.1, 0.1, 0.1])
    assert s.snapshot(1) == (1, None)  # nothing newer
    report = s.stats()["last_window"][0]
    assert report["device_max_over_mean"] == 2.0 and report["tokens"] == 20
    assert s.stats()["gateways"] == {"a": 1, "b": 1}
    assert "expert max/mean" in report_table(s.stats()["last_window"])


def test_observe_mode_reports_but_never_changes_the_bias(tmp_path):
    s = make(tmp_path, mode="observe")
    for _ in range(4):
        skewed_push(s, "a")
    assert s.windows_closed == 2 and s.controller.version == 0
    assert s.snapshot(-1)[1][2] == [0.5, 0.0, 0.0, 0.0]


def test_a_restarted_service_resumes_bias_and_open_window_from_its_checkpoint(tmp_path):
    s = make(tmp_path)
    skewed_push(s, "a")
    skewed_push(s, "a")
    skewed_push(s, "a", tokens=5)  # an open, partial window
    again = make(tmp_path)
    assert again.restored and again.snapshot(-1) == s.snapshot(-1)
    assert again.stats()["open_window_tokens"] == {1: 5, 2: 5}
    assert again.windows_closed == 1 and again.history == s.history


def test_history_keeps_only_the_last_history_windows_and_survives_a_restart(tmp_path):
    s = make(tmp_path, window=10, history_windows=3)
    for _ in range(7):
        skewed_push(s, "a")
    assert s.windows_closed == 7 and len(s.history) == 3
    assert s.report_history() == s.history and s.stats()["last_window"] == s.history[-1]
    assert [w[0]["bias_max"] for w in s.history] == pytest.approx([0.4, 0.5, 0.5])  # windows 4, 5, 6
    again = make(tmp_path, window=10, history_windows=3)
    assert again.restored and again.history == s.history and again.windows_closed == 7
    smaller = make(tmp_path, window=10, history_windows=2)  # a restart with a smaller bound trims on restore
    assert smaller.history == s.history[-2:]


def test_wire_format_round_trips():
    w = observe_routing(torch.tensor([[0, 2]]), torch.rand(1, 4), torch.tensor(DEVICE), 2, changed=1)
    back = window_from_wire(window_to_wire(w))
    assert torch.equal(back.counts, w.counts) and torch.equal(back.score_sum, w.score_sum)
    assert (back.tokens, back.changed) == (1, 1)


CURRENT = {"devices": [[0, 1], [2, 3]]}


def test_eplb_proposes_a_placement_once_enough_windows_closed_and_only_when_it_helps(tmp_path):
    s = make(tmp_path, mode="eplb", redundant_slots=2, rebalance_every_windows=2, min_gain=0.1)
    for _ in range(2):
        skewed_push(s, "a")  # one window: experts 0 and 1 (device 0) take every token
    assert s.windows_closed == 1 and s.propose(CURRENT) is None  # 2 windows are needed
    assert s.controller.version == 0 and s.snapshot(-1)[1][1] == [0.0] * 4  # eplb never moves the bias
    for _ in range(2):
        skewed_push(s, "a")
    answer = s.propose(CURRENT)
    # loads [20, 20, 0, 0] over 2 devices: now 40 | 0 (max/mean 2.0); copies of 0 and 1 on device 1: 20 | 20
    assert answer["current"] == pytest.approx(2.0) and answer["predicted"] == pytest.approx(1.0)
    assert answer["gain"] == pytest.approx(1.0) and answer["windows"] == 2
    placement = answer["placement"]
    assert placement["version"] == 1 and placement["devices"] == CURRENT["devices"]
    assert {layer: sorted(map(sorted, layout)) for layer, layout in placement["layers"].items()} == {
        1: [[0, 1, 2], [0, 1, 3]], 2: [[0, 1, 2], [0, 1, 3]]}
    assert s.propose(CURRENT) is None and s.stats()["proposals"] == 1  # not again before 2 more windows
    assert s.propose(CURRENT, force=True)["placement"] is not None  # `expertmesh rebalance` asks anyway


def test_eplb_reports_but_does_not_propose_below_min_gain(tmp_path):
    s = make(tmp_path, mode="eplb", redundant_slots=2, rebalance_every_windows=1, min_gain=1.5)
    for _ in range(2):
        skewed_push(s, "a")
    answer = s.propose(CURRENT)
    assert answer["placement"] is None and answer["gain"] == pytest.approx(1.0) and s.proposals == 0


def test_eplb_plus_bias_holds_the_bias_of_a_layer_over_its_changed_slot_budget(tmp_path):
    s = make(tmp_path, mode="eplb+bias", max_changed_slots=0.25)
    ids = torch.tensor([[0, 1]] * 20)
    scores = torch.rand(20, 4, generator=torch.Generator().manual_seed(0))
    over = window_to_wire(observe_routing(ids, scores, torch.tensor(DEVICE), 2, changed=20, changed_slots=20))
    within = window_to_wire(observe_routing(ids, scores, torch.tensor(DEVICE), 2))
    s.push("a", {1: over, 2: within})  # layer 1: half the slots changed (> 25 %): its bias holds still
    assert s.windows_closed == 1 and s.controller.version == 1
    bias = s.snapshot(-1)[1]
    assert bias[1] == pytest.approx([0.0] * 4) and bias[2] == pytest.approx([0.4, -0.1, 0.1, 0.1])


def test_rebalance_shows_a_plan_and_queues_it_for_the_gateways_only_when_asked(tmp_path):
    s = make(tmp_path, mode="eplb", redundant_slots=2, rebalance_every_windows=5, min_gain=5.0)
    with pytest.raises(ValueError, match="no gateway has reported its placement yet"):
        s.rebalance()
    for _ in range(2):
        skewed_push(s, "a")
    assert s.propose(CURRENT) is None  # 5 windows are needed; the call reports the gateway's placement
    shown = s.rebalance(dry_run=True)
    assert shown["applied"] is False and shown["placement"]["version"] == 1 and shown["gain"] == pytest.approx(1.0)
    assert s.propose(CURRENT) is None  # a dry run queues nothing
    applied = s.rebalance(dry_run=False)  # min_gain=5 would hold a proposal back; the operator's request does not
    assert applied["applied"] is True
    assert s.propose(CURRENT)["placement"] == applied["placement"] and s.proposals == 1
    assert s.propose(CURRENT) is None  # handed out once


def test_device_load_counts_copies_once_the_gateways_report_a_placement_with_them(tmp_path):
    s = make(tmp_path, mode="eplb", rebalance_every_windows=100)
    for _ in range(2):
        skewed_push(s, "a")
    assert s.stats()["last_window"][0]["device_max_over_mean"] == 2.0  # experts 0 and 1, both on device 0
    placement = {"devices": [[0, 1], [2, 3]], "layers": {1: [[0, 1, 2], [0, 1, 3]]}, "version": 1}
    ids = torch.tensor([[0, 1]] * 20)
    w = window_to_wire(observe_routing(ids, torch.rand(20, 4), torch.tensor(DEVICE), 2))
    s.push("a", {1: w, 2: w}, placement)  # the gateway says which placement served these counts
    reports = {r["layer"]: r for r in s.stats()["last_window"]}
    assert reports[1]["device_max_over_mean"] == 1.0  # their work splits over both copies
    assert reports[2]["device_max_over_mean"] == 2.0  # layer 2 has no copies
