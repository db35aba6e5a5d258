"""Several prompts answered together (``batch --parallel N``): each prompt is prefilled as its own sequence
of one llama.cpp context, then the answers are decoded together, one token of every unfinished answer
per ``llama_decode``. Decoding is memory-bound on a CPU and batch-friendly on a GPU, so N answers cost
less than N times one; prefill stays one sequence at a time. Each answer is sampled, stopped and
detokenized exactly as ``LlavaModel.stream_text`` does for one.
"""

from __future__ import annotations

import codecs
import ctypes
import time
from dataclasses import dataclass, field

import llama_cpp
import numpy as np
from llama_cpp import _internals

from llava_gguf.errors import ContextOverflowError, ModelLoadError
from llava_gguf.llm.sampling import Sampler
from llava_gguf.llm.sequence import ImageSlot, Item, sequence_length
from llava_gguf.model import GenerationOptions, LlavaModel


@dataclass
class Answer:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    prefill_s: float = 0.0
    decode_s: float = 0.0  # this answer's share of the decoding steps it took part in


class ParallelDecoder:
    """Up to ``n`` sequences in one context of ``model``'s LLM (its own context, beside the model's)."""

    def __init__(self, model: LlavaModel, n: int) -> None:
        self.model, self.n = model, n
        self.runtime = model.runtime
        self._ctx: _internals.LlamaContext | None = None
        self._size = 0
        n_batch = self.runtime.options.n_batch
        self._tokens = llama_cpp.llama_batch_init(n_batch, 0, n)
        self._embd = llama_cpp.llama_batch_init(n_batch, self.runtime.n_embd, 1)

    def close(self) -> None:
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None
        llama_cpp.llama_batch_free(self._tokens)
        llama_cpp.llama_batch_free(self._embd)

    def _context(self, per_sequence: int) -> _internals.LlamaContext:
        size = self.n * per_sequence
        if self._ctx is None or self._size < size:
            if per_sequence > self.runtime.n_ctx_train:
                raise ContextOverflowError(f"a prompt and its answer need {per_sequence} tokens but the model's "
                                           f"context is {self.runtime.n_ctx_train}")
            if self._ctx is not None:
                self._ctx.close()
            try:
                self._ctx = _internals.LlamaContext(model=self.runtime.model,
                                                    params=self.runtime.context_params(size, self.n), verbose=False)
            except (ValueError, RuntimeError) as e:
                raise ModelLoadError(f"llama.cpp could not create a {size}-token context for {self.n} sequences "
                                     f"({e}); use a smaller --parallel") from e
            self._size = size
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx.ctx), True)
        return self._ctx

    def answer(self, prompts: list[tuple[list[Item], dict[str, np.ndarray]]],
               options: GenerationOptions) -> list[Answer]:
        """``prompts``: (items, packed features by image key) each, at most ``n`` -> their answers."""
        if not 0 < len(prompts) <= self.n:
            raise ValueError(f"between 1 and {self.n} prompts, got {len(prompts)}")
        ctx = self._context(max(sequence_length(items) for items, _ in prompts) + options.max_tokens)
        answers = [Answer() for _ in prompts]
        samplers = [Sampler(options.sampling) for _ in prompts]
        histories = [[i for i in items if isinstance(i, int)] for items, _ in prompts]
        positions = [0] * len(prompts)
        logits: list[np.ndarray] = []
        for s, (items, features) in enumerate(prompts):
            start = time.perf_counter()
            logits.append(self._prefill(ctx, s, items, features, positions))
            answers[s].prefill_s = time.perf_counter() - start
        decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in prompts]  # bytes split across tokens
        active = list(range(len(prompts)))
        while active:
            step = time.perf_counter()
            next_tokens: list[tuple[int, int]] = []
            for s in active:
                answer = answers[s]
                token = samplers[s].sample(logits[s], histories[s])
                if self.model.is_end_of_generation(token):
                    answer.text += decoders[s].decode(b"", final=True)
                    continue
                answer.tokens.append(token)
                histories[s].append(token)
                answer.text += decoders[s].decode(self.runtime.token_bytes(token))
                cut = min((i for i in (answer.text.find(stop) for stop in options.stop) if i >= 0), default=-1)
                if cut >= 0:  # cut before the stop string, as stream_text does
                    answer.text = answer.text[:cut]
                elif len(answer.tokens) >= options.max_tokens:
                    answer.text += decoders[s].decode(b"", final=True)
                else:
                    next_tokens.append((s, token))
            if next_tokens:
                for s, row in self._decode_step(ctx, next_tokens, positions).items():
                    logits[s] = row
            elapsed = time.perf_counter() - step
            for s in active:
                answers[s].decode_s += elapsed / len(active)
            active = [s for s, _ in next_tokens]
        return answers

    # -- llama.cpp ------------------------------------------------------------------------------

    def _prefill(self, ctx: _internals.LlamaContext, seq: int, items: list[Item], features: dict[str, np.ndarray],
                 positions: list[int]) -> np.ndarray:
        """Decode one prompt as sequence ``seq``; the logits after its last position."""
        runs: list[list[int] | np.ndarray] = []
        for item in items:
            if isinstance(item, ImageSlot):
                runs.append(features[item.key])
            elif runs and isinstance(runs[-1], list):
                runs[-1].append(item)
            else:
                runs.append([item])
        n_batch = self.runtime.options.n_batch
        for r, run in enumerate(runs):
            last_run = r == len(runs) - 1
            for start in range(0, len(run), n_batch):
                chunk = run[start : start + n_batch]
                embd = isinstance(run, np.ndarray)
                batch = self._embd if embd else self._tokens
                if embd:
                    rows = np.ascontiguousarray(chunk, dtype=np.float32)  # [<= n_batch, n_embd]
                    ctypes.memmove(batch.embd, rows.ctypes.data, rows.nbytes)
                for i in range(len(chunk)):
                    if not embd:
                        batch.token[i] = chunk[i]
                    last = last_run and start + i == len(run) - 1
                    self._set(batch, i, positions[seq] + i, seq, last)
                batch.n_tokens = len(chunk)
                self._decode(ctx, batch)
                positions[seq] += len(chunk)
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx.ctx, -1), shape=(self.runtime.n_vocab,)).copy()

    def _decode_step(self, ctx: _internals.LlamaContext, next_tokens: list[tuple[int, int]],
                     positions: list[int]) -> dict[int, np.ndarray]:
        """One token for each of several sequences, in one batch -> their new logits."""
        batch = self._tokens
        for i, (s, token) in enumerate(next_tokens):
            batch.token[i] = token
            self._set(batch, i, positions[s], s, True)
            positions[s] += 1
        batch.n_tokens = len(next_tokens)
        self._decode(ctx, batch)
        return {s: np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx.ctx, i), shape=(self.runtime.n_vocab,)).copy()
                for i, (s, _) in enumerate(next_tokens)}

    @staticmethod
    def _set(batch: llama_cpp.llama_batch, i: int, pos: int, seq: int, logits: bool) -> None:
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = logits

    @staticmethod
    def _decode(ctx: _internals.LlamaContext, batch: llama_cpp.llama_batch) -> None:
        status = llama_cpp.llama_decode(ctx.ctx, batch)
        if status != 0:
            raise ContextOverflowError(f"llama.cpp could not decode the batch (status {status})")
