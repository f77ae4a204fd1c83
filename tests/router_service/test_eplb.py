"""EPLB planner: hand-worked plans, invariants on random loads, the skewed target case, nodes, and bad arguments."""

from __future__ import annotations

import json

import pytest
import torch

from router_service.eplb import EplbPlan, plan_placement


def zipf_concentrated(n_layers: int, n_experts: int, n_devices: int) -> torch.Tensor:
    """[L, E] loads 1000 / (rank + 1)^1.2; in layer l the hottest experts sit in device (l mod D)'s contiguous block."""
    block = n_experts // n_devices
    rows = [(torch.arange(n_experts) - block * (l % n_devices)) % n_experts for l in range(n_layers)]
    return 1000 / (torch.stack(rows).double() + 1) ** 1.2


def check_plan(plan: EplbPlan, n_experts: int, n_devices: int, redundant: int) -> None:
    """Every expert on >= 1 device, none twice on a device, slots per device within 1 and summing to E + R."""
    assert plan.redundant_slots == redundant
    for l, devices in enumerate(plan.layers):
        assert len(devices) == n_devices
        assert all(list(experts) == sorted(set(experts)) for experts in devices)  # ascending, no repeats
        slots = [len(experts) for experts in devices]
        assert sum(slots) == n_experts + redundant
        assert max(slots) - min(slots) <= 1
        copies = plan.copies(l)
        assert len(copies) == n_experts and min(copies) >= 1 and max(copies) <= n_devices


def test_hand_case_without_copies_packs_heaviest_first():
    # Order 0 (10), 3 (8), 1 (1), 2 (1); two slots per device. 0 -> d0 (tie, lower index); 3 -> d1 (0 < 10);
    # 1 -> d1 (8 < 10), d1 full; 2 -> d0. Loads 11 | 9, mean 10.
    plan = plan_placement([10, 1, 1, 8], n_devices=2, redundant_slots=0)
    assert plan.layers == (((0, 2), (1, 3)),)
    assert plan.predicted_max_over_mean == pytest.approx((1.1,))
    assert plan.current_max_over_mean == pytest.approx((1.1,))  # contiguous [0, 1] | [2, 3]: 11 | 9
    assert plan.copies(0) == [1, 1, 1, 1]
    # The same loads measured against a placement that pairs the two hot experts: 18 | 2.
    plan = plan_placement([10, 1, 1, 8], n_devices=2, redundant_slots=0, current=[[0, 3], [1, 2]])
    assert plan.current_max_over_mean == pytest.approx((1.8,))
    assert plan.worst_current == pytest.approx(1.8) and plan.worst_predicted == pytest.approx(1.1)
    assert json.loads(json.dumps(plan.to_dict())) == {
        "redundant_slots": 0,
        "layers": [[[0, 2], [1, 3]]],
        "predicted_max_over_mean": [pytest.approx(1.1)],
        "current_max_over_mean": [pytest.approx(1.8)],
    }


def test_hand_case_with_copies_splits_the_hot_experts():
    # Replication (R = 2): 0 goes 12 -> 2 copies of 6 and is then capped at D = 2; the largest per-copy load left
    # is 3's 4, so 3 gets 2 copies of 2. Copies [2, 1, 1, 2], P = 6, three slots per device.
    # Packing order 0 (6), 0 (6), 1 (2), 2 (2), 3 (2), 3 (2): 0 -> d0, 0 -> d1; 1 -> d0 (tie 6 | 6); 2 -> d1;
    # 3 -> d0 (tie 8 | 8); 3 -> d1 (d0 has it). Loads 10 | 10.
    plan = plan_placement([12, 2, 2, 4], n_devices=2, redundant_slots=2)
    assert plan.layers == (((0, 1, 3), (0, 2, 3)),)
    assert plan.copies(0) == [2, 1, 1, 2]
    assert plan.predicted_max_over_mean == pytest.approx((1.0,))
    assert plan.current_max_over_mean == pytest.approx((1.4,))  # contiguous 14 | 6, mean 10


def test_replication_follows_load_per_copy_not_total_load():
    # R = 2, D = 3: 0 (10) -> 2 copies of 5; now 1's 6 beats 0's 5, so 1 -> 2 copies of 3. Copies [2, 2, 1, 1],
    # two slots per device. Order 0, 0 (5), 1, 1 (3), 2, 3 (1): 0 -> d0, d1; 1 -> d2, then d0 (tie 5 | 5), d0 full;
    # 2 -> d2 (3 < 5), d2 full; 3 -> d1. Loads 8 | 6 | 4, mean 6.
    plan = plan_placement([10, 6, 1, 1], n_devices=3, redundant_slots=2)
    assert plan.copies(0) == [2, 2, 1, 1]
    assert plan.layers == (((0, 1), (0, 3), (1, 2)),)
    assert plan.predicted_max_over_mean == pytest.approx((8 / 6,))


