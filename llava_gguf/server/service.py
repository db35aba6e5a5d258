"""The server's logic: an OpenAI chat request to a conversation on the one loaded model, answered by the
scheduler (``llm/scheduler.py``) together with up to ``parallel - 1`` others, behind a bounded queue.

Each request carries its whole conversation; it is rendered with the model's template and tokenized
as ``ask`` does, so a request that extends an earlier one shares its token and image prefix, and the
sequence that holds that prefix (or the prompt cache on disk) supplies it: follow-up turns decode only
what is new, and no request sees another's state beyond an identical prefix.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

from llava_gguf.errors import ContextOverflowError, ImageError, LlavaGGUFError, PromptError
from llava_gguf.llm.sampling import SamplingOptions
from llava_gguf.llm.scheduler import Request
from llava_gguf.llm.templates import Message, Role, user_text
from llava_gguf.model import GenerationOptions, LlavaModel
from llava_gguf.server.images import ImagePolicy, image_bytes
from llava_gguf.server.protocol import ChatCompletionRequest, RequestError, timings, usage


@dataclass(frozen=True)
class ServiceOptions:
    name: str  # the model id clients name
    parallel: int = 1  # answers generated together (sequences of one llama.cpp context)
    max_queue: int = 4  # requests waiting beyond the ``parallel`` answering; more get 429
    pool_positions: int | None = None  # positions of the sequences (None: ``llm.sizing.default_pool_size``)
    kv_streams: bool = False  # a KV stream per sequence instead of one pool (``llm/shared_context.py``)
    images: ImagePolicy = field(default_factory=ImagePolicy)
    # what a request leaves out (temperature 0.2 as `ask` and LLaVA's own CLI, 512 tokens)
    defaults: GenerationOptions = GenerationOptions(sampling=SamplingOptions(temperature=0.2))


@dataclass
class Job:
    """A parsed request: the conversation before the last user message, and that message."""

    system: str | None
    history: list[tuple[Role, str, list[bytes]]]
    text: str
    images: list[bytes]
    options: GenerationOptions


@dataclass
class Result:
    text: str
    finish_reason: str
    usage: dict
    timings: dict | None = None


class ChatService:
    def __init__(self, model: LlavaModel, options: ServiceOptions) -> None:
        self.model = model
        self.options = options
        self.scheduler = model.scheduler(options.parallel, size=options.pool_positions, unified=not options.kv_streams)
        self._preparing = threading.Lock()  # the tokenizer and template, one request at a time
        self._admitted = 0
        self.rejected = 0
        self._count = threading.Lock()

    def close(self) -> None:
        self.scheduler.close()

    # -- admission ----------------------------------------------------------------------------

    @contextmanager
    def admitted(self) -> Iterator[None]:
        """Hold a place: ``parallel`` answering plus ``max_queue`` waiting; past that, 429."""
        with self._count:
            if self._admitted >= self.options.parallel + self.options.max_queue:
                self.rejected += 1
                raise RequestError(429, f"the server is busy ({self._admitted} requests in progress or waiting); "
                                        "retry shortly", kind="rate_limit_error", code="busy",
                                   headers={"Retry-After": "1"})
            self._admitted += 1
        try:
            yield
        finally:
            with self._count:
                self._admitted -= 1

    # -- requests -----------------------------------------------------------------------------

    def parse(self, request: ChatCompletionRequest) -> Job:
        if request.model not in (None, "", self.options.name):
            raise RequestError(400, f"unknown model {request.model!r}; this server runs {self.options.name!r}",
                               param="model", code="model_not_found")
        system: str | None = None
        turns: list[tuple[Role, str, list[bytes]]] = []
        n_images = 0
        for i, message in enumerate(request.messages):
            text, urls = _split_content(message.content, i)
            if message.role in ("system", "developer"):
                if turns or urls:
                    raise RequestError(400, f"messages[{i}]: a system message comes first and holds text only",
                                       param=f"messages.{i}")
                system = text if system is None else f"{system}\n{text}"
                continue
            role = Role.USER if message.role == "user" else Role.ASSISTANT
            expected = Role.USER if len(turns) % 2 == 0 else Role.ASSISTANT
            if role is not expected:
                raise RequestError(400, f"messages[{i}]: expected a {expected.value} message (user and assistant "
                                        "turns alternate, starting with the user)", param=f"messages.{i}")
            if role is Role.ASSISTANT and urls:
                raise RequestError(400, f"messages[{i}]: an assistant message holds no images", param=f"messages.{i}")
            n_images += len(urls)
            if n_images > self.options.images.max_images:
                raise RequestError(400, f"more than {self.options.images.max_images} images in one conversation",
                                   param="messages")
            turns.append((role, text, [image_bytes(url, self.options.images) for url in urls]))
        if not turns or turns[-1][0] is not Role.USER:
            raise RequestError(400, "the last message must be the user's", param="messages")
        defaults = self.options.defaults
        sampling = replace(
            defaults.sampling,
            temperature=defaults.sampling.temperature if request.temperature is None else request.temperature,
            top_p=defaults.sampling.top_p if request.top_p is None else request.top_p,
            seed=defaults.sampling.seed if request.seed is None else request.seed,
        )
        options = GenerationOptions(max_tokens=request.token_limit or defaults.max_tokens,
                                    stop=request.stops or defaults.stop, sampling=sampling)
        last = turns.pop()
        return Job(system, turns, last[1], last[2], options)

    def run(self, job: Job, on_piece: Callable[[str], None], stop: threading.Event) -> Result:
        """Answer ``job`` (waiting in a worker thread); ``on_piece`` gets each text piece, on the scheduler's
        thread; ``stop`` ends it within a step, freeing its sequence."""
        model = self.model
        try:
            with self._preparing:
                chat = model.chat(job.system)
                for role, text, images in job.history:
                    prepared = [model.prepare_image(image) for image in images]
                    chat.messages.append(Message(role, user_text(text, len(prepared)) if role is Role.USER else text))
                    chat.images += prepared
                turn = chat.prepare(job.text, job.images)
            ticket = self.scheduler.submit(Request(turn.items, job.options, model.feature_source(turn.views),
                                                   on_piece, cancel=stop))
            outcome = ticket.wait()
        except (ImageError, PromptError, ContextOverflowError) as e:
            raise RequestError(400, str(e)) from e
        except LlavaGGUFError as e:
            raise RequestError(500, str(e), kind="server_error") from e
        finish = "length" if outcome.finish_reason == "length" else "stop"
        o = outcome
        spent = timings(queued_s=o.wait_s, first_token_s=o.first_token_s, image_s=o.vision_s,
                        prompt_s=o.prefill_s - o.vision_s, prompt_n=o.n_prompt_tokens - o.n_cached,
                        cached_n=o.n_cached, predicted_s=o.decode_s, predicted_n=o.n_generated)
        return Result(o.text, finish, usage(o.n_prompt_tokens, o.n_generated, o.n_cached), spent)


def _split_content(content: object, index: int) -> tuple[str, list[str]]:
    """(text, image URLs) of a message's content: a string, or text and image_url parts."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    texts, urls = [], []
    for part in content:  # list[ContentPart], validated
        if part.type == "text":
            texts.append(part.text or "")
        elif part.image_url is None:
            raise RequestError(400, f"messages[{index}]: an image_url part without its url", param=f"messages.{index}")
        else:
            urls.append(part.image_url.url)
    return "\n".join(texts), urls
