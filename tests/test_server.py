"""`llava-gguf serve` on loopback, driven by the real `openai` client (and a real browser): answers equal the
library's and transformers', usage is exact, the queue is bounded, bad requests get OpenAI-shaped errors."""

from __future__ import annotations

import base64
import http.client
import io
import json
import shutil
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import uvicorn
from PIL import Image
from test_runtime import EXACT, random_image, reference_run

from llava_gguf.errors import ImageError
from llava_gguf.image.load import load_image
from llava_gguf.llm.sampling import SamplingOptions
from llava_gguf.llm.templates import Message, Role, user_text
from llava_gguf.model import GenerationOptions, LlavaModel
from llava_gguf.server.app import AppOptions, create_app
from llava_gguf.server.images import ImagePolicy
from llava_gguf.server.service import ChatService, ServiceOptions

NAME = "tiny-llava"
QUESTION = "What is in the picture?"


class RunningServer:
    """The app under uvicorn on a free loopback port, in a thread."""

    def __init__(self, service: ChatService, options: AppOptions | None = None) -> None:
        self.service = service
        config = uvicorn.Config(create_app(service, options or AppOptions()), host="127.0.0.1", port=0,
                                log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kwargs.pop("api_key", "none"), max_retries=0,
                             timeout=120, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.service.close()


@pytest.fixture(scope="module")
def tiny(f32_pair):
    return f32_pair("1.5", "llava-hf", "llama")


def make_service(tiny, **options) -> ChatService:
    _, llm, mmproj = tiny
    return ChatService(LlavaModel(llm, mmproj, EXACT), ServiceOptions(name=NAME, **options))


@pytest.fixture(scope="module")
def server(tiny) -> Iterator[RunningServer]:
    running = RunningServer(make_service(tiny))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def library(tiny) -> LlavaModel:
    """The same files through the library, for the answers a lone request must give."""
    _, llm, mmproj = tiny
    return LlavaModel(llm, mmproj, EXACT)


def data_uri(image: Image.Image, kind: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, kind)
    return f"data:image/{kind.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def user(text: str, *images: Image.Image) -> dict:
    return {"role": "user", "content": [*({"type": "image_url", "image_url": {"url": data_uri(i)}} for i in images),
                                        {"type": "text", "text": text}]}


def lone_answer(library: LlavaModel, turns: list[tuple[str, list]], max_tokens: int = 16) -> tuple[str, list[int], object]:
    """The library's answer to the last turn after the earlier ones (greedy)."""
    chat = library.chat()
    options = GenerationOptions(max_tokens, sampling=SamplingOptions(temperature=0.0))
    answer = ""
    for text, images in turns:
        answer = "".join(chat.send(text, images, options))
    return answer, chat.last_tokens, library.timings


# ---------------------------------------------------------------- answers


def test_one_image_question_equals_ask_and_transformers(server, library, tiny) -> None:
    ckpt = tiny[0]
    image = random_image(90, 50, seed=41)
    response = server.client().chat.completions.create(model=NAME, messages=[user(QUESTION, image)],
                                                       temperature=0, max_tokens=16)
    text, tokens, timings = lone_answer(library, [(QUESTION, [image])])
    assert response.choices[0].message.content == text
    prompt = library.render([Message(Role.USER, user_text(QUESTION, 1))])
    assert tokens == reference_run(ckpt, prompt, [image])[1]
    usage = response.usage
    assert usage.prompt_tokens == timings.n_prompt_tokens  # the image's positions included
    assert usage.prompt_tokens > library.count_image_tokens(image)
    assert usage.completion_tokens == len(tokens) and usage.total_tokens == usage.prompt_tokens + len(tokens)
    assert response.choices[0].finish_reason == ("length" if len(tokens) == 16 else "stop")
    assert response.model == NAME and [m.id for m in server.client().models.list()] == [NAME]


def test_streamed_answer(server, library) -> None:
    image = random_image(70, 60, seed=42)
    stream = server.client().chat.completions.create(
        model=NAME, messages=[user(QUESTION, image)], temperature=0, max_tokens=16, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    expected, tokens, timings = lone_answer(library, [(QUESTION, [image])])
    assert text == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(tokens)
    assert chunks[-1].usage.prompt_tokens == timings.n_prompt_tokens


def test_two_turns_reuse_the_prefix(server, library) -> None:
    image = random_image(90, 50, seed=43)
    client = server.client()
    first = client.chat.completions.create(model=NAME, messages=[user(QUESTION, image)], temperature=0, max_tokens=16)
    answer = first.choices[0].message.content
    second = client.chat.completions.create(
        model=NAME, temperature=0, max_tokens=16,
        messages=[user(QUESTION, image), {"role": "assistant", "content": answer}, user("And its colour?")])
    expected, _, timings = lone_answer(library, [(QUESTION, [image]), ("And its colour?", [])])
    assert second.choices[0].message.content == expected
    assert second.usage.prompt_tokens == timings.n_prompt_tokens
    # the first turn's positions, image included, came from the KV cache
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= library.count_image_tokens(image)


# ---------------------------------------------------------------- concurrency


def test_eight_clients_get_what_a_lone_request_gets(tiny, library) -> None:
    running = RunningServer(make_service(tiny, max_queue=8))
    try:
        images = [random_image(90, 50, seed=50 + i) for i in range(3)]
        expected = [lone_answer(library, [(QUESTION, [image])], 8)[0] for image in images]

        def client_run(index: int) -> list[bool]:
            client = running.client()
            results = []
            for k in range(3):
                which = (index + k) % 3
                response = client.chat.completions.create(model=NAME, messages=[user(QUESTION, images[which])],
                                                          temperature=0, max_tokens=8)
                results.append(response.choices[0].message.content == expected[which])
            return results

        start = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            outcomes = [ok for result in pool.map(client_run, range(8)) for ok in result]
        assert outcomes == [True] * 24
        assert time.monotonic() - start < 120
    finally:
        running.stop()


def test_past_the_queue_bound_is_429(tiny) -> None:
    running = RunningServer(make_service(tiny, max_queue=2))
    try:
        image = random_image(90, 50, seed=60)
        body = json.dumps({"model": NAME, "messages": [user(QUESTION, image)], "max_tokens": 64}).encode()

        def post(_: int) -> tuple[int, dict, dict]:
            request = urllib.request.Request(f"{running.url}/v1/chat/completions", body,
                                             {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=120) as response:
                    return response.status, dict(response.headers), json.load(response)
            except urllib.error.HTTPError as e:
                return e.code, dict(e.headers), json.load(e)

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(post, range(8)))
        statuses = sorted(status for status, _, _ in results)
        assert statuses.count(200) >= 3 and 429 in statuses  # one generating + two waiting got through
        busy = next((h, b) for s, h, b in results if s == 429)
        assert busy[0]["retry-after"] == "1" and busy[1]["error"]["type"] == "rate_limit_error"
        assert running.service._admitted == 0
    finally:
        running.stop()


def test_a_client_dropped_mid_stream_frees_the_model(tiny) -> None:
    running = RunningServer(make_service(tiny))
    try:
        image = random_image(90, 50, seed=61)
        client = running.client()
        stream = client.chat.completions.create(model=NAME, messages=[user(QUESTION, image)], max_tokens=2000,
                                                temperature=1.0, seed=1, stream=True, stop=None)
        for i, _ in enumerate(stream):
            if i == 3:
                break
        stream.close()  # the connection goes away mid-answer
        deadline = time.monotonic() + 20
        while running.service._admitted and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running.service._admitted == 0
        stats = running.service.scheduler.stats
        assert stats.cancelled == 1 and stats.generated_tokens < 2000  # stopped, not finished
        start = time.monotonic()
        reply = client.chat.completions.create(model=NAME, messages=[user(QUESTION, image)], max_tokens=4)
        assert reply.choices[0].message.content is not None and time.monotonic() - start < 20
    finally:
        running.stop()


# ---------------------------------------------------------------- errors


def _post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, body, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def _chat(messages: list, **extra) -> bytes:
    return json.dumps({"model": NAME, "messages": messages, "max_tokens": 4, **extra}).encode()


@pytest.mark.parametrize(("body", "status", "words"), [
    (b"{not json", 400, "not valid JSON"),
    (_chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}},
                                         {"type": "text", "text": "hi"}]}]), 400, "not an image"),
    (_chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                                         {"type": "text", "text": "hi"}]}]), 400, "corrupt"),
    (_chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}},
                                         {"type": "text", "text": "hi"}]}]), 400, "base64"),
    (_chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}},
                                         {"type": "text", "text": "hi"}]}]), 400, "remote image URLs are off"),
    (_chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}},
                                         {"type": "text", "text": "hi"}]}]), 400, "local image paths are off"),
    (_chat([{"role": "user", "content": "hi"}], model="gpt-4o"), 400, "unknown model 'gpt-4o'"),
    (_chat([{"role": "assistant", "content": "hi"}]), 400, "expected a user message"),
    (_chat([{"role": "user", "content": "hi"}], max_tokens=100000), 400, "context"),
    (_chat([{"role": "user", "content": "hi"}], n=2), 400, "n"),
    (_chat([]), 400, "messages"),
])
def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, body, status, words) -> None:
    got, error = _post(f"{server.url}/v1/chat/completions", body)
    assert got == status
    assert set(error) == {"error"} and {"message", "type", "param", "code"} <= set(error["error"])
    assert words in error["error"]["message"] and "\n" not in error["error"]["message"]
    ok, reply = _post(f"{server.url}/v1/chat/completions", _chat([{"role": "user", "content": "hi"}]))
    assert ok == 200 and reply["choices"][0]["message"]["role"] == "assistant"


