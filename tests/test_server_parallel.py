"""`serve --parallel`: the scheduler behind the real app under uvicorn, driven by the `openai` client. Eight
clients at once (images, questions, lengths, stop strings, streamed or not) get what each gets alone; a
client that goes away frees its sequence for the next request; a follow-up turn reuses the sequence holding
its conversation while other answers run; /metrics counts what was done."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_runtime import random_image
from test_server import NAME, QUESTION, RunningServer, library, make_service, tiny, user  # noqa: F401  (fixtures)

from llava_gguf.llm.sampling import GenerationOptions, SamplingOptions
from llava_gguf.model import LlavaModel

# (question, image seeds, max tokens, stop strings, streamed)
CASES = [
    (QUESTION, [70], 300, (), False),
    ("Describe it.", [71], 40, (), True),
    (QUESTION, [70], 120, (" ", "e"), True),  # the same image as the first
    ("Hello there.", [], 200, (), False),
    ("Which way is up?", [72, 73], 250, ("a",), False),
    ("What colour is it?", [74], 8, (), True),
    (QUESTION, [75], 400, ("zz",), False),
    ("Count the shapes.", [76], 1, (), True),
]
SIZES = {70: (90, 50), 71: (33, 77), 72: (64, 64), 73: (90, 50), 74: (120, 40), 75: (50, 50), 76: (41, 99)}


def image(seed: int):
    return random_image(*SIZES[seed], seed=seed)


def lone(library: LlavaModel, question: str, seeds: list[int], max_tokens: int,  # noqa: F811
         stop: tuple[str, ...]) -> dict:
    """What the library answers alone (greedy), with the finish reason and usage the server must give."""
    chat = library.chat()
    options = GenerationOptions(max_tokens, stop=stop, sampling=SamplingOptions(temperature=0.0))
    text = "".join(chat.send(question, [image(s) for s in seeds], options))
    whole = b"".join(library.runtime.token_bytes(t) for t in chat.last_tokens).decode("utf-8", errors="replace")
    stopped = any(s in whole for s in stop)
    finish = "length" if len(chat.last_tokens) == max_tokens and not stopped else "stop"
    return {"text": text, "finish": finish, "prompt_tokens": library.timings.n_prompt_tokens,
            "completion_tokens": len(chat.last_tokens)}


def metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        assert response.headers["content-type"].startswith("text/plain")
        text = response.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


@pytest.fixture(params=[False, True], ids=["pool", "kv-streams"])
def parallel(request, tiny) -> Iterator[RunningServer]:  # noqa: F811
    running = RunningServer(make_service(tiny, parallel=4, max_queue=8, kv_streams=request.param))
    yield running
    running.stop()


def test_eight_clients_at_once_get_their_lone_answers(parallel, library) -> None:  # noqa: F811
    expected = [lone(library, q, seeds, n, stop) for q, seeds, n, stop, _ in CASES]
    barrier = threading.Barrier(len(CASES))

    def ask(case: tuple) -> dict:
        question, seeds, n, stop, streamed = case
        client = parallel.client()
        kwargs = {"model": NAME, "messages": [user(question, *(image(s) for s in seeds))], "temperature": 0,
                  "max_tokens": n, "stop": list(stop) or None}
        barrier.wait()
        if not streamed:
            r = client.chat.completions.create(**kwargs)
            return {"text": r.choices[0].message.content, "finish": r.choices[0].finish_reason,
                    "prompt_tokens": r.usage.prompt_tokens, "completion_tokens": r.usage.completion_tokens}
        chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
        return {"text": "".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
                "finish": [c.choices[0].finish_reason for c in chunks if c.choices][-1],
                "prompt_tokens": chunks[-1].usage.prompt_tokens, "completion_tokens": chunks[-1].usage.completion_tokens}

    with ThreadPoolExecutor(len(CASES)) as pool:
        got = list(pool.map(ask, CASES))
    assert got == expected
    stats = parallel.service.scheduler.stats
    assert stats.peak_active == 4  # the answers were generated together, four at a time
    assert stats.finished == len(CASES) and stats.generated_tokens == sum(e["completion_tokens"] for e in expected)
    seen = metrics(parallel.url)
    assert seen["llava_gguf_requests_total{outcome=finished}"] == len(CASES)
    assert seen["llava_gguf_generated_tokens_total"] == sum(e["completion_tokens"] for e in expected)
    assert seen["llava_gguf_prompt_tokens_total"] == sum(e["prompt_tokens"] for e in expected)
    assert seen["llava_gguf_sequences"] == 4 and seen["llava_gguf_sequences_active"] == 0
    assert seen["llava_gguf_requests_waiting"] == 0 and seen["llava_gguf_generated_tokens_per_second"] > 0
    # the image two clients sent was encoded once (7 images in all, 6 different)
    assert parallel.service.model.cache.misses == len({s for _, seeds, *_ in CASES for s in seeds})


class Reader:
    """Reads a streamed answer in a thread until it ends or ``leave()`` closes the connection."""

    def __init__(self, stream) -> None:
        self.stream, self.chunks = stream, []
        self.done, self._leave = threading.Event(), threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for chunk in self.stream:
                self.chunks.append(chunk)
                if self._leave.is_set():
                    break
        finally:
            self.stream.close()
            self.done.set()

    def leave(self) -> None:
        self._leave.set()
        self.done.wait(timeout=60)


def test_a_dropped_client_frees_its_sequence_for_the_next(tiny, library) -> None:  # noqa: F811
    running = RunningServer(make_service(tiny, parallel=2, max_queue=4))
    try:
        client = running.client()
        # two long answers hold both sequences
        long = dict(model=NAME, temperature=0, max_tokens=3900, stream=True)
        kept = client.chat.completions.create(messages=[user(QUESTION, image(70))], **long)
        dropped = client.chat.completions.create(messages=[user(QUESTION, image(71))], **long)
        for i, _ in enumerate(dropped):
            if i == 3:
                break
        dropped.close()  # the connection goes away mid-answer
        reader = Reader(kept)
        deadline = time.monotonic() + 20
        while metrics(running.url)["llava_gguf_requests_total{outcome=cancelled}"] < 1:
            assert time.monotonic() < deadline, "the dropped request was not cancelled"
            time.sleep(0.02)
        # the freed sequence answers a new request while the kept answer is still running
        reply = client.chat.completions.create(model=NAME, messages=[user("Describe it.", image(72))],
                                               temperature=0, max_tokens=8)
        assert not reader.done.is_set()
        assert reply.choices[0].message.content == lone(library, "Describe it.", [72], 8, ())["text"]
        seen = metrics(running.url)
        assert seen["llava_gguf_sequences_active"] == 1  # the kept answer only
        assert seen["llava_gguf_generated_tokens_total"] < 2 * 3900
        reader.leave()
    finally:
        running.stop()


def test_a_follow_up_reuses_its_sequence_while_another_answer_runs(tiny, library) -> None:  # noqa: F811
    running = RunningServer(make_service(tiny, parallel=2, max_queue=4))
    try:
        client = running.client()
        other = client.chat.completions.create(model=NAME, messages=[user("Describe it.", image(71))],
                                               temperature=0, max_tokens=3900, stream=True)
        reader = Reader(other)
        while not reader.chunks:  # it is answering
            time.sleep(0.005)
        first = client.chat.completions.create(model=NAME, messages=[user(QUESTION, image(70))], temperature=0,
                                               max_tokens=16)
        answer = first.choices[0].message.content
        follow = client.chat.completions.create(
            model=NAME, temperature=0, max_tokens=16,
            messages=[user(QUESTION, image(70)), {"role": "assistant", "content": answer}, user("And its colour?")])
        assert not reader.done.is_set()  # the other answer ran all along
        chat = library.chat()
        options = GenerationOptions(16, sampling=SamplingOptions(temperature=0.0))
        "".join(chat.send(QUESTION, [image(70)], options))
        expected = "".join(chat.send("And its colour?", [], options))
        assert follow.choices[0].message.content == expected
        assert follow.usage.prompt_tokens == library.timings.n_prompt_tokens
        # the first turn (its image and answer) came from the sequence that held it: only the new turn was decoded
        cached = follow.usage.prompt_tokens_details.cached_tokens
        assert cached >= first.usage.prompt_tokens
        # (the first turn shared only the opening words with the other answer's sequence, not an image)
        assert first.usage.prompt_tokens_details.cached_tokens < library.count_image_tokens(image(70))
        assert running.service.model.cache.misses == 2  # two images, each encoded once
        # where the time went, as llama-server's timings: the positions decoded and those reused
        spent = follow.model_extra["timings"]
        assert spent["cache_n"] == cached and spent["prompt_n"] == follow.usage.prompt_tokens - cached
        assert spent["predicted_n"] == follow.usage.completion_tokens and spent["image_ms"] < 50
        assert 0 < spent["first_token_ms"] and spent["queued_ms"] <= spent["first_token_ms"]
        reader.leave()
    finally:
        running.stop()