def test_packing_swaps_when_every_open_device_already_hosts_the_expert():
    # Replication (R = 1): 2 (tie with 3 at 2, lower id) gets 2 copies of 1. Copies [1, 1, 2, 1], P = 5: d0 three
    # slots, d1 two. Order 3 (2), 0, 1, 2, 2 (1 each): 3 -> d0; 0 -> d1; 1 -> d1 (1 < 2), d1 full; 2 -> d0.
    # The second copy of 2 has only d0 left, which hosts 2: the greedy is cornered. The swap moves the lightest
    # expert of d1 that d0 lacks (0) to d0 and puts 2 on d1. Loads 4 | 2, mean 3.
    plan = plan_placement([1, 1, 2, 2], n_devices=2, redundant_slots=1)
    assert plan.layers == (((0, 2, 3), (1, 2)),)
    assert plan.predicted_max_over_mean == pytest.approx((4 / 3,))


def test_zero_loads_plan_validly_and_report_even_balance():
    # All per-copy loads tie at 0, so lower ids win: 0 takes copies up to D = 4, then 1 takes the last one.
    plan = plan_placement(torch.zeros(2, 8), n_devices=4, redundant_slots=4)
    check_plan(plan, 8, 4, 4)
    assert plan.layers[0] == ((0, 1, 2), (0, 1, 3), (0, 4, 5), (0, 6, 7))
    assert plan.predicted_max_over_mean == (1.0, 1.0)
    assert plan.current_max_over_mean == (1.0, 1.0)


