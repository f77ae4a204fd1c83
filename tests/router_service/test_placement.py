"""Expert placement: contiguous splits, files, and validation that names what is wrong."""

from __future__ import annotations

import pytest

from router_service.placement import Placement, PlacementError


def test_contiguous_split_is_balanced_and_ordered():
    p = Placement.contiguous(16, 3)
    assert [p.experts_on(d) for d in range(3)] == [list(range(0, 6)), list(range(6, 11)), list(range(11, 16))]
    assert p.members().tolist()[2] == [11, 12, 13, 14, 15, -1]
    assert Placement.contiguous(8, 8).expert_device == tuple(range(8))


def test_placement_file_round_trips(tmp_path):
    p = Placement.from_device_lists([[3, 0], [1, 2]], 4)
    assert p.expert_device == (0, 1, 1, 0)
    f = tmp_path / "p.json"
    f.write_text(p.to_json())
    assert Placement.from_file(f, 4) == p


@pytest.mark.parametrize(
    "devices, message",
    [
        ([[0, 1], [1, 2, 3]], "expert 1 is placed twice"),
        ([[0, 1], [2]], r"experts \[3\] are not placed"),
        ([[0, 1, 2, 3], [9]], "expert id 9 is outside"),
        ([[0, 1, 2, 3], []], r"devices \[1\] host no experts"),
        ([[0, 1, 2, "x"]], "expert id 'x'"),
    ],
)
def test_bad_placements_name_the_problem(devices, message):
    with pytest.raises(PlacementError, match=message):
        Placement.from_device_lists(devices, 4)


def test_bad_files_and_sizes_are_reported(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("experts: [1, 2]\n")
    with pytest.raises(PlacementError, match="p.yaml: expected a mapping with a 'devices' list"):
        Placement.from_file(f, 4)
    with pytest.raises(PlacementError, match="cannot read placement"):
        Placement.from_file(tmp_path / "missing.yaml", 4)
    with pytest.raises(PlacementError, match="devices=5: expected 1..n_routed_experts=4"):
        Placement.contiguous(4, 5)


def test_unknown_keys_of_mixed_types_are_named_not_a_type_error(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("devices: [[0, 1], [2, 3]]\n1: x\nextra: y\n")  # YAML reads `1` as an int key beside str keys
    with pytest.raises(PlacementError, match=r"unknown keys \[1, 'extra'\]"):
        Placement.from_file(f, 4)