def test_image_limits(tiny) -> None:
    running = RunningServer(make_service(tiny, images=ImagePolicy(max_bytes=2000, max_images=2)))
    try:
        big = random_image(300, 300, seed=62)  # a PNG of well over 2000 bytes
        small = random_image(8, 8, seed=63)
        status, error = _post(f"{running.url}/v1/chat/completions", _chat([user("hi", big)]))
        assert status == 400 and "larger than the server's limit of 2000 bytes" in error["error"]["message"]
        status, error = _post(f"{running.url}/v1/chat/completions", _chat([user("hi", small, small, small)]))
        assert status == 400 and "more than 2 images" in error["error"]["message"]
        status, _ = _post(f"{running.url}/v1/chat/completions", _chat([user("hi", small)]))
        assert status == 200
    finally:
        running.stop()


def test_api_key_body_limit_and_local_files(tiny, tmp_path: Path) -> None:
    photo = tmp_path / "photos" / "cat.png"
    photo.parent.mkdir()
    random_image(40, 30, seed=64).save(photo)
    service = make_service(tiny, images=ImagePolicy(allowed_dirs=(photo.parent,)))
    running = RunningServer(service, AppOptions(api_key="s3cret", max_body_bytes=4096))
    try:
        assert _post(f"{running.url}/v1/chat/completions", _chat([user("hi")]))[0] == 401
        with pytest.raises(openai.AuthenticationError):
            running.client(api_key="wrong").models.list()
        with urllib.request.urlopen(f"{running.url}/health", timeout=10) as response:
            assert json.load(response)["status"] == "ok"  # no key needed
        client = running.client(api_key="s3cret")
        part = {"type": "image_url", "image_url": {"url": str(photo)}}
        reply = client.chat.completions.create(model=NAME, max_tokens=4, messages=[
            {"role": "user", "content": [part, {"type": "text", "text": "hi"}]}])
        assert reply.usage.prompt_tokens > 16
        outside = {"type": "image_url", "image_url": {"url": str(tmp_path / "x.png")}}
        with pytest.raises(openai.BadRequestError, match="outside the directories"):
            client.chat.completions.create(model=NAME, max_tokens=4, messages=[
                {"role": "user", "content": [outside, {"type": "text", "text": "hi"}]}])
        status, error = _post(f"{running.url}/v1/chat/completions", b"x" * 5000, {"Authorization": "Bearer s3cret"})
        assert status == 413 and "limit of 4096 bytes" in error["error"]["message"]
    finally:
        running.stop()


