"""Next-token sampling on the gateway's device: greedy, or temperature with nucleus (top-p) filtering; OpenAI's and
vLLM's repetition penalties; the model's log-probabilities of the sampled and the top tokens.

Logits never leave the device; the caller copies only the sampled ids to the host. Seeded sampling uses a
per-request torch.Generator created on the same device (a CPU generator cannot drive CUDA sampling): a seed
reproduces its tokens on the same kind of device, but CPU and CUDA generators are different random streams,
so the same seed may sample different tokens on a CPU and a GPU gateway. Greedy is the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Penalties:
    """presence / frequency (OpenAI: over the generated tokens) and repetition (vLLM, after CTRL: over prompt and
    generated tokens). The defaults change nothing."""

    presence: float = 0.0
    frequency: float = 0.0
    repetition: float = 1.0

    def __post_init__(self) -> None:
        for name in ("presence", "frequency"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name}_penalty={value}: expected a number in [-2, 2]")
        if not 0 < self.repetition <= 10:
            raise ValueError(f"repetition_penalty={self.repetition}: expected 0 < repetition_penalty <= 10")

    @property
    def active(self) -> bool:
        return self.presence != 0 or self.frequency != 0 or self.repetition != 1


def apply_penalties(logits: torch.Tensor, prompt: list[int], output: list[int], penalties: Penalties) -> torch.Tensor:
    """logits: [V] float32 -> penalised logits [V] (a new tensor).

    repetition p: a logit of a token seen in prompt or output is divided by p when positive, multiplied when not;
    then logit -= frequency · count_in_output + presence · (count_in_output > 0)."""
    vocab = logits.shape[-1]
    out = logits.clone()
    if penalties.repetition != 1:
        seen = torch.tensor(prompt + output, dtype=torch.long, device=logits.device).unique()
        picked = out[seen]
        out[seen] = torch.where(picked > 0, picked / penalties.repetition, picked * penalties.repetition)
    if output and (penalties.presence != 0 or penalties.frequency != 0):
        counts = torch.bincount(torch.tensor(output, dtype=torch.long, device=logits.device), minlength=vocab)
        out -= penalties.frequency * counts.to(out.dtype) + penalties.presence * (counts > 0).to(out.dtype)
    return out


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> tuple[list[float], list[list]]:
    """The model's log-probabilities (log-softmax of the raw logits, before penalties and temperature, as vLLM
    reports them) of `tokens` and the `top` most likely tokens of each row.

    logits: [B, V] float32; tokens: [B] -> ([B] logprobs, [B] lists of (token id, logprob), most likely first);
    one host copy for the whole batch."""
    logp = logits.float().log_softmax(dim=-1)
    chosen = logp.gather(1, tokens.view(-1, 1).to(logp.device)).squeeze(1)
    values, ids = logp.topk(top, dim=-1) if top else (logp[:, :0], logp[:, :0].long())
    chosen, values, ids = chosen.tolist(), values.tolist(), ids.tolist()
    return chosen, [list(zip(i, v, strict=True)) for i, v in zip(ids, values, strict=True)]


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits: [B, V] float32 -> token ids [B] on logits' device. temperature 0 means greedy (argmax).

    generator: on logits' device (see the module docstring); ignored by greedy.
    """
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: expected >= 0")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}: expected 0 < top_p <= 1")
    if temperature == 0:
        return logits.argmax(dim=-1)
    if generator is not None and generator.device.type != logits.device.type:
        raise ValueError(f"generator.device={generator.device}: expected a generator on the logits' device "
                         f"({logits.device}), e.g. torch.Generator(device={str(logits.device)!r})")
    probs = (logits / temperature).softmax(dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already reach top_p (the first one always stays).
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
