"""The continuous-batching scheduler (`llm/scheduler.py`) on F32 files: answers generated together equal the
same answers generated alone (images, lengths, stop strings, sequences reused), a follow-up turn reuses
the sequence holding its prefix, a cancelled request frees its sequence, the prompt cache on disk is
restored into a sequence, and every image is encoded once."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import pytest
from test_runtime import EXACT, random_image

from llava_gguf.errors import ContextOverflowError
from llava_gguf.llm.sampling import GenerationOptions, SamplingOptions
from llava_gguf.llm.scheduler import Request, Scheduler
from llava_gguf.llm.sequence import ImageSlot, common_prefix, sequence_length
from llava_gguf.model import LlavaModel

GREEDY = SamplingOptions(temperature=0)


def greedy(max_tokens: int, *stop: str) -> GenerationOptions:
    return GenerationOptions(max_tokens=max_tokens, stop=stop, sampling=GREEDY)


# (question, image sizes, max tokens, stop strings): mixed images (one shared by several), lengths and stops
CASES = [
    ("What is in the picture?", [(40, 30)], 24, ()),
    ("Describe it.", [(64, 64)], 6, ()),
    ("What colour is it?", [(40, 30)], 16, (" ", "e")),
    ("Hello there.", [], 12, ()),
    ("Which way is up?", [(23, 71)], 20, ("a",)),
    ("What is in the picture?", [(90, 33)], 9, ()),
    ("Count the shapes.", [(64, 64), (40, 30)], 14, ()),
]


def image_of(size: tuple[int, int]):
    return random_image(*size, seed=size[0] * 1000 + size[1])


def alone(model: LlavaModel, question: str, sizes, options: GenerationOptions) -> tuple[str, list[int]]:
    chat = model.chat()
    text = "".join(chat.send(question, [image_of(s) for s in sizes], options))
    return text, chat.last_tokens


def submit(model: LlavaModel, scheduler: Scheduler, question: str, sizes, options: GenerationOptions, **kwargs):
    turn = model.chat().prepare(question, [image_of(s) for s in sizes])
    return scheduler.submit(Request(turn.items, options, model.feature_source(turn.views), **kwargs))


def answering(model: LlavaModel, scheduler: Scheduler, question: str, sizes, options: GenerationOptions, **kwargs):
    """``submit``, returned once the answer's first text is out (the request holds its sequence)."""
    started = threading.Event()
    ticket = submit(model, scheduler, question, sizes, options, on_piece=lambda piece: started.set(), **kwargs)
    assert started.wait(timeout=120)
    return ticket


def image_end(items) -> int:
    """Items up to and including the first image."""
    return next(i + 1 for i, item in enumerate(items) if isinstance(item, ImageSlot))


# (LLaVA version, layout, LLM): both layouts (the original's split tokenization), anyres, other LLM kinds
KINDS = [("1.5", "llava-hf", "llama"), ("1.6", "llava-hf", "llama"), ("1.6", "original", "mistral"),
         ("1.6", "llava-hf", "qwen2"), ("1.5", "llava-hf", "phi3")]


@pytest.fixture(scope="module", params=KINDS, ids=["-".join(kind) for kind in KINDS])
def model(request, f32_pair):
    _, llm, mmproj = f32_pair(*request.param)
    loaded = LlavaModel(llm, mmproj, EXACT)
    yield loaded
    loaded.close()


@pytest.mark.parametrize("unified", [False, True], ids=["streams", "unified"])
def test_answers_together_equal_answers_alone(model: LlavaModel, unified: bool) -> None:
    """A stream per sequence (the CPU default) and one pool (the GPU default) alike."""
    expected = [alone(model, q, sizes, greedy(n, *stop)) for q, sizes, n, stop in CASES]
    model.cache = type(model.cache)()  # nothing encoded yet: the scheduler encodes each image once
    scheduler = model.scheduler(3, unified=unified)
    try:
        pieces: list[list[str]] = [[] for _ in CASES]
        tickets = [submit(model, scheduler, q, sizes, greedy(n, *stop), on_piece=pieces[i].append)
                   for i, (q, sizes, n, stop) in enumerate(CASES)]
        outcomes = [t.wait(timeout=300) for t in tickets]
    finally:
        scheduler.close()
    assert [(o.text, o.tokens) for o in outcomes] == expected
    assert ["".join(p) for p in pieces] == [text for text, _ in expected]  # streamed as given
    assert model.cache.misses == len({s for _, sizes, _, _ in CASES for s in sizes})  # each image encoded once
    for (_, _, n, stop), outcome in zip(CASES, outcomes):
        whole = b"".join(model.runtime.token_bytes(t) for t in outcome.tokens).decode("utf-8", errors="replace")
        stopped = any(s in whole for s in stop)
        assert outcome.finish_reason == ("length" if outcome.n_generated == n and not stopped else "stop")
    assert scheduler.stats.finished == len(CASES) and scheduler.stats.generated_tokens == sum(
        len(tokens) for _, tokens in expected)


