"""Benchmark: what structured outputs cost a batched decode step, and llguidance's token-mask time per token.

1. Step time of 32 decoding sequences, all free, against the same 32 with a JSON schema on half of them (an array
   of typed objects with minItems, so no constrained sequence finishes while timed), rounds alternating in the same
   run. Inside each step the forward (`ModelRunner.run`), the sampler (`ModelRunner.sample`, where the grammar
   works) and the bitmask fill of the constrained rows (on the host) are timed too: on a shared machine the
   forward's time swings with other load, the sampler's difference is what the grammar adds.
2. Per-token mask time of one matcher (mean, p50, p99) as constrained decoding walks the schema: with the model's
   own vocabulary, and with a byte-level BPE of ~110k tokens trained here on the Python standard library's
   sources (a real model's vocabulary size: the mask walks the whole token trie), tokens drawn at random from
   each step's allowed set.

    python benchmarks/structured.py [--model models/small-v3] [--steps 24] [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import llguidance  # noqa: E402
import torch  # noqa: E402

import gateway.serving.model_runner as model_runner  # noqa: E402
from benchmarks.machine_info import machine  # noqa: E402
from gateway.serving.constraints import JSON_DEFAULTS, StructuredOutput  # noqa: E402

MEMBER = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "role": {"enum": ["router", "expert", "gateway"]},
                         "active": {"type": "boolean"},
                         "score": {"type": "number", "minimum": 0, "maximum": 1}},
          "required": ["name", "age", "role", "active", "score"], "additionalProperties": False}
SCHEMA = {"type": "object", "properties": {"members": {"type": "array", "items": MEMBER, "minItems": 64}},
          "required": ["members"], "additionalProperties": False}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Timed:
    """Times every call of `owner.name` (a module function or an object's method) while in the block: ms each."""

    def __init__(self, owner, name: str) -> None:
        self.owner, self.name, self.ms = owner, name, []
        self.real = getattr(owner, name)

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.real(*args, **kwargs)
        finally:
            self.ms.append((time.perf_counter() - t0) * 1e3)

    def __enter__(self) -> Timed:
        setattr(self.owner, self.name, self)
        return self

    def __exit__(self, *exc) -> None:
        setattr(self.owner, self.name, self.real)


@torch.inference_mode()
def step_times(engine, batch: int, constrained: int, prompt: int, steps: int, seed: int) -> dict:
    """Submit `batch` sequences (the first `constrained` with SCHEMA), prefill, then time `steps` decode steps."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, engine.spec.vocab_size, (prompt,), generator=gen).tolist() for _ in range(batch)]
    schema = StructuredOutput.json_schema(SCHEMA, "benchmark")
    requests = [engine.submit(p, max_new_tokens=steps + 64, stop_at_eos=False, temperature=1.0, seed=seed + i,
                              structured=schema if i < constrained else None) for i, p in enumerate(prompts)]
    while not all(r.output for r in requests):
        engine.step()
    engine.step()  # one warm decode step
    times = []
    with (Timed(model_runner, "fill_bitmask") as fill, Timed(engine.runner, "run") as forward,
          Timed(engine.runner, "sample") as sampling):
        for _ in range(steps):
            before = [len(r.output) for r in requests]
            t0 = time.perf_counter()
            engine.step()
            times.append((time.perf_counter() - t0) * 1e3)
            assert all(len(r.output) == b + 1 for r, b in zip(requests, before, strict=True)), "a sequence stalled"
    for r in requests:
        engine.cancel(r.request_id)
    engine.step()  # retires them
    assert all(r.error is None for r in requests), [r.error for r in requests if r.error]
    return {"step_ms": times, "forward_ms": forward.ms, "sample_ms": sampling.ms, "fill_ms": fill.ms,
            "texts": [engine_text(r.output) for r in requests[:constrained][:2]]}


def engine_text(tokens: list[int]) -> str:
    return bytes(t - 3 for t in tokens if 3 <= t < 259).decode("utf-8", "replace")


def mask_walk(tokenizer: llguidance.LLTokenizer, tokens: int, seed: int) -> dict:
    """Constrained decoding of SCHEMA with random allowed tokens: per-token compute_bitmask time (µs) over
    `tokens` tokens (restarting when the grammar completes), and the compile time of the schema (ms)."""
    rng = random.Random(seed)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), defaults=JSON_DEFAULTS)
    t0 = time.perf_counter()
    template = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
    compile_ms = (time.perf_counter() - t0) * 1e3
    matcher, times = template.deep_copy(), []
    quote = tokenizer.tokenize_str('"')[0]
    while len(times) < tokens:
        t0 = time.perf_counter()
        mask = matcher.compute_bitmask()
        times.append((time.perf_counter() - t0) * 1e6)
        bits = torch.frombuffer(bytearray(mask), dtype=torch.uint8)  # token t: bit t % 8 of byte t // 8
        allowed = ((bits[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).flatten().nonzero().flatten().tolist()
        if not allowed or matcher.is_stopped():
            matcher = template.deep_copy()
            continue
        # A random model's choice, with strings ended now and then (as the schema's maxLength would anyway).
        token = quote if quote in allowed and rng.random() < 0.2 else rng.choice(allowed)
        assert matcher.consume_token(token), matcher.get_error()
    return {"vocab": tokenizer.vocab_size, "compile_ms": compile_ms, "tokens": len(times),
            "mean_us": statistics.fmean(times), "p50_us": percentile(times, 0.5), "p99_us": percentile(times, 0.99)}


def python_stdlib_bpe(vocab_size: int) -> llguidance.LLTokenizer:
    """A byte-level BPE trained with `tokenizers` on the standard library's .py files (present wherever Python
    is), as llguidance reads a tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    lib = Path(os.__file__).parent
    files = sorted(p for p in [*lib.glob("*.py"), *lib.glob("*/*.py")] if "site-packages" not in p.parts)

    def texts():
        for f in files:
            try:
                yield f.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|bos|>", "<|eos|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return llguidance.LLTokenizer(tok.to_str(), eos_token=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "small-v3")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens per sequence")
    parser.add_argument("--steps", type=int, default=24, help="timed decode steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each setting, alternating")
    parser.add_argument("--walk-tokens", type=int, default=2000, help="tokens of each mask-time walk")
    parser.add_argument("--bpe-vocab", type=int, default=131072, help="target size of the trained BPE (0: skip)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "structured.json")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.steps, args.rounds, args.walk_tokens, args.bpe_vocab = 8, 4, 1, 200, 0
    if not (args.model / "config.json").exists():
        from model_core.make_model import make_model

        make_model(args.model.name, args.model)
    from gateway import Engine

    settings = {"dtype": args.dtype, "scheduler.max_running": args.batch,
                "cache.max_tokens": args.batch * (args.prompt + args.steps + 128)}
    engine = Engine.from_pretrained(args.model, backend="local", **settings)
    half = args.batch // 2
    runs: dict[str, list[dict]] = {"free": [], "half": []}
    try:
        for r in range(args.rounds):
            for name, constrained in (("free", 0), ("half", half)):
                runs[name].append(step_times(engine, args.batch, constrained, args.prompt, args.steps, seed=10 + r))
        own = mask_walk(engine.runner.grammars.tokenizer("benchmark"), args.walk_tokens, seed=1)
    finally:
        engine.close()
    walks = [("model's vocabulary", own)]
    if args.bpe_vocab:
        walks.append(("BPE on the Python stdlib", mask_walk(python_stdlib_bpe(args.bpe_vocab), args.walk_tokens, 2)))

    def pooled(name: str, key: str) -> list[float]:
        return [t for run in runs[name] for t in run[key]]

    fills = pooled("half", "fill_ms")
    rows = []
    for name in runs:
        step, forward, sampling = pooled(name, "step_ms"), pooled(name, "forward_ms"), pooled(name, "sample_ms")
        rows.append({"setting": name, "sequences": args.batch, "constrained": 0 if name == "free" else half,
                     "steps": len(step), "step_p50_ms": statistics.median(step), "step_min_ms": min(step),
                     "step_mean_ms": statistics.fmean(step), "step_p99_ms": percentile(step, 0.99),
                     "forward_p50_ms": statistics.median(forward), "sample_p50_ms": statistics.median(sampling),
                     "sample_mean_ms": statistics.fmean(sampling)})
    free, both = rows
    print(f"\nDecode steps of {args.batch} sequences, {args.model.name} {args.dtype}, in process ({args.rounds} rounds "
          f"x {args.steps} steps, alternating)")
    print(f"{'setting':<26} {'step p50':>9} {'step min':>9} {'step p99':>9} {'forward p50':>12} {'sample p50':>11}")
    for row in rows:
        label = "all free" if row["constrained"] == 0 else f"{row['constrained']} with a JSON schema"
        print(f"{label:<26} {row['step_p50_ms']:>9.2f} {row['step_min_ms']:>9.2f} {row['step_p99_ms']:>9.2f} "
              f"{row['forward_p50_ms']:>12.2f} {row['sample_p50_ms']:>11.3f}")
    overhead = {"step_p50": both["step_p50_ms"] / free["step_p50_ms"] - 1,
                "step_min": both["step_min_ms"] / free["step_min_ms"] - 1,
                "sample_p50_ms": both["sample_p50_ms"] - free["sample_p50_ms"]}
    print(f"with the schema on half: step p50 {overhead['step_p50']:+.1%}, step min {overhead['step_min']:+.1%}; "
          f"sampling {overhead['sample_p50_ms']:+.3f} ms per step, of which the bitmask fill of the {half} rows "
          f"{statistics.median(fills):.3f} ms (p50; mean {statistics.fmean(fills):.3f})")
    print(f"\nllguidance mask time per token, one matcher walking the schema ({args.walk_tokens} tokens)")
    print(f"{'vocabulary':<28} {'tokens':>8} {'compile ms':>11} {'mean µs':>9} {'p50 µs':>8} {'p99 µs':>8}")
    for label, w in walks:
        print(f"{label:<28} {w['vocab']:>8} {w['compile_ms']:>11.2f} {w['mean_us']:>9.1f} {w['p50_us']:>8.1f} "
              f"{w['p99_us']:>8.1f}")
    out = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
           "model": args.model.name, "dtype": args.dtype, "schema": SCHEMA, "steps": rows, "overhead": overhead,
           "fill_ms": {"p50": statistics.median(fills), "mean": statistics.fmean(fills), "rows": half},
           "mask_walks": [{"vocabulary": label, **w} for label, w in walks],
           "sample_texts": runs["half"][0]["texts"]}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1, ensure_ascii=False))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
