"""The Ray actor's packed calls: a group reads its rows out of the layer's whole batch exactly as if it were sent
them, and rows that do not index the batch are refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from expert_workers.actor import ExpertGroupActor
from expert_workers.expert_group import ExpertRequestError
from protos.codec import NAMES, tensor_to_numpy

HOSTED = list(range(8))


@pytest.fixture(scope="module")
def actor(model_dirs) -> ExpertGroupActor:
    threads = torch.get_num_threads()
    try:  # the actor sets its process's torch threads: keep the test process's
        return ExpertGroupActor(str(model_dirs["tiny-v3"]), HOSTED, "float32", 0, serve_grpc=False)
    finally:
        torch.set_num_threads(threads)


def layer_batch(actor: ExpertGroupActor, t: int = 40, n: int = 13, dtype: torch.dtype = torch.float32):
    spec = actor.group.spec
    gen = torch.Generator().manual_seed(t + n)
    batch = torch.randn(t, spec.hidden_size, generator=gen).to(dtype)
    rows = torch.sort(torch.randperm(t, generator=gen)[:n]).values
    ids = torch.stack([torch.randperm(len(HOSTED), generator=gen)[: spec.top_k] for _ in range(n)])
    ids = torch.where(torch.rand(n, spec.top_k, generator=gen) < 0.25, -1, ids)
    return spec.moe_layers[0], batch, rows, ids, torch.rand(n, spec.top_k, generator=gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_read_from_the_whole_batch_equal_rows_sent_alone(actor, dtype):
    layer, batch, rows, ids, weights = layer_batch(actor, dtype=dtype)
    ids_np, w_np, name = tensor_to_numpy(ids), tensor_to_numpy(weights), NAMES[dtype]
    alone = actor.forward_packed((layer, tensor_to_numpy(batch[rows]), ids_np, w_np, name, None, None))
    shared = actor.forward_packed((layer, tensor_to_numpy(rows), ids_np, w_np, name, None, None),
                                  tensor_to_numpy(batch))
    assert alone[0].shape == (rows.numel(), batch.shape[1])
    assert np.array_equal(alone[0], shared[0]) and alone[1] > 0 and shared[1] > 0  # (output, compute ms)
    direct = actor.group.run(layer, batch[rows], ids, weights).output  # every valid pair was computed here
    assert np.array_equal(alone[0], tensor_to_numpy(direct))


@pytest.mark.parametrize("rows, message", [
    (np.array([0, 40]), r"rows: values in \[0, 40\], expected \[0, 40\)"),
    (np.array([-1, 3]), r"rows: values in \[-1, 3\]"),
    (np.array([[0, 1]]), r"rows: int64\[1, 2\]: expected a 1-D int32 or int64 tensor"),
    (np.array([0.0, 1.0]), r"rows: float64\[2\]: expected a 1-D int32 or int64"),
])
def test_rows_that_do_not_index_the_batch_are_refused_by_name(actor, rows, message):
    layer, batch, _, ids, weights = layer_batch(actor, n=2)
    args = (layer, rows, tensor_to_numpy(ids), tensor_to_numpy(weights), "float32", None, None)
    with pytest.raises(ExpertRequestError, match=message):
        actor.forward_packed(args, tensor_to_numpy(batch))


def test_rows_that_do_not_match_the_expert_ids_are_refused(actor):
    layer, batch, rows, ids, weights = layer_batch(actor)
    args = (layer, tensor_to_numpy(rows[:-1]), tensor_to_numpy(ids), tensor_to_numpy(weights), "float32", None, None)
    with pytest.raises(ExpertRequestError, match=r"expert_ids.shape=\[13, 4\]: expected \[T=12, K\]"):
        actor.forward_packed(args, tensor_to_numpy(batch))


@pytest.mark.parametrize("ids, message", [
    (np.zeros((2, 1 << 16), dtype=np.int64), r"expert_ids.shape=\[2, 65536\]: expected K <= 4"),
    (np.array([[1, 2, -1, -1], [7, 0, 7, -1]]), r"expert_ids\[1\]: expert 7 appears more than once"),
])
def test_the_ray_call_refuses_more_ids_than_top_k_and_an_expert_twice_in_a_row(actor, ids, message):
    """The Ray transport's server side goes through the same ExpertGroup check as gRPC's."""
    layer, batch, _, _, _ = layer_batch(actor)
    weights = np.random.default_rng(0).random(ids.shape, dtype=np.float32)
    args = (layer, tensor_to_numpy(batch[:2]), ids, weights, "float32", None, None)
    with pytest.raises(ExpertRequestError, match=message):
        actor.forward_packed(args)