def test_one_sequence_serves_all_in_turn(model: LlavaModel) -> None:
    """``n_seq=1``: requests wait for the sequence and get the same answers."""
    cases = CASES[:3]
    expected = [alone(model, q, sizes, greedy(n, *stop)) for q, sizes, n, stop in cases]
    scheduler = model.scheduler(1)
    try:
        tickets = [submit(model, scheduler, q, sizes, greedy(n, *stop)) for q, sizes, n, stop in cases]
        assert [(o.text, o.tokens) for o in (t.wait(timeout=300) for t in tickets)] == expected
    finally:
        scheduler.close()


def test_follow_up_reuses_its_sequence_while_others_run(model: LlavaModel) -> None:
    chat = model.chat()
    first = "".join(chat.send("What is in the picture?", [image_of((40, 30))], greedy(10)))
    follow_alone = "".join(chat.send("And then?", [], greedy(10)))
    scheduler = model.scheduler(2)
    try:
        talk = model.chat()
        turn = talk.prepare("What is in the picture?", [image_of((40, 30))])
        one = scheduler.submit(Request(turn.items, greedy(10), model.feature_source(turn.views))).wait(timeout=300)
        assert one.text == first and one.n_reused == 0
        # another request takes the other sequence and keeps it busy while the follow-up comes
        other = submit(model, scheduler, "Describe it.", [(64, 64)], greedy(200))
        talk.messages += [turn.message, chat.messages[1]]
        talk.images = turn.images
        follow = talk.prepare("And then?")
        outcome = scheduler.submit(Request(follow.items, greedy(10), model.feature_source(follow.views))).wait(
            timeout=300)
        assert not other.done  # it ran meanwhile
        assert outcome.text == follow_alone
        # what the first turn's sequence held of it: the prompt, and the answer's tokens as far as the answer's
        # text tokenizes the same again (random weights write odd text)
        held = [*turn.items, *one.tokens]
        assert outcome.n_reused == sequence_length(follow.items[: common_prefix(held, follow.items)])
        # at least the first turn's image (a template's last token may tokenize otherwise once the answer follows)
        assert sequence_length(turn.items[: image_end(turn.items)]) <= outcome.n_reused < outcome.n_prompt_tokens
        other.wait(timeout=300)
    finally:
        scheduler.close()


def test_cancel_frees_the_sequence(model: LlavaModel) -> None:
    scheduler = model.scheduler(1)
    try:
        started = threading.Event()
        cancel = threading.Event()
        long = submit(model, scheduler, "Describe it.", [(64, 64)], greedy(400), cancel=cancel,
                      on_piece=lambda piece: started.set())
        waiting = submit(model, scheduler, "What is in the picture?", [(40, 30)], greedy(5))
        assert started.wait(timeout=120) and not waiting.done
        cancel.set()
        outcome = long.wait(timeout=60)
        assert outcome.finish_reason == "cancelled" and outcome.n_generated < 400
        assert waiting.wait(timeout=300).text == alone(model, "What is in the picture?", [(40, 30)], greedy(5))[0]
        assert scheduler.stats.cancelled == 1 and scheduler.stats.active == 0
    finally:
        scheduler.close()


def test_prompt_cache_is_restored_into_a_sequence(f32_pair, tmp_path: Path) -> None:
    """A prefix a lone run saved is restored into a pool's sequence, and a pool saves new prefixes that a lone run
    restores. Streams leave the prompt cache alone: llama.cpp's saved sequence states carry their context's
    number of streams, and a lone context refuses those of several (and they, a lone one's)."""
    _, llm, mmproj = f32_pair("1.6", "llava-hf", "llama")
    options = replace(EXACT, prompt_cache=True, prompt_cache_dir=tmp_path / "prompts")
    writer = LlavaModel(llm, mmproj, options)
    expected = alone(writer, "What is in the picture?", [(40, 30)], greedy(8))
    assert writer.prompt_cache.saved == 1
    writer.close()
    model = LlavaModel(llm, mmproj, options)
    pool = model.scheduler(2, unified=True)
    try:
        outcome = submit(model, pool, "What is in the picture?", [(40, 30)], greedy(8)).wait(timeout=300)
        assert (outcome.text, outcome.tokens) == expected
        assert outcome.n_restored > 0 and model.cache.misses == 0  # the image's prefix came from disk
    finally:
        pool.close()
    streams = model.scheduler(2, unified=False)
    try:
        again = submit(model, streams, "What is in the picture?", [(40, 30)], greedy(8)).wait(timeout=300)
        assert (again.text, again.tokens) == expected and again.n_restored == 0
        submit(model, streams, "Compare.", [(23, 71)], greedy(8)).wait(timeout=300)
        assert model.prompt_cache.saved == 0 and model.prompt_cache.writable
    finally:
        streams.close()
    pool = model.scheduler(2, unified=True)
    try:
        other = submit(model, pool, "Describe it.", [(64, 64)], greedy(8)).wait(timeout=300)
        assert model.prompt_cache.saved == 1  # the new image's prefix
    finally:
        pool.close()
    chat = model.chat()
    assert "".join(chat.send("Describe it.", [image_of((64, 64))], greedy(8))) == other.text
    assert model.timings.n_restored > 0
    model.close()


