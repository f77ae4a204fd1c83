"""Routing traces name the device that served each (token, expert) pair at each layer: a layer's own layout and
its copies, not the base placement map."""

from __future__ import annotations

import json

import pytest
import torch

from gateway import Engine
from gateway.dispatch.dispatcher import Dispatcher
from gateway.dispatch.transports import ExpertCall, ExpertReply, Transport
from model_core.spec import ModelSpec
from router_service.placement import Placement
from tests.conftest import random_prompts

DEVICES = 4


def layouts(n_experts: int) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """(base, rotated, copied): the contiguous map; every expert moved to the next device; and the base map with
    device 1's experts copied onto device 0 too."""
    base = [list(Placement.contiguous(n_experts, DEVICES).experts_on(d)) for d in range(DEVICES)]
    rotated = base[1:] + base[:1]
    copied = [base[0] + base[1], *base[1:]]
    return base, rotated, copied


@pytest.mark.parametrize("micro_batches", [1, 2])  # with 2, each half's dispatch picks its own copies
def test_a_layer_with_its_own_layout_or_copies_names_its_own_devices_in_the_routing_trace(model_dirs, tmp_path,
                                                                                          micro_batches):
    spec = ModelSpec.from_dir(model_dirs["tiny-v3"])
    moved, copied_layer = spec.moe_layers[0], spec.moe_layers[-1]
    assert moved != copied_layer
    base, rotated, copied = layouts(spec.n_routed_experts)
    path = tmp_path / "placement.json"
    path.write_text(json.dumps({"devices": base, "layers": {moved: rotated, copied_layer: copied}}))
    with Engine.from_pretrained(model_dirs["tiny-v3"], devices=DEVICES, placement=str(path),
                                **{"scheduler.micro_batches": micro_batches}) as engine:
        engine.generate(random_prompts(spec.vocab_size, [9, 14, 5], seed=2), 6, stop_at_eos=False)
        placement = engine.backend.placement
        base_device = placement.device_tensor()
        for request_id in engine.last_request_ids:
            trace = engine.routing_trace(request_id)
            ids, devices = trace.ids.long(), trace.devices.long()  # [P, L, K]
            j = trace.layers.index(moved)
            want = placement.copy_table(moved).view(-1)[ids[:, j]]  # one host per expert there
            assert torch.equal(devices[:, j], want)
            assert not bool((devices[:, j] == base_device[ids[:, j]]).any())  # every expert moved
            j = trace.layers.index(copied_layer)
            for e, d in zip(ids[:, j].flatten().tolist(), devices[:, j].flatten().tolist(), strict=True):
                assert e in placement.experts_on(d, copied_layer)
        # Device 1's experts are served by both of their copies: some pairs by device 0, which the base map never
        # names for them.
        served = torch.cat([engine.routing_trace(r).devices[:, trace.layers.index(copied_layer)].flatten()
                            for r in engine.last_request_ids])
        experts = torch.cat([engine.routing_trace(r).ids[:, trace.layers.index(copied_layer)].flatten()
                             for r in engine.last_request_ids])
        on_one = base_device[experts.long()] == 1
        assert bool((served[on_one] == 0).any()) and bool((served[on_one] == 1).any())


class ZeroTransport(Transport):
    """Answers every call with zeros at once, and keeps the calls (which device got which pairs)."""

    def __init__(self) -> None:
        self.calls: list[ExpertCall] = []

    def send(self, call: ExpertCall) -> ExpertReply:
        self.calls.append(call)
        return ExpertReply(torch.zeros(call.n_rows, call.hidden.shape[1]), 0.0)

    def flush(self) -> None:
        pass

    def receive(self, calls: list[ExpertCall], handles: list) -> list[ExpertReply]:
        return list(handles)

    def close(self) -> None:
        pass


def test_served_devices_name_the_call_each_pair_was_sent_in():
    n_experts, top_k, tokens = 16, 4, 64
    base, rotated, copied = layouts(n_experts)
    placement = Placement.from_device_lists(base, n_experts, {1: rotated, 2: copied})
    transport = ZeroTransport()
    dispatcher = Dispatcher(placement, transport)
    gen = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(n_experts, generator=gen)[:top_k] for _ in range(tokens)])  # [T, K]
    weights = torch.rand(tokens, top_k, generator=gen)
    token_devices = torch.stack([torch.randperm(DEVICES, generator=gen)[:2] for _ in range(tokens)])  # [T, 2]
    by_layer = {}
    for layer in (0, 1, 2):
        for chosen in (None, token_devices):
            transport.calls.clear()
            pending = dispatcher.dispatch(layer, torch.randn(tokens, 8, generator=gen), ids, weights, chosen)
            served = pending.served_devices()
            sent = torch.full((tokens, top_k), -1, dtype=torch.long)
            for call in transport.calls:  # a pair travels in exactly one call
                here = call.ids >= 0
                assert not bool((sent[call.rows][here] >= 0).any())
                sent[call.rows] = torch.where(here, call.device, sent[call.rows])
            assert torch.equal(served, sent) and bool((served >= 0).all())
            pending.wait()
            by_layer[layer] = served
    assert torch.equal(by_layer[0], placement.device_tensor()[ids])  # the base map
    assert not torch.equal(by_layer[1], placement.device_tensor()[ids])  # its own layout
    assert dispatcher.stats.calls > 0 and dispatcher.stats.bytes_sent > 0