# ---------------------------------------------------------------- hostile requests


def _still_serving(url: str) -> None:
    with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
        assert json.load(response)["status"] == "ok"
    status, reply = _post(f"{url}/v1/chat/completions", _chat([{"role": "user", "content": "hi"}]))
    assert status == 200 and reply["choices"][0]["message"]["role"] == "assistant"


def _error_message(got: int, error: dict, status: int) -> str:
    """The message of an OpenAI-shaped error with ``status``."""
    assert got == status and set(error) == {"error"} and {"message", "type", "param", "code"} == set(error["error"])
    assert error["error"]["type"] == "invalid_request_error"
    return error["error"]["message"]


def test_json_nested_ten_thousand_deep_is_400(server) -> None:
    body = b'{"messages": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"  # past Python's parser's recursion
    got, error = _post(f"{server.url}/v1/chat/completions", body)
    assert "nested too deeply" in _error_message(got, error, 400)
    _still_serving(server.url)


def _send_big_body(url: str, body: bytes, chunked: bool) -> tuple[int, dict]:
    """POST ``body`` with ``Connection: close`` (as urllib sends it), all of it, then read the answer."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        headers = {"Content-Type": "application/json", "Connection": "close"}
        if chunked:  # no Content-Length: the server finds out by reading
            pieces = (body[i:i + (1 << 20)] for i in range(0, len(body), 1 << 20))
            connection.request("POST", "/v1/chat/completions", pieces, headers, encode_chunked=True)
        else:
            connection.request("POST", "/v1/chat/completions", body, headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_70_mb_body_gets_its_413(server, chunked: bool) -> None:
    got, error = _send_big_body(server.url, b"x" * (70 << 20), chunked)  # no reset: the client reads the 413
    assert f"limit of {AppOptions().max_body_bytes} bytes" in _error_message(got, error, 413)
    _still_serving(server.url)


def test_a_declared_terabyte_is_refused_before_its_body(server) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:  # a client that waits for 100 Continue is answered from Content-Length alone, and never sends its body
        connection.putrequest("POST", "/v1/chat/completions")
        for name, value in (("Content-Type", "application/json"), ("Content-Length", str(10**12)),
                            ("Expect", "100-continue")):
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        message = _error_message(response.status, json.loads(response.read()), 413)
        assert f"limit of {AppOptions().max_body_bytes} bytes" in message
    finally:
        connection.close()
    _still_serving(server.url)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # 144 MP: over Pillow's 89 MP warning
def test_an_image_of_144_megapixels_is_refused_from_its_header(server, tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    Image.new("1", (12_000, 12_000), 1).save(bomb, optimize=True)  # 18 MB in memory, 1 bit a pixel
    assert bomb.stat().st_size < 150_000
    uri = "data:image/png;base64," + base64.b64encode(bomb.read_bytes()).decode()
    part = {"type": "image_url", "image_url": {"url": uri}}
    got, error = _post(f"{server.url}/v1/chat/completions", _chat([{"role": "user", "content": [
        part, {"type": "text", "text": "hi"}]}]))
    message = _error_message(got, error, 400)
    assert "12000x12000" in message and "limit of 100000000 pixels" in message and "--max-image-pixels" in message
    assert error["error"]["param"] == "image_url"
    _still_serving(server.url)
    with pytest.raises(ImageError, match=r"12000x12000 \(144000000 pixels\), over the limit of 100000000"):
        load_image(bomb, max_pixels=100_000_000)  # the library's own limit, also from the header


# ---------------------------------------------------------------- the page


def test_the_web_page_in_a_browser(server, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it): apt-get install chromium")
    from playwright.sync_api import sync_playwright

    photo = tmp_path / "photo.png"
    random_image(90, 50, seed=65).save(photo)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            assert NAME in page.title()
            page.set_input_files("#file", str(photo))
            page.fill("#question", QUESTION)
            page.click("#send")
            answer = page.locator(".turn.assistant span").first
            page.wait_for_function("document.querySelector('#stats').textContent.includes('generated')",
                                   timeout=60_000)
            assert answer.inner_text().strip() or page.locator("#stats").inner_text()
            assert "cached" in page.locator("#stats").inner_text()
            assert page.locator(".turn.user img").count() == 1
            page.fill("#question", "And its colour?")  # the conversation continues
            page.click("#send")
            page.wait_for_function("document.querySelectorAll('.turn.assistant').length == 2 && "
                                   "!document.querySelector('#send').disabled", timeout=60_000)
            assert page.locator(".error").count() == 0
        finally:
            browser.close()


def test_serve_refuses_to_listen_beyond_loopback_without_a_key(tiny) -> None:
    from click.testing import CliRunner

    from llava_gguf.cli import main

    _, llm, mmproj = tiny
    result = CliRunner().invoke(main, ["serve", "--llm", str(llm), "--mmproj", str(mmproj), "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "--api-key" in result.output and "Traceback" not in result.output


def test_a_client_gone_before_a_plain_answer_frees_the_model(tiny) -> None:
    import socket

    running = RunningServer(make_service(tiny))
    try:
        body = json.dumps({"model": NAME, "messages": [user(QUESTION, random_image(90, 50, seed=66))],
                           "max_tokens": 3000, "temperature": 1.0, "seed": 3}).encode()
        port = int(running.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            deadline = time.monotonic() + 20
            while running.service._admitted == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
        gone = time.monotonic()
        while running.service._admitted and time.monotonic() < gone + 20:
            time.sleep(0.05)
        assert running.service._admitted == 0
        stats = running.service.scheduler.stats
        assert stats.cancelled == 1 and stats.generated_tokens < 3000  # stopped, not finished
        assert _post(f"{running.url}/v1/chat/completions", _chat([{"role": "user", "content": "hi"}]))[0] == 200
    finally:
        running.stop()