def test_a_request_beyond_a_sequence_is_refused(model: LlavaModel) -> None:
    streams = model.scheduler(2, size=512, unified=False)  # 256 positions each
    try:
        assert streams.max_request == 256
        with pytest.raises(ContextOverflowError, match="context holds at most 256"):
            submit(model, streams, "What is in the picture?", [(40, 30)], greedy(300))
    finally:
        streams.close()
    scheduler = model.scheduler(2, size=256, unified=True)
    try:
        with pytest.raises(ContextOverflowError, match="context holds at most"):
            submit(model, scheduler, "What is in the picture?", [(40, 30)], greedy(1000))
        # the pool is shared: two requests that each fit but not together run one after the other
        sizes = [(40, 30)]
        n = 256 - sequence_length(model.chat().prepare("Hi.", [image_of(s) for s in sizes]).items) - 8
        tickets = [submit(model, scheduler, "Hi.", sizes, greedy(n)) for _ in range(2)]
        outcomes = [t.wait(timeout=300) for t in tickets]
        assert outcomes[0].text == outcomes[1].text and outcomes[1].wait_s > 0
    finally:
        scheduler.close()


def test_features_are_asked_only_for_images_not_reused(model: LlavaModel) -> None:
    asked: list[list[str]] = []
    scheduler = model.scheduler(1)
    try:
        turn = model.chat().prepare("What is in the picture?", [image_of((40, 30))])
        source = model.feature_source(turn.views)

        def recording(slots: list[ImageSlot]):
            asked.append([s.key for s in slots])
            return source(slots)

        for _ in range(2):
            scheduler.submit(Request(turn.items, greedy(3), recording)).wait(timeout=300)
    finally:
        scheduler.close()
    assert asked == [[turn.views[0].slot.key]]  # the second time the sequence held the image


def test_a_shared_image_is_prefilled_once(model: LlavaModel) -> None:
    """A second request about an image another sequence is answering about: it shares that sequence's KV cells
    for the prompt's opening and the image (decoded once), and both get their lone answers."""
    expected = [alone(model, "What is in the picture?", [(64, 64)], greedy(300)),
                alone(model, "Describe it.", [(64, 64)], greedy(12))]
    scheduler = model.scheduler(2)
    try:
        first = answering(model, scheduler, "What is in the picture?", [(64, 64)], greedy(300))
        turn = model.chat().prepare("Describe it.", [image_of((64, 64))])
        second = scheduler.submit(Request(turn.items, greedy(12), model.feature_source(turn.views)))
        outcomes = [first.wait(timeout=300), second.wait(timeout=300)]
    finally:
        scheduler.close()
    assert [(o.text, o.tokens) for o in outcomes] == expected
    assert outcomes[1].n_reused >= sequence_length(turn.items[: image_end(turn.items)])


def test_a_queued_request_cancelled_leaves_at_once_and_odd_seeds_are_no_harm(model: LlavaModel) -> None:
    """A request cancelled while it waits behind others ends at the next step, wherever it is in the queue; a seed
    of -1 (llama.cpp's "random") samples at random instead of failing the others."""
    scheduler = model.scheduler(1)
    try:
        long = answering(model, scheduler, "Describe it.", [(64, 64)], greedy(2000))
        second = submit(model, scheduler, "Hello there.", [], greedy(4))
        cancel = threading.Event()
        third = submit(model, scheduler, "What is in the picture?", [(40, 30)], greedy(4), cancel=cancel)
        cancel.set()
        assert third.wait(timeout=30).finish_reason == "cancelled" and not long.done and not second.done
        random = GenerationOptions(6, sampling=SamplingOptions(temperature=1.0, seed=-1))
        fourth = submit(model, scheduler, "Hello there.", [], random)
        long.cancel()
        assert second.wait(timeout=300).text == alone(model, "Hello there.", [], greedy(4))[0]
        assert len(fourth.wait(timeout=300).tokens) <= 6 and scheduler.stats.failed == 0
    finally:
        scheduler.close()
