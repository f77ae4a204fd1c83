"""What a request is checked against before it is queued: its prompts against the model and the latent cache, and
the shape of the request ids the engine issues (the HTTP API refuses any other id without echoing it)."""

from __future__ import annotations

import re
import uuid

from gateway.model.kv_cache import PagedLatentCache
from gateway.serving.sampling_params import SamplingParams
from model_core.spec import ModelSpec

REQUEST_ID_LENGTH = 16
REQUEST_ID_SHAPE = re.compile(f"[0-9a-f]{{{REQUEST_ID_LENGTH}}}")  # what new_request_id() returns


def new_request_id() -> str:
    """A fresh request id: REQUEST_ID_LENGTH lowercase hex digits."""
    return uuid.uuid4().hex[:REQUEST_ID_LENGTH]


def request_ids_for(prompts: list[list[int]], request_ids: list[str] | None) -> list[str]:
    """One distinct id per prompt: the given ones (checked), else new ones."""
    if request_ids is None:
        return [new_request_id() for _ in prompts]
    if len(request_ids) != len(prompts) or len(set(request_ids)) != len(request_ids):
        raise ValueError(f"request_ids: expected {len(prompts)} distinct ids, one per prompt")
    return list(request_ids)


def check_prompts(spec: ModelSpec, cache: PagedLatentCache, prompts: list[list[int]],
                  params: SamplingParams | None = None, single: bool = False) -> None:
    """What no SamplingParams can know alone: the prompts' ids and lengths against this model and its cache, a
    logprobs count against its vocabulary. Errors name the prompt: `prompts[i]`, or `prompt` for `submit`."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts: expected a non-empty list of token-id lists")
    vocab, limit = spec.vocab_size, spec.max_position_embeddings
    if params is not None and params.logprobs is not None and params.logprobs > vocab:
        raise ValueError(f"logprobs={params.logprobs}: expected at most vocab_size={vocab}")
    new = params.max_new_tokens if params is not None else 0
    for i, p in enumerate(prompts):
        field = "prompt" if single else f"prompts[{i}]"
        if not isinstance(p, (list, tuple)) or not p:
            raise ValueError(f"{field}: expected a non-empty list of token ids")
        bad = [t for t in p if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{field}: token ids {bad[:5]} are outside [0, vocab_size={vocab})")
        if len(p) + new > limit:
            raise ValueError(f"{field}: {len(p)} tokens + max_new_tokens={new} exceeds "
                             f"max_position_embeddings={limit}")
        if new and cache.blocks_for(len(p) + new) > cache.n_blocks:
            raise ValueError(
                f"{field}: {len(p)} tokens + max_new_tokens={new} can never fit the latent cache "
                f"({cache.capacity_tokens} tokens: cache.max_tokens / cache.memory_fraction)")
