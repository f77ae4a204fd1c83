"""Ping-pong micro-batches (scheduler.micro_batches 2): each sequence's tokens, logits and routing equal one
micro-batch's on every backend, the halves are even in tokens, and the second half is dispatched before the
first half's experts are collected (the staggering that hides the hop)."""

from __future__ import annotations

import pytest
import torch

from gateway import Engine
from gateway.config import CacheConfig, DeploymentConfig, SchedulerConfig
from gateway.model.model import split_sequences
from router_service.routing import concat_routings, route_tokens
from tests.conftest import float32_gemm_is_batch_invariant, random_prompts

PROMPTS_SEED = 60


def engine_with(model_dir, micro_batches: int, **fields) -> Engine:
    scheduler = SchedulerConfig(micro_batches=micro_batches, max_prefill_tokens=fields.pop("max_prefill_tokens", 512))
    return Engine.from_config(DeploymentConfig(model=str(model_dir), scheduler=scheduler, **fields))


def test_split_sequences_cuts_between_sequences_evenly_in_tokens():
    assert split_sequences([5, 5, 5, 5], 2) == [(0, 2), (2, 4)]
    assert split_sequences([100, 1, 1, 1], 2) == [(0, 1), (1, 4)]
    assert split_sequences([1, 1, 1, 30], 2) == [(0, 3), (3, 4)]
    assert split_sequences([7], 2) == [(0, 1)]  # one sequence: one micro-batch
    assert split_sequences([3, 4, 5], 1) == [(0, 3)]


def test_concatenated_routings_of_two_halves_are_the_routing_of_all(model_dirs):
    with Engine.from_pretrained(model_dirs["tiny-v3"], devices=2, top_m_devices=1) as engine:
        model, spec = engine.model, engine.spec
        layer = model.layers[spec.moe_layers[0]]
        u = torch.randn(10, spec.hidden_size, generator=torch.Generator().manual_seed(1))
        members = model.device_members[spec.moe_layers[0]]
        whole = route_tokens(u, layer.gate, spec.router, layer.selection_bias, members, 1)
        parts = [route_tokens(u[a:b], layer.gate, spec.router, layer.selection_bias, members, 1)
                 for a, b in ((0, 4), (4, 10))]
        joined = concat_routings(parts)
        for name in ("ids", "weights", "scores", "devices"):
            assert torch.equal(getattr(joined, name), getattr(whole, name))


@pytest.mark.parametrize("preset", ["tiny-v2-group", "tiny-v3"])
def test_two_micro_batches_give_one_micro_batchs_tokens_logits_and_routing(preset, model_dirs):
    prompts = random_prompts(272, [5, 9, 3, 12, 7], seed=PROMPTS_SEED)
    fields = {"devices": 2, "top_m_devices": 1, "max_prefill_tokens": 8, "cache": CacheConfig(max_tokens=512)}
    out = {}
    for mb in (1, 2):
        with engine_with(model_dirs[preset], mb, **dict(fields)) as engine:
            tokens = engine.generate(prompts, max_new_tokens=8, stop_at_eos=False)
            traces = [engine.routing_trace(r).ids for r in engine.last_request_ids]
            out[mb] = (tokens, engine.logits(prompts), traces, engine.routing_summary.rows())
    assert out[2][0] == out[1][0]
    for a, b in zip(out[2][1], out[1][1], strict=True):
        if float32_gemm_is_batch_invariant():
            assert torch.equal(a, b)
        else:  # this CPU's GEMM kernels round by batch size: the halves' logits may differ in the last bits only
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(out[2][2], out[1][2], strict=True))
    assert out[2][3] == out[1][3]  # the routing summary (changed tokens included) counts the same


class RecordingTransport:
    """Wraps a transport and records the order of sends and receives (which device, which layer)."""

    def __init__(self, inner) -> None:
        self.inner, self.events = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def send(self, call):
        self.events.append(("send", call.layer))
        return self.inner.send(call)

    def receive(self, calls, handles):
        self.events.append(("receive", calls[0].layer))
        return self.inner.receive(calls, handles)


def sends_before_first_collect(model_dir, micro_batches: int) -> tuple[int, int]:
    """With one expert group: (sends of the first MoE layer before its first receive, MoE layers collected)."""
    with engine_with(model_dir, micro_batches) as engine:
        recorder = RecordingTransport(engine.backend.transport)
        engine.backend.transport = recorder
        requests = [engine.submit(p, max_new_tokens=3, stop_at_eos=False)
                    for p in random_prompts(272, [4, 4, 4, 4], seed=1)]
        while not all(r.done for r in requests):
            engine.step()
        layer = engine.spec.moe_layers[0]
    events = recorder.events
    start = events.index(("receive", layer))
    return events[:start].count(("send", layer)), len({e[1] for e in events if e[0] == "receive"})


def test_the_second_half_is_dispatched_before_the_first_half_is_collected(model_dirs):
    one = sends_before_first_collect(model_dirs["tiny-v3"], 1)
    two = sends_before_first_collect(model_dirs["tiny-v3"], 2)
    assert one == (1, 2) and two == (2, 2)  # both halves' batches are out before the first half's collect


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ray", "ray, shared batch", "grpc", "ray-rdt"])
def test_two_micro_batches_equal_one_on_every_distributed_backend(backend, model_dirs, ray_cluster):
    """'ray, shared batch': every call reads its half's layer batch from shared memory (tiny rows stay inline
    otherwise), so each half's calls must read their own half's batch."""
    prompts = random_prompts(272, [6, 10, 4, 8], seed=PROMPTS_SEED + 1)
    with engine_with(model_dirs["tiny-v3"], 1) as local:
        want = local.generate(prompts, max_new_tokens=10, stop_at_eos=False)
        want_logits = local.logits(prompts)
    with engine_with(model_dirs["tiny-v3"], 2, backend=backend.split(",")[0], devices=2) as engine:
        if backend == "ray, shared batch":
            engine.backend.transport.share_min_bytes = 1
        assert engine.generate(prompts, max_new_tokens=10, stop_at_eos=False) == want
        for ours, ref in zip(engine.logits(prompts), want_logits, strict=True):
            assert (ours - ref).abs().max().item() < 1e-5
        if backend == "ray, shared batch":
            transport = engine.backend.transport
            assert transport.shared_puts == engine.backend.stats.layers > 0 and transport.shared_calls > 0


