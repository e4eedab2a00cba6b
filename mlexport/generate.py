"""Token generation over any ArtifactRuntime: chunked prefill, then greedy or sampled decode, with timings."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from mlexport.errors import MlexportError


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    tokens: list[int] = field(default_factory=list)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tok_s(self) -> float:
        # The first generated token comes from the prefill logits; decode steps produce the rest.
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds else 0.0


def prefill(runtime, tokens: list[int], start: int = 0, chunk: int | None = None) -> np.ndarray:  # noqa: ANN001
    """Feed ``tokens`` in chunks the model accepts; return the last chunk's logits."""
    limit = chunk or max(1, getattr(runtime, "max_seq_len", runtime.max_context) - 1)
    logits = None
    for i in range(0, len(tokens), limit):
        logits = runtime.forward(tokens[i : i + limit], start + i)
    if logits is None:
        raise MlexportError("the prompt is empty; pass some text with --prompt")
    return logits


def pick(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    return int(rng.choice(len(p), p=p / p.sum()))


def generate(
    runtime,  # noqa: ANN001  (ArtifactRuntime)
    prompt_ids: list[int],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    seed: int = 0,
    on_token: Callable[[int], None] | None = None,
) -> GenerationStats:
    stats = GenerationStats(prompt_tokens=len(prompt_ids))
    budget = runtime.max_context - len(prompt_ids)
    if budget <= 0:
        raise MlexportError(
            f"the prompt has {len(prompt_ids)} tokens; the artifact's context is {runtime.max_context}. "
            "Shorten it or re-export with a larger --max-context"
        )
    rng = np.random.default_rng(seed)
    eos = set(runtime.eos_ids)
    t0 = time.perf_counter()
    logits = prefill(runtime, prompt_ids)
    stats.prefill_seconds = time.perf_counter() - t0
    token = pick(logits[-1], temperature, rng)
    pos = len(prompt_ids)
    t1 = time.perf_counter()
    for _ in range(min(max_new_tokens, budget)):
        if token in eos:
            break
        stats.tokens.append(token)
        if on_token:
            on_token(token)
        if len(stats.tokens) >= max_new_tokens or pos >= runtime.max_context:
            break
        logits = runtime.forward([token], pos)
        pos += 1
        token = pick(logits[-1], temperature, rng)
    stats.decode_seconds = time.perf_counter() - t1
    stats.generated_tokens = len(stats.tokens)
    return stats
