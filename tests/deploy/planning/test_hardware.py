"""Hardware files: the nominal rates load, bad values and missing rates are named, calibrated sections (transport
and expert rates) round-trip through the file and price what they measured."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from deploy.planning.hardware import ExpertRate, GatewayRate, Hardware, HardwareError, TransportRate, hardware_yaml

HARDWARE = Path(__file__).parents[3] / "deploy" / "hardware"


def raw_h100() -> dict:
    return Hardware.from_yaml(HARDWARE / "h100.yaml").to_dict()


def test_the_nominal_files_load():
    h100, h200 = Hardware.from_yaml(HARDWARE / "h100.yaml"), Hardware.from_yaml(HARDWARE / "h200.yaml")
    assert (h100.matmul_tflops, h100.hbm_gbytes_per_s, h100.gpus_per_node) == (989, 3350, 8)
    assert (h200.hbm_gbytes_per_s, h200.inter_node_gbytes_per_s) == (4800, 50)
    assert h100.flops == 989e12 and h100.hbm == 3350e9
    for name in ("h100.yaml", "h200.yaml"):  # labelled until a GPU run checks their predicted steps
        assert "# UNVALIDATED:" in (HARDWARE / name).read_text()


@pytest.mark.parametrize("change, message", [
    ({"hbm_gbytes_per_s": 0}, "hbm_gbytes_per_s=0: expected a number > 0 (HBM GB/s per GPU)"),
    ({"inter_node_latency_us": -1}, "inter_node_latency_us=-1: expected a number >= 0"),
    ({"matmul_tflops": "fast"}, "matmul_tflops='fast': expected a number > 0"),
    ({"gpus_per_node": 2.5}, "gpus_per_node=2.5: expected an integer >= 1"),
    ({"gpus_per_node": True}, "gpus_per_node=True: expected an integer >= 1"),
    ({"name": ""}, "name='': expected a non-empty string"),
    ({"nvlink": 1}, "unknown keys ['nvlink']"),
])
def test_bad_hardware_values_are_named(change, message):
    with pytest.raises(HardwareError, match="^rates.yaml: ") as err:
        Hardware.from_dict({**raw_h100(), **change}, "rates.yaml")
    assert message in str(err.value)


def test_missing_rates_and_bad_files_are_named(tmp_path):
    raw = raw_h100()
    del raw["intra_node_latency_us"]
    with pytest.raises(HardwareError, match="intra_node_latency_us: missing"):
        Hardware.from_dict(raw)
    with pytest.raises(HardwareError, match="expected a mapping of rates"):
        Hardware.from_dict([1, 2])
    with pytest.raises(HardwareError, match="cannot read the hardware file"):
        Hardware.from_yaml(tmp_path / "absent.yaml")



def test_expert_rate_interpolates_rows_per_expert_and_extends_the_last_segment():
    rate = ExpertRate(base_us=50.0, per_expert_us=((1.0, 100.0), (4.0, 400.0), (8.0, 600.0)))
    assert rate.expert_us(2.0) == pytest.approx(200.0)
    assert rate.expert_us(6.0) == pytest.approx(500.0)
    assert rate.expert_us(16.0) == pytest.approx(1000.0)  # beyond the last point: along the last segment
    assert rate.expert_us(0.5) == pytest.approx(50.0)
    assert rate.seconds(0, 0) == 0.0
    assert rate.seconds(12, 4) == pytest.approx((50.0 + 4 * 300.0) * 1e-6)  # 4 experts of 3 rows each



def test_calibrated_sections_round_trip_through_the_hardware_file(tmp_path):
    base = Hardware.from_yaml(HARDWARE / "h100.yaml")
    assert base.transports == {} and base.experts is None and base.gateway is None  # nominal files have none
    assert not base.calibrated
    measured = dataclasses.replace(base, transports={"ray": TransportRate(3000.0, 1500.0, caller_us=1200.0)},
                                   experts=ExpertRate(10.0, ((1.0, 500.0), (8.0, 1100.0))))
    path = tmp_path / "here.yaml"
    path.write_text(hardware_yaml(measured, {}))
    assert Hardware.from_yaml(path) == measured
    raw = measured.to_dict()
    older = Hardware.from_dict({**raw, "transports": {"ray": {"call_us": 3000.0, "us_per_mb": 1500.0}}})
    assert older.transports["ray"].caller_us == 0.0  # a file written before caller_us was measured still loads
    with pytest.raises(HardwareError, match="transports.ray.caller_us"):
        Hardware.from_dict({**raw, "transports": {"ray": {"call_us": 3, "us_per_mb": 2, "caller_us": "x"}}})
    with pytest.raises(HardwareError, match="transports.grpc"):
        Hardware.from_dict({**raw, "transports": {"grpc": {"call_us": -1, "us_per_mb": 2}}})
    with pytest.raises(HardwareError, match="experts.per_expert_us"):
        Hardware.from_dict({**raw, "experts": {"base_us": 1, "per_expert_us": [[1, "x"]]}})


def test_a_calibrated_gateway_step_round_trips_and_bad_values_are_named(tmp_path):
    gen = torch.Generator().manual_seed(11)
    base_us, per_token_us = (float(v) for v in torch.rand(2, generator=gen) * 1000)
    gateway = GatewayRate(base_us=base_us, per_token_us=per_token_us, threads=2)
    measured = dataclasses.replace(Hardware.from_yaml(HARDWARE / "h100.yaml"), gateway=gateway)
    path = tmp_path / "here.yaml"
    path.write_text(hardware_yaml(measured, {"gateway": "measured"}))
    loaded = Hardware.from_yaml(path)
    assert loaded == measured and loaded.calibrated
    assert loaded.gateway.seconds(16) == pytest.approx((base_us + 16 * per_token_us) * 1e-6)
    raw = measured.to_dict()
    with pytest.raises(HardwareError, match="gateway.base_us=-1"):
        Hardware.from_dict({**raw, "gateway": {"base_us": -1, "per_token_us": 2, "threads": 1}})
    with pytest.raises(HardwareError, match="gateway.threads=1.5"):
        Hardware.from_dict({**raw, "gateway": {"base_us": 1, "per_token_us": 2, "threads": 1.5}})
    with pytest.raises(HardwareError, match="gateway=.*per_token_us"):
        Hardware.from_dict({**raw, "gateway": {"base_us": 1}})
    cores = float(torch.rand((), generator=gen)) * 4 + 0.5
    assert Hardware.from_dict({**raw, "cores": cores}).cores == cores
    with pytest.raises(HardwareError, match="cores=0: expected a number > 0"):
        Hardware.from_dict({**raw, "cores": 0})
