"""On CUDA the served model computes what the CPU float32 reference computes: gateway and groups on the GPU,
in-process (torch and Triton kernels) and as Ray actors sharing one GPU. bfloat16 agreement is reported."""

from __future__ import annotations

import pytest
import torch

from gateway import Engine
from gateway.config import DeploymentConfig
from tests.conftest import TINY_PRESETS, random_prompts

pytestmark = pytest.mark.gpu

SCORE_LENGTHS, GENERATE_LENGTHS, NEW_TOKENS = [9, 3, 17], [6, 11, 4], 32


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float().cpu() - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(autouse=True)
def no_tf32():
    """float32 on the GPU must be float32: TF32 matmuls (~3e-4 relative) would not meet 1e-4."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def cpu_reference(model_dirs):
    """Per preset: (logits of the scored prompts, greedy tokens) from the CPU float32 engine."""
    out = {}
    for name, path in model_dirs.items():
        with Engine.from_pretrained(path, gateway_device="cpu") as engine:
            vocab = engine.spec.vocab_size
            logits = engine.logits(random_prompts(vocab, SCORE_LENGTHS, seed=1))
            tokens = engine.generate(random_prompts(vocab, GENERATE_LENGTHS, seed=3), NEW_TOKENS, stop_at_eos=False)
        out[name] = (logits, tokens)
    return out


def check_against_reference(engine: Engine, reference) -> None:
    expected_logits, expected_tokens = reference
    vocab = engine.spec.vocab_size
    logits = engine.logits(random_prompts(vocab, SCORE_LENGTHS, seed=1))
    for ours, expected in zip(logits, expected_logits, strict=True):
        assert rel_err(ours, expected) < 1e-4
    tokens = engine.generate(random_prompts(vocab, GENERATE_LENGTHS, seed=3), NEW_TOKENS, stop_at_eos=False)
    assert tokens == expected_tokens


@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize("preset", TINY_PRESETS)
@torch.inference_mode()
def test_cuda_float32_engine_matches_cpu_reference(preset, kernel, model_dirs, cpu_reference):
    with Engine.from_pretrained(model_dirs[preset], gateway_device="cuda", devices=2, expert_kernel=kernel) as engine:
        assert engine.device.type == "cuda"
        assert {(g.torch_device.type, g.kernel) for g in engine.backend.transport.groups} == {("cuda", kernel)}
        check_against_reference(engine, cpu_reference[preset])


@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize("preset", TINY_PRESETS)
@torch.inference_mode()
def test_cuda_bfloat16_greedy_agreement_is_reported(preset, kernel, model_dirs, cpu_reference, record_property):
    """bfloat16 rounding may flip a near-tie argmax, after which sequences diverge: reported, not asserted."""
    _, expected = cpu_reference[preset]
    with Engine.from_pretrained(model_dirs[preset], gateway_device="cuda", dtype="bfloat16",
                                expert_kernel=kernel) as engine:
        vocab = engine.spec.vocab_size
        assert all(x.isfinite().all() for x in engine.logits(random_prompts(vocab, SCORE_LENGTHS, seed=1)))
        tokens = engine.generate(random_prompts(vocab, GENERATE_LENGTHS, seed=3), NEW_TOKENS, stop_at_eos=False)
    assert all(len(t) == NEW_TOKENS and all(0 <= x < vocab for x in t) for t in tokens)
    same_prefix = [next((i for i, (a, b) in enumerate(zip(t, e, strict=True)) if a != b), NEW_TOKENS)
                   for t, e in zip(tokens, expected, strict=True)]
    equal = sum(n == NEW_TOKENS for n in same_prefix)
    record_property("report", f"bf16 greedy vs CPU fp32: {equal}/{len(tokens)} sequences identical, tokens "
                              f"before the first difference {same_prefix} of {NEW_TOKENS}")


def served_outputs(engine: Engine) -> tuple[list[torch.Tensor], list[list[int]], list[dict]]:
    """What check_against_reference compares, plus the expert actors' descriptions (CPU copies: picklable)."""
    import ray

    vocab = engine.spec.vocab_size
    logits = [t.float().cpu() for t in engine.logits(random_prompts(vocab, SCORE_LENGTHS, seed=1))]
    tokens = engine.generate(random_prompts(vocab, GENERATE_LENGTHS, seed=3), NEW_TOKENS, stop_at_eos=False)
    return logits, tokens, ray.get([a.describe.remote() for a in engine.backend.pool.actors()])