def test_micro_batches_other_than_1_or_2_and_ray_dag_with_2_are_refused(model_dirs):
    from gateway.config import DeploymentConfigError

    with pytest.raises(ValueError, match="scheduler.micro_batches=3"):
        SchedulerConfig(micro_batches=3)
    with pytest.raises(DeploymentConfigError, match="scheduler.micro_batches=2: backend 'ray-dag'"):
        DeploymentConfig(model=str(model_dirs["tiny-v3"]), backend="ray-dag", devices=2,
                         scheduler=SchedulerConfig(micro_batches=2))
    with Engine.from_pretrained(model_dirs["tiny-v3"]) as engine:
        engine.micro_batches = 2
        with pytest.raises(ValueError, match="micro_batches=0"):
            engine.micro_batches = 0
        assert engine.micro_batches == 2


def drive(chooser, steps: int, step_seconds) -> list[int]:
    """Serve `steps` steps of 8 tokens, each taking step_seconds(step index, setting); the settings served."""
    served = []
    for i in range(steps):
        setting = chooser.next_setting()
        served.append(setting)
        chooser.record(setting, seconds=step_seconds(i, setting), tokens=8)
    return served


@pytest.mark.parametrize("faster", [1, 2])
def test_auto_probes_both_settings_and_serves_the_faster(faster):
    from gateway.serving.micro_batching import MicroBatchChooser

    chooser = MicroBatchChooser(period=10, probe=2, max_period=40)
    served = drive(chooser, 12, lambda i, s: 0.01 if s == faster else 0.03)
    assert served[:4] == [1, 2, 1, 2]  # the probe round
    assert served[4:10] == [faster] * 6 and chooser.choice == faster
    if faster == 2:  # the round changed the choice: the next one comes after `period` steps
        assert served[10:12] == [1, 2]
    else:  # it confirmed the initial choice: twice as long to the next
        assert served[10:12] == [1, 1] and chooser.gap == 20


def test_auto_probes_ever_less_while_the_choice_holds_and_starts_over_when_it_flips():
    from gateway.serving.micro_batching import MicroBatchChooser

    chooser = MicroBatchChooser(period=10, probe=2, max_period=40)
    decisions, probing = [], 0  # (step of the round's last probe, choice, steps to the next round)
    for i in range(300):  # from step 200 on, 2 micro-batches are the faster setting
        setting = chooser.next_setting()
        probing += chooser._round_at <= i < chooser._round_at + 4
        rounds = chooser.rounds
        slow = setting == (2 if i < 200 else 1)
        chooser.record(setting, seconds=0.03 if slow else 0.01, tokens=8)
        if chooser.rounds > rounds:
            decisions.append((i, chooser.choice, chooser.gap))
    # Rounds at 0, 20, 60, 100, 140, 180 confirm 1 (gaps double to max_period); the one at 220 sees the change.
    assert decisions[:7] == [(3, 1, 20), (23, 1, 40), (63, 1, 40), (103, 1, 40), (143, 1, 40), (183, 1, 40),
                             (223, 2, 10)]
    assert decisions[7:] == [(233, 2, 20), (253, 2, 40), (293, 2, 40)]  # and the gaps grow again
    assert probing == 4 * len(decisions)  # fixed gaps of 10 would have probed 120 of the 300 steps


def test_auto_compares_neighbouring_steps_so_a_prefill_step_does_not_decide():
    from gateway.serving.micro_batching import MicroBatchChooser

    chooser = MicroBatchChooser(period=10, probe=3)
    # 2 micro-batches are 1.5× slower per token, but one of its probe steps also ran a long prefill chunk
    # (cheap per token): the pairs' median ratio still says 1.
    steps = [(1, 0.08, 8), (2, 0.12, 8), (1, 0.08, 8), (2, 0.30, 520), (1, 0.08, 8), (2, 0.12, 8)]
    for setting, seconds, tokens in steps:
        assert chooser.next_setting() == setting
        chooser.record(setting, seconds, tokens)
    assert chooser.choice == 1 and chooser.rounds == 1
    with pytest.raises(ValueError, match="2·probe ≤ period"):
        MicroBatchChooser(period=4, probe=3)


def test_auto_serves_the_same_tokens_and_measures_while_serving(model_dirs):
    prompts = random_prompts(272, [5, 9, 3, 12], seed=PROMPTS_SEED + 2)
    with engine_with(model_dirs["tiny-v3"], 1, devices=2) as fixed:
        want = fixed.generate(prompts, max_new_tokens=10, stop_at_eos=False)
    with engine_with(model_dirs["tiny-v3"], "auto", devices=2) as auto:
        assert auto.micro_chooser is not None
        assert auto.generate(prompts, max_new_tokens=10, stop_at_eos=False) == want
        assert auto.micro_chooser._step > 0 and auto.micro_chooser.choice in (1, 2)
        auto.micro_batches = 1  # a fixed setting ends auto
        assert auto.micro_chooser is None
