"""The server's logic: an OpenAI chat request to a conversation on the one loaded model, one generation at a
time behind a bounded queue.

Each request carries its whole conversation; it is rendered with the model's template and tokenized
as ``ask`` does, so a request that extends an earlier one shares its token and image prefix and the
model's KV cache (and the prompt cache on disk) supplies that prefix: follow-up turns decode only
what is new, and no request sees another's state beyond an identical prefix.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

from llava_gguf.errors import ContextOverflowError, ImageError, LlavaGGUFError, PromptError
from llava_gguf.llm.sampling import SamplingOptions
from llava_gguf.llm.templates import Message, Role, user_text
from llava_gguf.model import GenerationOptions, LlavaModel
from llava_gguf.server.images import ImagePolicy, image_bytes
from llava_gguf.server.protocol import ChatCompletionRequest, RequestError, usage


@dataclass(frozen=True)
class ServiceOptions:
    name: str  # the model id clients name
    max_queue: int = 4  # requests waiting beyond the one generating; more get 429
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


class ChatService:
    def __init__(self, model: LlavaModel, options: ServiceOptions) -> None:
        self.model = model
        self.options = options
        self._generating = threading.Lock()  # one generation at a time
        self._admitted = 0
        self._count = threading.Lock()

    # -- admission ----------------------------------------------------------------------------

    @contextmanager
    def admitted(self) -> Iterator[None]:
        """Hold a place: the one generating plus ``max_queue`` waiting; past that, 429."""
        with self._count:
            if self._admitted >= 1 + self.options.max_queue:
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
        """Generate (in a worker thread); ``on_piece`` gets each text piece; ``stop`` ends it within a token."""
        with self._generating:
            model = self.model
            if stop.is_set():  # its client left while it waited
                return Result("", "stop", usage(0, 0, 0))
            try:
                chat = model.chat(job.system)
                for role, text, images in job.history:
                    prepared = [model.prepare_image(image) for image in images]
                    chat.messages.append(Message(role, user_text(text, len(prepared)) if role is Role.USER else text))
                    chat.images += prepared
                pieces = []
                stream = chat.send(job.text, job.images, job.options)
                try:
                    for piece in stream:
                        if stop.is_set():
                            break
                        pieces.append(piece)
                        on_piece(piece)
                finally:
                    stream.close()
            except (ImageError, PromptError, ContextOverflowError) as e:
                raise RequestError(400, str(e)) from e
            except LlavaGGUFError as e:
                raise RequestError(500, str(e), kind="server_error") from e
            t = model.timings
            finish = "length" if t.n_generated >= job.options.max_tokens else "stop"
            return Result("".join(pieces), finish,
                          usage(t.n_prompt_tokens, t.n_generated, t.n_prompt_tokens - t.n_prefilled))


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