class GatewayActor:
    """The gateway as a Ray actor holding a GPU share, as under Ray Serve: Ray's CUDA IPC transport only sends
    from a process Ray gave the GPU to (a driver has none)."""

    @torch.inference_mode()
    def run(self, config: DeploymentConfig) -> tuple:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        with Engine.from_config(config) as engine:
            return served_outputs(engine)


def serve_on_the_gpu(ray_cluster, backend: str, tensor_transport: str, devices: int, share: float, preset_dir,
                     micro_batches: int = 1) -> tuple:
    """served_outputs of `devices` groups on the GPU (each `share` of it) over `tensor_transport`; with CUDA IPC
    the gateway runs in an actor holding the rest of the GPU."""
    config = DeploymentConfig.from_dict({
        "model": str(preset_dir), "backend": backend, "devices": devices, "gateway_device": "cuda",
        "ray": {"device_resource": "gpu", "gpus_per_group": share}, "rpc": {"tensor_transport": tensor_transport},
        "scheduler": {"micro_batches": micro_batches},
    })
    if tensor_transport == "cuda_ipc":  # the gateway takes what the four groups leave of the GPU
        gateway = ray_cluster.remote(num_gpus=round(1 - devices * share, 2))(GatewayActor).remote()
        try:
            return ray_cluster.get(gateway.run.remote(config), timeout=600)
        finally:
            ray_cluster.kill(gateway)
    with Engine.from_config(config) as engine:
        return served_outputs(engine)


@pytest.mark.slow
@torch.inference_mode()
@pytest.mark.parametrize("backend, tensor_transport, devices, share", [
    ("ray", "auto", 4, 0.25), ("ray-rdt", "cuda_ipc", 4, 0.2), ("ray-rdt", "nccl", 1, 1.0)])
def test_ray_groups_on_the_gpu_match_cpu_reference(backend, tensor_transport, devices, share, model_dirs,
                                                   cpu_reference, ray_cluster):
    """Four groups sharing one GPU over the object store; four over CUDA IPC, straight from a gateway actor on
    the same GPU; one over NCCL through the relay (NCCL wants one GPU per rank: the group's and the relay's;
    the driver's gateway reaches the relay through the object store)."""
    gpus = ray_cluster.cluster_resources().get("GPU", 0)
    assert gpus >= 1, "Ray sees no GPU on this CUDA machine"
    if tensor_transport == "nccl" and gpus < 2:
        pytest.skip("NCCL needs one GPU per rank: the relay's and the group's")
    logits, tokens, infos = serve_on_the_gpu(ray_cluster, backend, tensor_transport, devices, share,
                                             model_dirs["tiny-v3"])
    assert sorted(i["device"] for i in infos) == list(range(devices))
    assert {(i["torch_device"], i["kernel"]) for i in infos} == {("cuda", "triton")}
    expected_logits, expected_tokens = cpu_reference["tiny-v3"]
    for ours, expected in zip(logits, expected_logits, strict=True):
        assert rel_err(ours, expected) < 1e-4
    assert tokens == expected_tokens


@pytest.mark.slow
@torch.inference_mode()
@pytest.mark.parametrize("backend, tensor_transport, share", [("ray", "auto", 0.25), ("ray-rdt", "cuda_ipc", 0.2)])
def test_two_micro_batches_give_one_micro_batchs_outputs_on_the_gpu_transports(backend, tensor_transport, share,
                                                                              model_dirs, ray_cluster):
    """Ping-pong over the GPU data paths (float32): the same greedy tokens as one micro-batch, and logits within
    1e-5 (cuBLAS may pick other kernels for the halves' shapes, so bitwise equality is not promised here)."""
    one, two = (serve_on_the_gpu(ray_cluster, backend, tensor_transport, 4, share, model_dirs["tiny-v3"], mb)
                for mb in (1, 2))
    assert two[1] == one[1]
    for ours, expected in zip(two[0], one[0], strict=True):
        assert rel_err(ours, expected) < 1e-5
