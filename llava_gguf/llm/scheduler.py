"""Continuous batching: many answers generated together over one llama.cpp context of ``n_seq`` sequences.

A thread of its own runs steps. Each step
  - admits waiting requests into free sequences (a request's reservation, its prompt and ``max_tokens``,
    must fit a sequence's stream, or in a unified pool beside the others', where sequences idle with a
    kept prefix give theirs back, least recently used first, when a newcomer needs the room),
  - drops requests whose ``cancel`` is set (a client that went away): their sequence is free this step,
  - prepares the next newcomer once the last one is prefilled (its images' features, on this thread, so
    the vision encoder never competes with the LLM for the cores; first come, first answered),
  - decodes one token of every answering sequence in one ``llama_decode``, then a chunk of one
    newcomer's prompt (text tokens or image rows) in a call of its own, so its batches are a lone
    prefill's, cut smaller. Chunks are ``prefill_chunk`` positions while others answer, so their streams
    keep flowing during a prefill, and ``n_batch`` when no one waits for a token.

Reuse: a request goes to the free sequence whose KV loses least to it (one holding the conversation's
earlier turns: only the new turn is decoded), else an empty one, else the least recently used; a longer
prefix another sequence holds (the template's opening, the same image) is taken from it instead of decoded,
and (in a unified pool) a longer prefix saved on disk (``PromptCache``) is restored. Each answer is
sampled, stopped and detokenized as a lone generation (``LlavaModel.generate``) does it, so at temperature
0 on F32 weights and an F32 KV cache every answer equals its answer alone (tested). On quantized weights a
stream per sequence (the CPU default, ``shared_context``) keeps the attention's order a lone run's, and
answers equal their lone answers but where two tokens nearly tie (measured in the README); a unified pool
(the default: it decodes several answers faster) parts from them more often.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from llava_gguf.errors import ContextOverflowError, LlavaGGUFError
from llava_gguf.llm.llama import LlamaRuntime
from llava_gguf.llm.prompt_cache import PromptCache
from llava_gguf.llm.sampling import GenerationOptions, Sampler
from llava_gguf.llm.sequence import ImageSlot, Item, common_prefix, sequence_length
from llava_gguf.llm.shared_context import SharedContext, TokenEntry
from llava_gguf.llm.sizing import default_pool_size
from llava_gguf.llm.text_stream import TextStream

log = logging.getLogger(__name__)

# the packed features of the given images, by key (called on the scheduler's thread, one request at a time)
FeatureSource = Callable[[list[ImageSlot]], dict[str, np.ndarray]]

DEFAULT_PREFILL_CHUNK = 128  # prompt positions per step while other sequences answer


@dataclass
class Request:
    items: list[Item]
    options: GenerationOptions
    features: FeatureSource
    on_piece: Callable[[str], None] | None = None  # each piece of text as it is safe to hand out
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class Outcome:
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "stop"  # "stop" (end of generation or a stop string), "length", "cancelled"
    n_prompt_tokens: int = 0
    n_reused: int = 0  # prompt positions the sequence already held (an earlier turn of the conversation)
    n_restored: int = 0  # prompt positions restored from the prompt cache on disk
    vision_s: float = 0.0
    wait_s: float = 0.0  # submitted to admitted
    prefill_s: float = 0.0  # admitted to the first token (encoding included)
    decode_s: float = 0.0  # first token to the last
    first_token_s: float = 0.0  # submitted to the first token

    @property
    def n_generated(self) -> int:
        return len(self.tokens)

    @property
    def n_cached(self) -> int:
        return self.n_reused + self.n_restored


class Ticket:
    """A submitted request: ``wait()`` for its outcome; ``cancel()`` frees its sequence at the next step."""

    def __init__(self, request: Request, on_done: Callable[[Ticket], None] | None) -> None:
        self.request = request
        self.outcome = Outcome(n_prompt_tokens=sequence_length(request.items))
        self.error: LlavaGGUFError | None = None
        self.submitted = time.perf_counter()
        self._done = threading.Event()
        self._on_done = on_done

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        self.request.cancel.set()

    def wait(self, timeout: float | None = None) -> Outcome:
        if not self._done.wait(timeout):
            raise TimeoutError("the request is still running")
        if self.error is not None:
            raise self.error
        return self.outcome

    def _finish(self, error: LlavaGGUFError | None = None) -> None:
        self.error = error
        self._done.set()
        if self._on_done is not None:
            self._on_done(self)


@dataclass
class SchedulerStats:
    """Counters since start and the state now (for /metrics)."""

    n_seq: int
    pool_positions: int
    waiting: int = 0
    active: int = 0
    peak_active: int = 0  # the most sequences answering at once
    finished: int = 0
    failed: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0  # positions of the prompts answered
    prompt_tokens_decoded: int = 0  # ... of them decoded (the rest reused or restored)
    generated_tokens: int = 0
    prefill_s: float = 0.0  # time of the steps that decoded prompt positions
    decode_s: float = 0.0  # time of the steps that decoded answers' tokens
    images_prepared_s: float = 0.0


@dataclass
class _Slot:
    """One sequence of the context: what its KV holds (``cached``, in ``n_pos`` positions) and who uses it."""

    seq: int
    cached: list[Item] = field(default_factory=list)
    n_pos: int = 0
    last_used: float = 0.0
    busy: bool = False


class _Running:
    """An admitted request on its sequence."""

    def __init__(self, ticket: Ticket, slot: _Slot, keep: int, reserve: int) -> None:
        self.ticket, self.slot, self.keep, self.reserve = ticket, slot, keep, reserve
        request = ticket.request
        self.items = request.items
        self.options = request.options
        self.prepared = False
        self.features: dict[str, np.ndarray] = {}
        self.next_item = keep  # the next item of the prompt to decode
        self.offset = 0  # positions of that item (an image's rows, or a run of tokens) already decoded
        self.pos = slot.n_pos  # the sequence's next position
        self.save_at = 0  # items to save on disk once decoded (0: none)
        self.next_token: int | None = None  # sampled, to decode at the next step
        self.sampler = Sampler(request.options.sampling)
        self.history = [i for i in request.items if isinstance(i, int)]
        self.stream: TextStream | None = None
        self.admitted = time.perf_counter()
        self.first_token_at = 0.0

    @property
    def prefilling(self) -> bool:
        return self.next_item < len(self.items)


class Scheduler:
    """Requests answered together over ``n_seq`` sequences of one context of ``runtime``'s model.

    ``size``: positions in the pool the sequences share (default ``default_pool_size``). ``is_end``: whether a
    token ends an answer. ``prompt_cache``: prefix states on disk, restored and saved as a lone run does."""

    def __init__(self, runtime: LlamaRuntime, n_seq: int, *, is_end: Callable[[int], bool], size: int | None = None,
                 unified: bool | None = None, prompt_cache: PromptCache | None = None,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> None:
        if n_seq < 1:
            raise ValueError("n_seq must be at least 1")
        self.runtime, self.n_seq, self.is_end = runtime, n_seq, is_end
        self.prompt_cache = prompt_cache
        self.prefill_chunk = max(1, min(prefill_chunk, runtime.options.n_batch))
        if unified is None:
            unified = True  # decodes several answers faster than streams (measured); the prompt cache works with it
        self.ctx = SharedContext(runtime, n_seq, size or default_pool_size(runtime, n_seq, unified), unified)
        self.max_request = min(self.ctx.per_sequence, runtime.n_ctx_train)
        self.stats = SchedulerStats(n_seq=n_seq, pool_positions=self.ctx.size)
        self._slots = [_Slot(s) for s in range(n_seq)]
        self._waiting: deque[Ticket] = deque()
        self._running: list[_Running] = []  # in order of admission
        self._cond = threading.Condition()
        self._closed = False  # the thread stops at its next step
        self._closing = False  # close() was called (once)
        self._thread = threading.Thread(target=self._loop, name="llava-gguf-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public

    def submit(self, request: Request, on_done: Callable[[Ticket], None] | None = None) -> Ticket:
        """Queue ``request``; ``on_done(ticket)`` is called when it ends (on the scheduler's thread, or on the
        thread that closes the scheduler)."""
        ticket = Ticket(request, on_done)
        need = ticket.outcome.n_prompt_tokens + request.options.max_tokens
        if need > self.max_request:
            raise ContextOverflowError(
                f"the prompt and answer need {need} tokens but a sequence's context holds at most {self.max_request}; "
                "use fewer or smaller images, a shorter conversation or fewer max tokens")
        with self._cond:
            if self._closed:
                raise LlavaGGUFError("the scheduler is closed")
            self._waiting.append(ticket)
            self.stats.waiting = len(self._waiting)
            self._cond.notify()
        return ticket

    def close(self) -> None:
        """Stop the thread (the requests not answered get an error) and free the context; once is enough."""
        with self._cond:
            if self._closing:
                return
            self._closing = self._closed = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()
        with self._cond:
            left = [*self._waiting, *(r.ticket for r in self._running)]
            self._waiting.clear()
            self._running.clear()
        for ticket in left:
            ticket._finish(LlavaGGUFError("the scheduler was closed before the answer"))
        if threading.current_thread() is not self._thread:
            self.ctx.close()

    def cached_prefixes(self) -> list[list[Item]]:
        """What each sequence's KV holds (for tests and diagnostics)."""
        with self._cond:
            return [list(slot.cached) for slot in self._slots]

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while True:
            try:
                with self._cond:
                    while not self._closed and not self._waiting and not self._running:
                        self._cond.wait()
                    if self._closed:
                        return
                    self._admit()
                self._step()
            except Exception as e:  # noqa: BLE001  a bug must not stop the others' answers forever
                log.exception("scheduler step failed")
                for running in list(self._running):
                    self._end(running, error=LlavaGGUFError(f"unexpected {type(e).__name__}: {e}"), lost=True)
                with self._cond:
                    failed, self._waiting = list(self._waiting), deque()
                    self.stats.waiting = 0
                for slot in self._slots:  # none is busy without a running request
                    slot.busy = False
                self.stats.failed += len(failed)
                for ticket in failed:
                    ticket._finish(LlavaGGUFError(f"unexpected {type(e).__name__}: {e}"))

    def _admit(self) -> None:
        """Waiting requests, first come first served, into free sequences while their reservations fit; cancelled
        ones leave the queue wherever they are."""
        for ticket in [t for t in self._waiting if t.request.cancel.is_set()]:
            self._waiting.remove(ticket)
            ticket.outcome.finish_reason = "cancelled"
            self.stats.cancelled += 1
            ticket._finish()
        while self._waiting:
            ticket = self._waiting[0]
            free = [slot for slot in self._slots if not slot.busy]
            if not free:
                break
            items = ticket.request.items
            reserve = ticket.outcome.n_prompt_tokens + ticket.request.options.max_tokens
            slot = self._choose(free, items)
            if not self._make_room(reserve, slot):
                break  # the running answers need the pool: wait for one to end
            self._waiting.popleft()
            try:
                # the last position's logits are needed: it is decoded again when the sequence holds it all
                keep = min(self._shared_prefix(slot, items), len(items) - 1)
                running = _Running(ticket, slot, keep, reserve)
            except Exception as e:  # noqa: BLE001  this request fails, the others go on
                log.exception("admitting a request failed")
                self._empty(slot)
                self.stats.failed += 1
                ticket._finish(LlavaGGUFError(f"could not start the answer: {type(e).__name__}: {e}"))
                continue
            slot.busy = True
            slot.cached, slot.n_pos = list(items[:keep]), sequence_length(items[:keep])
            self.ctx.forget(slot.seq, slot.n_pos)  # the pool gets back what the request does not reuse
            ticket.outcome.wait_s = running.admitted - ticket.submitted
            self._running.append(running)
        self.stats.waiting = len(self._waiting)
        self.stats.active = len(self._running)
        self.stats.peak_active = max(self.stats.peak_active, self.stats.active)

    @staticmethod
    def _choose(free: list[_Slot], items: list[Item]) -> _Slot:
        """The free sequence whose KV loses least to ``items`` (what it holds beyond their common prefix): one
        that holds a prefix of them (the conversation's earlier turns), else an empty one; among equals the
        longest prefix, then the least recently used."""
        shared = {slot.seq: sequence_length(items[: common_prefix(slot.cached, items)]) for slot in free}
        return min(free, key=lambda s: (s.n_pos - shared[s.seq], -shared[s.seq], s.last_used))

    def _shared_prefix(self, slot: _Slot, items: list[Item]) -> int:
        """Items of ``items`` ``slot`` holds after taking a longer prefix from another sequence (their KV cells
        are shared, not copied): a system prompt, or an image another request asks about too."""
        keep = common_prefix(slot.cached, items)
        donor = max((s for s in self._slots if s is not slot), key=lambda s: common_prefix(s.cached, items),
                    default=None)
        taken = min(common_prefix(donor.cached, items), len(items) - 1) if donor is not None else 0
        if donor is not None and taken > keep:
            self.ctx.forget(slot.seq)
            self.ctx.share(donor.seq, slot.seq, sequence_length(items[:taken]))
            keep = taken
        return keep

    def _make_room(self, reserve: int, chosen: _Slot) -> bool:
        """Whether ``reserve`` positions fit beside the running reservations, after idle sequences other than
        ``chosen`` gave theirs back (least recently used first) if needed. Streams: each sequence has its own
        room, and ``submit`` checked that the request fits one."""
        if not self.ctx.unified:
            return True

        def used() -> int:
            return sum(r.reserve for r in self._running) + sum(s.n_pos for s in self._slots
                                                                if not s.busy and s is not chosen)
        if sum(r.reserve for r in self._running) + reserve > self.ctx.size:
            return False
        for slot in sorted((s for s in self._slots if not s.busy and s is not chosen and s.n_pos),
                           key=lambda s: s.last_used):
            if used() + reserve <= self.ctx.size:
                break
            self._empty(slot)
        return True

    def _empty(self, slot: _Slot) -> None:
        self.ctx.forget(slot.seq)
        slot.cached, slot.n_pos = [], 0

    # ------------------------------------------------------------------ one step

    def _step(self) -> None:
        for running in list(self._running):
            if running.ticket.request.cancel.is_set():
                self._end(running, reason="cancelled")
        prefiller = next((r for r in self._running if r.prepared and r.prefilling), None)
        if prefiller is None:  # first come, first answered: the next newcomer's images once the last is prefilled
            newcomer = next((r for r in self._running if not r.prepared), None)
            if newcomer is not None:
                self._prepare(newcomer)
                prefiller = newcomer if newcomer.prepared and newcomer.prefilling else None
        answering = [r for r in self._running if r.next_token is not None]
        if answering:
            self._decode_answers(answering)
        if prefiller is not None and prefiller in self._running:
            self._prefill_chunk(prefiller, self.prefill_chunk if answering else self.runtime.options.n_batch)

    def _decode_answers(self, answering: list[_Running]) -> None:
        """One token of every answering sequence, in one ``llama_decode``; then each samples its next."""
        entries = [TokenEntry(r.slot.seq, r.pos, r.next_token, True) for r in answering]  # type: ignore[arg-type]
        start = time.perf_counter()
        try:
            logits = self.ctx.decode_tokens(entries)
        except LlavaGGUFError as e:
            for running in answering:
                self._end(running, error=e, lost=True)
            return
        self.stats.decode_s += time.perf_counter() - start
        for i, running in enumerate(answering):
            token = running.next_token
            assert token is not None
            running.next_token = None
            running.pos += 1
            running.slot.cached.append(token)
            running.slot.n_pos = running.pos
            try:
                self._take(running, logits[i])
            except Exception as e:  # noqa: BLE001  this answer fails, the others go on
                log.exception("sampling an answer failed")
                self._end(running, error=LlavaGGUFError(f"unexpected {type(e).__name__}: {e}"))

    def _prefill_chunk(self, running: _Running, budget: int) -> None:
        """Up to ``budget`` more positions of a newcomer's prompt (text tokens or an image's rows: one sequence
        per ``llama_decode``, so its batches are those of a lone prefill, cut smaller)."""
        item = running.items[running.next_item]
        start = time.perf_counter()
        try:
            if isinstance(item, ImageSlot):
                rows = running.features[item.key][running.offset : running.offset + budget]  # [<= budget, n_embd]
                n = len(rows)
                last = running.offset + n == item.n_tokens and running.next_item + 1 == len(running.items)
                logits = self.ctx.decode_embeddings(running.slot.seq, running.pos, rows, last)
            else:
                run = self._token_run(running)[:budget]
                n = len(run)
                last = running.next_item + n == len(running.items)
                entries = [TokenEntry(running.slot.seq, running.pos + i, t, last and i == n - 1)
                           for i, t in enumerate(run)]
                logits = self.ctx.decode_tokens(entries).get(n - 1)
        except LlavaGGUFError as e:
            self._end(running, error=e, lost=True)
            return
        self.stats.prefill_s += time.perf_counter() - start
        self.stats.prompt_tokens_decoded += n
        try:
            self._advance(running, n, logits)
        except Exception as e:  # noqa: BLE001  this answer fails, the others go on
            log.exception("starting an answer failed")
            self._end(running, error=LlavaGGUFError(f"unexpected {type(e).__name__}: {e}"), lost=True)

    def _token_run(self, running: _Running) -> list[int]:
        """The prompt's text tokens from the next item up to the next image."""
        out: list[int] = []
        for item in running.items[running.next_item :]:
            if isinstance(item, ImageSlot):
                break
            out.append(item)
        return out

    def _prepare(self, running: _Running) -> None:
        """Restore a longer prefix from disk, forget what the sequence holds past the kept prefix, and get the
        features of the images still to decode."""
        slot, items = running.slot, running.items
        # llama.cpp writes and reads one sequence's state with the number of streams of its context ("n_stream
        # mismatch" between a lone context and one of several streams): only a pool shares the prompt cache
        cache = self.prompt_cache if self.ctx.unified else None
        hit = cache.find(items, longer_than=running.keep) if cache is not None else None
        if hit is not None and hit.n_items < len(items):
            assert cache is not None
            if hit.n_positions == sequence_length(items[: hit.n_items]) and self.ctx.restore_state(
                    slot.seq, hit.state, hit.n_positions):
                running.keep, running.ticket.outcome.n_restored = hit.n_items, hit.n_positions
                slot.cached, slot.n_pos = list(items[: hit.n_items]), hit.n_positions
            else:
                log.warning("llama.cpp refused a prompt cache entry; removed, the prompt is decoded instead")
                cache.discard_items(items[: hit.n_items])
                self._empty(slot)
                running.keep = 0
        if not running.ticket.outcome.n_restored:
            running.ticket.outcome.n_reused = slot.n_pos
        running.next_item, running.pos = running.keep, slot.n_pos
        save_at = max((i + 1 for i, item in enumerate(items) if isinstance(item, ImageSlot)), default=0)
        if cache is not None and running.keep < save_at < len(items) and not cache.has(items[:save_at]):
            running.save_at = save_at
        needed = {item.key: item for item in items[running.keep :] if isinstance(item, ImageSlot)}
        start = time.perf_counter()
        try:
            running.features = running.ticket.request.features(list(needed.values())) if needed else {}
        except LlavaGGUFError as e:
            self._end(running, error=e)
            return
        except Exception as e:  # noqa: BLE001  an image that breaks the encoder fails its request only
            log.exception("preparing a request's images failed")
            self._end(running, error=LlavaGGUFError(f"could not prepare the images: {type(e).__name__}: {e}"))
            return
        finally:
            running.ticket.outcome.vision_s = time.perf_counter() - start
            self.stats.images_prepared_s += running.ticket.outcome.vision_s
        running.prepared = True

    def _advance(self, running: _Running, n: int, logits: np.ndarray | None) -> None:
        """``n`` more prompt positions decoded; the first token once the prompt is all in."""
        slot = running.slot
        item = running.items[running.next_item]
        running.pos += n
        if isinstance(item, ImageSlot):
            running.offset += n
            if running.offset == item.n_tokens:
                running.offset = 0
                running.next_item += 1
        else:
            running.next_item += n
        if running.offset == 0:  # the KV holds whole items: they can be kept for a later request
            slot.cached, slot.n_pos = list(running.items[: running.next_item]), running.pos
        if running.save_at and running.next_item == running.save_at and running.offset == 0:
            assert self.prompt_cache is not None
            seq = slot.seq
            self.prompt_cache.save(running.items[: running.save_at], running.pos, self.ctx.state_size(seq),
                                   lambda buffer: self.ctx.save_state(seq, buffer))
        if not running.prefilling:
            assert logits is not None
            running.features = {}  # decoded: the KV holds them now
            running.stream = TextStream(self.runtime.token_bytes, running.options.stop)
            if running.options.max_tokens <= 0:
                self._end(running, reason="length")
            else:
                self._take(running, logits)

    def _take(self, running: _Running, logits: np.ndarray) -> None:
        """Sample the next token of an answer and hand out its text, or end the answer."""
        outcome, stream = running.ticket.outcome, running.stream
        assert stream is not None
        token = running.sampler.sample(logits, running.history)
        now = time.perf_counter()
        if not running.first_token_at:
            running.first_token_at = now
            outcome.first_token_s = now - running.ticket.submitted
            outcome.prefill_s = now - running.admitted
        if self.is_end(token):
            self._end(running, piece=stream.finish())
            return
        outcome.tokens.append(token)
        running.history.append(token)
        self.stats.generated_tokens += 1
        piece = stream.push(token)
        if stream.stopped:
            self._end(running, piece=piece)
        elif len(outcome.tokens) >= running.options.max_tokens:
            self._end(running, reason="length", piece=piece + stream.finish())
        else:
            self._emit(running, piece)
            running.next_token = token

    def _emit(self, running: _Running, piece: str) -> None:
        error = self._hand_out(running, piece)
        if error is not None:
            self._end(running, error=error)

    @staticmethod
    def _hand_out(running: _Running, piece: str) -> LlavaGGUFError | None:
        on_piece = running.ticket.request.on_piece
        if piece and on_piece is not None:
            try:
                on_piece(piece)
            except Exception as e:  # noqa: BLE001  the receiver's failure ends its request only
                return LlavaGGUFError(f"could not hand out the answer: {e}")
        return None

    def _end(self, running: _Running, *, reason: str = "stop", piece: str = "", error: LlavaGGUFError | None = None,
             lost: bool = False) -> None:
        """End an answer; its sequence is free for the next request, keeping the whole items its KV holds
        (none when a failed decode left it unknown: ``lost``)."""
        if running not in self._running:
            return
        self._running.remove(running)
        if error is None:
            error = self._hand_out(running, piece)
        slot, outcome = running.slot, running.ticket.outcome
        if lost:
            self._empty(slot)
        elif self.ctx.n_positions(slot.seq) > slot.n_pos:
            self.ctx.forget(slot.seq, slot.n_pos)  # part of an image, or a token sampled and not yet kept
        slot.busy, slot.last_used = False, time.perf_counter()
        stream = running.stream
        outcome.text = stream.text if stream is not None else ""
        if running.first_token_at:
            outcome.decode_s = time.perf_counter() - running.first_token_at
        outcome.finish_reason = reason
        stats = self.stats
        if error is not None:
            stats.failed += 1
        elif reason == "cancelled":
            stats.cancelled += 1
        else:
            stats.finished += 1
            stats.prompt_tokens += outcome.n_prompt_tokens
        stats.active = len(self._running)
        running.ticket._finish(error)
