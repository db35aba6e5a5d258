"""Choosing the next token from the logits (repeat penalty, top-k, top-p, temperature), and when an
answer ends (``GenerationOptions``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 0.2  # LLaVA's CLI default; 0 is greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repeat_penalty: float = 1.0  # 1: off (llama.cpp's definition)
    repeat_last_n: int = 64
    seed: int | None = None


@dataclass(frozen=True)
class GenerationOptions:
    max_tokens: int = 512
    stop: tuple[str, ...] = ()
    sampling: SamplingOptions = SamplingOptions()


@dataclass
class Sampler:
    options: SamplingOptions
    rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        seed = self.options.seed
        self.rng = np.random.default_rng(seed if seed is None or seed >= 0 else None)  # -1: random (llama.cpp's)

    def sample(self, logits: np.ndarray, history: list[int]) -> int:
        o = self.options
        if o.temperature <= 0 and o.repeat_penalty == 1.0:
            return int(np.argmax(logits))  # greedy: no copy
        logits = logits.astype(np.float64, copy=True)
        if o.repeat_penalty != 1.0 and history:
            recent = np.unique(np.asarray(history[-o.repeat_last_n :], dtype=np.int64))
            values = logits[recent]
            logits[recent] = np.where(values > 0, values / o.repeat_penalty, values * o.repeat_penalty)
        if o.temperature <= 0:
            return int(np.argmax(logits))
        if 0 < o.top_k < len(logits):
            kth = np.partition(logits, -o.top_k)[-o.top_k]
            logits[logits < kth] = -np.inf
        probs = np.exp((logits - logits.max()) / o.temperature)
        probs /= probs.sum()
        if o.top_p < 1.0:
            order = np.argsort(-probs)
            cumulative = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cumulative, o.top_p)) + 1]
            mask = np.zeros_like(probs, dtype=bool)
            mask[keep] = True
            probs = np.where(mask, probs, 0.0)
            probs /= probs.sum()
        return int(self.rng.choice(len(probs), p=probs))