@pytest.mark.parametrize(
    "n_layers, n_experts, n_devices, redundant",
    [(3, 32, 8, 0), (3, 32, 8, 8), (3, 32, 8, 24), (2, 64, 4, 4), (2, 64, 4, 16), (58, 256, 64, 64)],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_loads_give_valid_plans_no_worse_than_contiguous(n_layers, n_experts, n_devices, redundant, seed):
    g = torch.Generator().manual_seed(seed)
    loads = torch.rand(n_layers, n_experts, generator=g, dtype=torch.float64) ** 3 * 100
    plan = plan_placement(loads, n_devices, redundant)
    check_plan(plan, n_experts, n_devices, redundant)
    assert len(plan.predicted_max_over_mean) == len(plan.current_max_over_mean) == n_layers
    for predicted, current in zip(plan.predicted_max_over_mean, plan.current_max_over_mean, strict=True):
        assert 1.0 <= predicted <= current + 1e-12


def test_more_redundant_slots_never_predict_worse_on_skewed_loads():
    loads = zipf_concentrated(4, 64, 4)
    plans = [plan_placement(loads, 4, r) for r in (0, 4, 16)]
    for fewer, more in zip(plans, plans[1:], strict=False):
        for a, b in zip(fewer.predicted_max_over_mean, more.predicted_max_over_mean, strict=True):
            assert b <= a + 1e-12
    assert plans[0].worst_predicted > 1.2  # the copies have something to improve on


def test_skewed_target_case_is_balanced_by_sixteen_copies():
    loads = zipf_concentrated(4, 64, 4)
    plan = plan_placement(loads, n_devices=4, redundant_slots=16)
    check_plan(plan, 64, 4, 16)
    assert min(plan.current_max_over_mean) > 2.0
    assert max(plan.predicted_max_over_mean) <= 1.10
    assert plan.copies(0)[:3] == [4, 4, 4]  # the three hottest experts sit on every device


def test_hierarchical_hand_case_keeps_groups_on_nodes():
    # Groups of 2: loads 10 (g0), 8 (g1), 1 (g2), 4 (g3). Two groups per node: g0 -> n0, g1 -> n1, g3 -> n1 (8 < 10),
    # g2 -> n0. Node 0 = experts [0, 1, 4, 5] on devices 0-1, node 1 = [2, 3, 6, 7] on devices 2-3, one copy each.
    # Node 0, loads [6, 4, 1, 0]: 0 -> 2 copies of 3; P = 5 (d0 three slots). Order 1 (4), 0 (3), 0 (3), 4, 5:
    # 1 -> d0; 0 -> d1; 0 -> d0 (d1 has it); 4 -> d1 (3 < 7), d1 full; 5 -> d0. Loads 7 | 4.
    # Node 1, loads [5, 3, 2, 2]: 2 -> 2 copies of 2.5. Order 3 (3), 2, 2 (2.5), 6, 7 (2):
    # 3 -> d2; 2 -> d3; 2 -> d2; 6 -> d3 (2.5 < 5.5), d3 full; 7 -> d2. Loads 7.5 | 4.5. Mean 23 / 4 = 5.75.
    plan = plan_placement([6, 4, 5, 3, 1, 0, 2, 2], n_devices=4, redundant_slots=2, expert_groups=4, nodes=2)
    assert plan.layers == (((0, 1, 5), (0, 4), (2, 3, 7), (2, 6)),)
    assert plan.predicted_max_over_mean == pytest.approx((7.5 / 5.75,))
    assert plan.current_max_over_mean == pytest.approx((10 / 5.75,))  # contiguous pairs: 10 | 8 | 1 | 4


def test_hierarchical_random_loads_place_whole_groups_per_node():
    n_experts, n_groups, nodes, n_devices, redundant = 64, 8, 4, 8, 6
    g = torch.Generator().manual_seed(3)
    loads = torch.rand(5, n_experts, generator=g, dtype=torch.float64) ** 4 * 100
    plan = plan_placement(loads, n_devices, redundant, expert_groups=n_groups, nodes=nodes)
    assert plan.redundant_slots == redundant
    group_size, node_devices = n_experts // n_groups, n_devices // nodes
    for l, devices in enumerate(plan.layers):
        assert min(plan.copies(l)) >= 1
        seen_groups: set[int] = set()
        for n in range(nodes):
            node = devices[n * node_devices : (n + 1) * node_devices]
            experts = {e for d in node for e in d}
            groups = {e // group_size for e in experts}
            assert len(groups) == n_groups // nodes  # whole groups, two per node
            assert experts == {e for grp in groups for e in range(grp * group_size, (grp + 1) * group_size)}
            assert not groups & seen_groups
            seen_groups |= groups
            slots = [len(d) for d in node]
            share = redundant // nodes + (n < redundant % nodes)  # 2, 2, 1, 1
            assert sum(slots) == len(experts) + share and max(slots) - min(slots) <= 1
            assert all(len(set(d)) == len(d) for d in node)


@pytest.mark.parametrize(
    "loads, n_devices, redundant, kwargs, message",
    [
        ([[[1.0, 2.0]]], 1, 0, {}, r"loads has shape \[1, 1, 2\]"),
        ([], 1, 0, {}, r"loads has shape \[0\]"),
        ([[1, 2], [3]], 1, 0, {}, "loads: expected an"),
        ([1, -1, 2], 1, 0, {}, "loads: expected finite values >= 0"),
        ([1, float("nan"), 2], 1, 0, {}, "loads: expected finite values >= 0"),
        ([1, 2], 3, 0, {}, r"n_devices=3: expected an integer in 1\.\.2"),
        ([1, 2], 0, 0, {}, "n_devices=0: expected an integer"),
        ([1, 2], 2.0, 0, {}, "n_devices=2.0: expected an integer"),
        ([1, 2, 3, 4], 2, -1, {}, "redundant_slots=-1: expected an integer >= 0"),
        ([1, 2, 3, 4], 2, True, {}, "redundant_slots=True: expected an integer"),
        ([1, 2, 3, 4], 2, 5, {}, r"redundant_slots=5: expected at most E\*\(D-1\)=4"),
        ([1, 2, 3, 4], 2, 0, {"current": [[0, 1], [1, 2, 3]]}, "current: expert 1 is placed twice"),
        ([1, 2, 3, 4], 2, 0, {"current": [[0, 1, 2, 3]]}, "current: 1 devices for 4 experts, expected n_devices=2"),
        ([1] * 8, 4, 0, {"expert_groups": 2}, "expert_groups=2, nodes=None: expected both or neither"),
        ([1] * 8, 4, 0, {"nodes": 2}, "expert_groups=None, nodes=2: expected both or neither"),
        ([1] * 8, 4, 0, {"expert_groups": 3, "nodes": 1}, "expert_groups=3: expected a divisor of E=8"),
        ([1] * 8, 4, 0, {"expert_groups": 4, "nodes": 3}, "nodes=3: expected a divisor of n_devices=4"),
        ([1] * 8, 4, 0, {"expert_groups": 2, "nodes": 4}, "nodes=4: expected a divisor of expert_groups=2"),
        ([1] * 8, 4, 0, {"expert_groups": 4, "nodes": 0}, "nodes=0: expected an integer >= 1"),
        ([1] * 8, 4, 9, {"expert_groups": 4, "nodes": 2}, "redundant_slots=9: expected at most 8 with nodes=2"),
    ],
)
def test_bad_arguments_name_the_argument(loads, n_devices, redundant, kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_placement(loads, n_devices, redundant, **kwargs)
