"""Next-token sampling on the gateway's device: greedy, or temperature with nucleus (top-p) filtering; OpenAI's and
vLLM's repetition penalties, OpenAI's logit_bias and a grammar's token mask; the model's log-probabilities of the
sampled and the top tokens.

Logits never leave the device; the caller copies only the sampled ids to the host. Seeded sampling uses a
per-request torch.Generator created on the same device (a CPU generator cannot drive CUDA sampling): a seed
reproduces its tokens on the same kind of device, but CPU and CUDA generators are different random streams,
so the same seed may sample different tokens on a CPU and a GPU gateway. Greedy is the same everywhere.

Degenerate settings are handled, never left to float32: a temperature below GREEDY_BELOW is greedy (vLLM's rule:
`logits / 1e-300` is inf), a repetition penalty below MIN_REPETITION is refused (1e-300 is 0 in float32, and a
logit divided by it inf), and a row whose distribution is still not finite (NaN / inf logits) samples no token:
`sample` returns -1 for it, so its request alone fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GREEDY_BELOW = 1e-5  # temperatures under this sample greedily (vLLM's _SAMPLING_EPS)
MAX_LOGIT_BIAS = 100.0  # OpenAI's logit_bias range: [-100, 100], added to the logits
MIN_REPETITION, MAX_REPETITION = 0.01, 10.0  # a seen token's logit is scaled by at most 100 (float32-safe)
NOT_SAMPLED = -1  # `sample`'s token for a row whose distribution is not finite


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
            if not is_number(value) or not -2.0 <= value <= 2.0:
                raise ValueError(f"{name}_penalty={value!r}: expected a number in [-2, 2]")
        if not is_number(self.repetition) or not MIN_REPETITION <= self.repetition <= MAX_REPETITION:
            raise ValueError(f"repetition_penalty={self.repetition!r}: expected a number in "
                             f"[{MIN_REPETITION:g}, {MAX_REPETITION:g}] (smaller ones overflow float32 logits)")

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


def apply_logit_bias(logits: torch.Tensor, ids: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """OpenAI's logit_bias, added to the logits before temperature: logits [V], token ids [K], bias [K] (each in
    [-MAX_LOGIT_BIAS, MAX_LOGIT_BIAS]) -> a new [V]. -100 makes a token as good as banned and +100 as good as forced
    at ordinary temperatures; a temperature far above 1 divides the bias too."""
    return logits.index_add(0, ids, bias.to(logits.dtype))


def mask_tokens(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """A grammar's mask: logits [V], allowed [V] bool -> a new [V] with every token not allowed at -inf (never
    sampled, greedy or not, whatever its bias)."""
    return logits.masked_fill(~allowed, float("-inf"))


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
    """logits: [B, V] float32 -> token ids [B] on logits' device: NOT_SAMPLED (-1) for a row whose distribution is
    not finite (no host sync: the caller finds it in the ids it copies anyway). temperature below GREEDY_BELOW
    (0 included) means greedy (argmax).

    generator: on logits' device (see the module docstring); ignored by greedy.
    """
    if not is_number(temperature) or not temperature >= 0 or math.isinf(temperature):
        raise ValueError(f"temperature={temperature}: expected a finite number >= 0")
    if not is_number(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}: expected 0 < top_p <= 1")
    if temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1).masked_fill(logits.isnan().any(dim=-1), NOT_SAMPLED)
    if generator is not None and generator.device.type != logits.device.type:
        raise ValueError(f"generator.device={generator.device}: expected a generator on the logits' device "
                         f"({logits.device}), e.g. torch.Generator(device={str(logits.device)!r})")
    probs = (logits / temperature).softmax(dim=-1)
    # NaN / inf logits (or an overflowing scale) give NaN probabilities: multinomial would raise (CPU) or assert
    # on the device (CUDA), so such a row draws from a stand-in distribution and its id is replaced below.
    bad = ~probs.isfinite().all(dim=-1, keepdim=True)  # [B, 1]
    probs = probs.masked_fill(bad, 1.0)
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already reach top_p (the first one always stays).
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).masked_fill(bad, NOT_SAMPLED).squeeze(-1)


def is_number(value: object) -> bool:
    """An int or a float that is not NaN (a bool is not a number here)."""
    if isinstance(value, float):
        return not math.isnan(value)
    return isinstance(value, int) and not isinstance(value, bool)
