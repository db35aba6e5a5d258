"""The public runtime: a converted GGUF pair, images in, the reference model's answers out.

    model = LlavaModel.load("models/")    # or "ollama:llava:7b", a Hub repo, LlavaModel(llm_path, mmproj_path)
    for piece in model.ask("What is in this image?", images=["cat.jpg"]):
        print(piece, end="")
    chat = model.chat()
    chat.send("Describe it.", images=["cat.jpg"])          # an iterator of text pieces
"""

from __future__ import annotations

import hashlib
import logging
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import gguf
import numpy as np
from PIL import Image

from llava_gguf.errors import GGUFFormatError, ImageError, ModelLoadError, PromptError
from llava_gguf.feature_cache import FeatureCache
from llava_gguf.guess import TemplateGuess, guess_template
from llava_gguf.image.load import ImageSource, image_digest, load_image
from llava_gguf.image.preprocess import preprocess
from llava_gguf.llm.chat_template import render_chat_template
from llava_gguf.llm.llama import LlamaOptions, LlamaRuntime
from llava_gguf.llm.prompt_cache import DEFAULT_MAX_BYTES as DEFAULT_PROMPT_CACHE_BYTES
from llava_gguf.llm.prompt_cache import PromptCache
from llava_gguf.llm.sampling import GenerationOptions, Sampler
from llava_gguf.llm.scheduler import FeatureSource, Scheduler
from llava_gguf.llm.sequence import ImageSlot, Item, common_prefix, sequence_length, tokenize_prompt
from llava_gguf.llm.templates import Message, Role, Template, render, user_text
from llava_gguf.llm.text_stream import TextStream
from llava_gguf.metadata import ImageMode, LlavaKeys, TokenizeMode, VisionSettings, read_gguf, read_header_keys
from llava_gguf.packing import count_image_tokens, pack_image_features
from llava_gguf.paths import prompts_dir
from llava_gguf.vision import DEFAULT_CACHE_BYTES, VisionEncoder
from llava_gguf.vision.choose import EncoderChoice, choose_encoder

log = logging.getLogger(__name__)

# the tokenizer's named special tokens transformers passes to a chat template (its special_tokens_map)
SPECIAL_TOKEN_KEYS = {
    "bos_token": gguf.Keys.Tokenizer.BOS_ID, "eos_token": gguf.Keys.Tokenizer.EOS_ID,
    "unk_token": gguf.Keys.Tokenizer.UNK_ID, "sep_token": gguf.Keys.Tokenizer.SEP_ID,
    "pad_token": gguf.Keys.Tokenizer.PAD_ID, "mask_token": gguf.Keys.Tokenizer.MASK_ID,
}

TileCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class RuntimeOptions:
    llama: LlamaOptions = LlamaOptions()
    encoder: EncoderChoice = EncoderChoice.AUTO
    cache_dir: Path | None = None  # image features on disk (None: in memory only)
    cache_max_bytes: int = 1 << 30
    # KV states of prompt prefixes on disk (prompt_cache.py): a new run about the same image skips its prefill
    prompt_cache: bool = True
    prompt_cache_dir: Path | None = None  # default: <cache>/prompts
    prompt_cache_max_bytes: int = DEFAULT_PROMPT_CACHE_BYTES
    template: Template | None = None  # None: the one the GGUF names (or, for other tools' files, guessed)
    llava_version: str | None = None  # None: the mmproj's (or, for other tools' files, inferred)
    probe_cache_dir: Path | None = None  # where the encoders' probe verdicts are kept (default ~/.cache/llava-gguf)
    ggml_library: Path | None = None  # a directory with another ggml build (default $LLAVA_GGUF_GGML_LIB, else
    # llama-cpp-python's): a CUDA or Metal build made apart runs the vision tower on the GPU
    # low memory: no float32 copies of f16 vision weights kept between tiles, and the vision
    # weights leave resident memory once an image is encoded, before the LLM's prefill
    low_memory: bool = False


@dataclass
class Timings:
    vision_encode_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    n_prompt_tokens: int = 0
    n_prefilled: int = 0  # positions actually decoded for the prompt (the rest came from the caches)
    n_restored: int = 0  # positions restored from the prompt cache on disk
    n_generated: int = 0
    n_image_tokens: list[int] = field(default_factory=list)
    n_images_encoded: int = 0


# LLaVA-OneVision: the feature-cache key of an image's untiled view (one of several images in a prompt)
UNTILED_KEY = "-single"


@dataclass
class PreparedImage:
    """An image identified and counted; its features are computed when first needed.

    LLaVA-OneVision tiles an image only when it is the only one of its prompt: ``tiled`` says which view
    this is, ``untiled_tokens`` counts the other (one square tile), None for other models."""

    slot: ImageSlot
    size_hw: tuple[int, int]
    image: Image.Image | None = None
    on_tile: TileCallback | None = None
    tiled: bool = True
    untiled_tokens: int | None = None

    def untiled(self) -> PreparedImage:
        """This image as one of several in a OneVision prompt (itself when already so, or not OneVision)."""
        if not self.tiled or self.untiled_tokens is None:
            return self
        return replace(self, slot=ImageSlot(self.slot.key + UNTILED_KEY, self.untiled_tokens), tiled=False)


@dataclass
class Turn:
    """A conversation's next prompt: its text, its token ids and image slots, the image views behind the
    slots (the reference's: `LlavaModel.image_views`), the new images' token counts, the user message it
    adds (None for a raw prompt) and the conversation's images with the new ones."""

    prompt: str
    items: list[Item]
    views: list[PreparedImage]
    n_image_tokens: list[int]
    message: Message | None
    images: list[PreparedImage]


class LlavaModel:
    """A LLaVA model from an LLM GGUF and an mmproj GGUF: written by `llava-gguf convert`, or by other
    tools (llama.cpp's legacy LLaVA scripts, as the Hub and ollama hold them), whose unsaid settings
    are inferred (``inference_note`` says what was). ``template_hint``: a template text from where the
    files came from (ollama's), evidence for the guess."""

    def __init__(self, llm_path: str | Path, mmproj_path: str | Path, options: RuntimeOptions = RuntimeOptions(),
                 *, template_hint: str | None = None) -> None:
        self.llm_path, self.mmproj_path = Path(llm_path), Path(mmproj_path)
        self.options = options
        reader = read_gguf(self.mmproj_path)
        settings = VisionSettings.read(reader)
        del reader
        if options.llava_version is not None:
            settings = settings.with_llava_version(options.llava_version)
        self.settings = settings
        self.runtime = LlamaRuntime(self.llm_path, options.llama)
        try:
            self._load(options, template_hint)
        except BaseException:
            self.close()  # a pair that cannot run frees what it loaded at once
            raise
        self.cache = FeatureCache(options.cache_dir, options.cache_max_bytes)
        self.prompt_cache = (
            PromptCache(options.prompt_cache_dir or prompts_dir(), self.runtime.state_key, options.prompt_cache_max_bytes)
            if options.prompt_cache else None
        )
        stat = self.mmproj_path.stat()
        # features are keyed by encoder and backend: a GPU's agree with the CPU's only within rounding
        backend = getattr(self.encoder, "backend_name", "")
        self._model_key = f"{self.mmproj_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{self.encoder_name}:{backend}"
        self._cached: list[Item] = []  # what the KV cache holds, in order
        self._features: dict[str, np.ndarray] = {}  # packed features of this session's images
        self._pending: dict[str, PreparedImage] = {}  # images in a sequence, not yet encoded
        self._schedulers: weakref.WeakSet[Scheduler] = weakref.WeakSet()  # closed before the model
        self.timings = Timings()

    def _load(self, options: RuntimeOptions, template_hint: str | None) -> None:
        """What the LLM says (or leaves to guess), the vision encoder, and whether the two files fit."""
        meta = self.runtime.model.metadata()
        self.template_guess: TemplateGuess | None = None
        if LlavaKeys.TEMPLATE in meta:
            template = Template(meta[LlavaKeys.TEMPLATE])
            self.tokenize_mode = TokenizeMode(meta.get(LlavaKeys.TOKENIZE_MODE, TokenizeMode.WHOLE.value))
            token = meta.get(LlavaKeys.IMAGE_TOKEN_ID)
            self.image_token_id = int(token) if token is not None else None
        else:
            # another tool's LLM: the original LLaVA's template choice and tokenizer_image_token
            self.template_guess = guess_template(meta, self.runtime.is_one_token, template_hint)
            template = self.template_guess.template
            self.tokenize_mode, self.image_token_id = TokenizeMode.SPLIT, None
        self.template = options.template or template
        self.chat_template: str | None = meta.get(gguf.Keys.Tokenizer.CHAT_TEMPLATE) or None
        if self.template is Template.CHECKPOINT and self.chat_template is None:
            raise ModelLoadError(f"{self.llm_path.name} carries no chat template (tokenizer.chat_template), so "
                                 "there is no checkpoint template to use; choose another --template")
        self.special_tokens = self._special_tokens(meta)
        # every end-of-generation id the file names beyond llama.cpp's own (llama_vocab_is_eog)
        ids = read_header_keys(self.llm_path, {LlavaKeys.EOS_TOKEN_IDS}).get(LlavaKeys.EOS_TOKEN_IDS) or []
        self.end_token_ids = frozenset(int(i) for i in ids)
        self.encoder = self._make_encoder()
        packs_newlines = self.settings.image_mode in (ImageMode.ANYRES, ImageMode.ANYRES_MAX)
        if packs_newlines and self.encoder.image_newline is None:
            hint = "" if self.settings.is_onevision else "; if it is a LLaVA 1.5 file, pass --llava-version 1.5"
            raise GGUFFormatError(
                f"{self.mmproj_path}: a {self.settings.description} mmproj without its image_newline tensor "
                f"(v.image_newline or model.image_newline){hint}"
            )
        if self.encoder.llm_hidden_size != self.runtime.n_embd:
            raise ModelLoadError(
                f"{self.mmproj_path.name} projects images to width {self.encoder.llm_hidden_size} but "
                f"{self.llm_path.name} has width {self.runtime.n_embd}: the two files do not belong together"
            )

    def _special_tokens(self, meta: dict[str, str]) -> dict[str, str]:
        """The named special tokens' texts, as a chat template gets them from transformers."""
        out = {}
        for name, key in SPECIAL_TOKEN_KEYS.items():
            value = meta.get(key)
            if value is not None and 0 <= int(value) < self.runtime.n_vocab:
                out[name] = self.runtime.token_bytes(int(value)).decode("utf-8", errors="replace")
        return out

    def is_end_of_generation(self, token: int) -> bool:
        """Whether ``token`` ends an answer: llama.cpp's end-of-generation tokens, and every id in the
        file's ``llava_gguf.eos_token_ids`` (generation_config's list, e.g. Llama-3's <|eot_id|>)."""
        return token in self.end_token_ids or self.runtime.is_end_of_generation(token)

    @classmethod
    def load(cls, model: str | Path, options: RuntimeOptions = RuntimeOptions(), *, quant: str | None = None,
             revision: str | None = None) -> LlavaModel:
        """A model from anything ``-m`` takes: a directory of GGUFs, an LLM ``.gguf``, a Hub repo of GGUF
        pairs, ``ollama:NAME[:TAG]``, or a Hugging Face checkpoint (converted once into the cache)."""
        from llava_gguf.sources import ModelRequest, resolve_model

        files = resolve_model(ModelRequest(model=str(model), quant=quant, revision=revision))
        return cls(files.llm, files.mmproj, options, template_hint=files.template_hint)

    @property
    def inference_note(self) -> str | None:
        """One line on what the files left unsaid and how it was filled, or None when they said it all."""
        parts = []
        if self.settings.inferred:
            parts.append(f"{self.settings.description}, {self.settings.inferred[0]}")
        if self.template_guess is not None:
            how = "as asked" if self.options.template is not None else f"guessed from {self.template_guess.reason}"
            parts.append(f"{self.template.value} template {how}")
        return "; ".join(parts) or None

    def _make_encoder(self) -> VisionEncoder:
        encoder, self.encoder_name, self.encoder_reason = choose_encoder(
            self.options.encoder,
            self.mmproj_path,
            self.runtime.model.model,
            settings=self.settings,
            ggml_library=self.options.ggml_library,
            cache_dir=self.options.probe_cache_dir,
            n_threads=self.options.llama.n_threads,
            use_gpu=self.options.llama.n_gpu_layers != 0,
            numpy_cache_bytes=0 if self.options.low_memory else DEFAULT_CACHE_BYTES,
            low_memory=self.options.low_memory,
        )
        return encoder

    # ------------------------------------------------------------------ images

    def prepare_image(self, source: ImageSource, on_tile: TileCallback | None = None) -> PreparedImage:
        """Load an image and count its tokens; encoding waits until the prompt is known to fit."""
        image = load_image(source, composite_alpha=not self.settings.follows_original_code)
        key = hashlib.sha256(f"{self._model_key}:{image_digest(image, self.settings)}".encode()).hexdigest()[:32]
        size_hw = (image.height, image.width)
        n_tokens = count_image_tokens(size_hw, self.settings)
        untiled = count_image_tokens(size_hw, self.settings, tiled=False) if self.settings.is_onevision else None
        return PreparedImage(ImageSlot(key, n_tokens), size_hw, image, on_tile, untiled_tokens=untiled)

    def image_views(self, images: Sequence[PreparedImage]) -> list[PreparedImage]:
        """The views the reference feeds for a prompt's images, in order: LLaVA-OneVision tiles an image only
        when it is the prompt's only one (`packing_onevision.tiling_flags`); other models use them as prepared."""
        if self.settings.is_onevision and len(images) > 1:
            return [p.untiled() for p in images]
        return list(images)

    def encode_image(self, prepared: PreparedImage) -> np.ndarray:
        """The packed features of a prepared image: from this session, the cache, or the encoder."""
        key = prepared.slot.key
        features = self._features.get(key)
        if features is None:
            features = self.cached_features(prepared)
        self._features[key] = features
        return features

    def cached_features(self, prepared: PreparedImage) -> np.ndarray:
        """The packed features of a prepared image: from the feature cache, else encoded (and cached)."""
        features = self.cache.get(prepared.slot.key)
        if features is None:
            if prepared.image is None:
                raise ImageError("the image was released before it was encoded")
            features = self._encode(prepared.image, prepared.on_tile, tiled=prepared.tiled)
            if self.options.low_memory and hasattr(self.encoder, "release_memory"):
                self.encoder.release_memory()
            self.cache.put(prepared.slot.key, features)
            self.timings.n_images_encoded += 1
        if prepared.untiled_tokens is None:  # a OneVision image keeps its pixels: a later image re-views it
            prepared.image = None
        return features

    def feature_source(self, images: Sequence[PreparedImage]) -> FeatureSource:
        """For the scheduler: the features of those of ``images`` (a turn's views) it asks for."""
        by_key = {p.slot.key: p for p in images}
        return lambda slots: {slot.key: self.cached_features(by_key[slot.key]) for slot in slots}

    def scheduler(self, n_seq: int, *, size: int | None = None, unified: bool | None = None) -> Scheduler:
        """Answers generated together: ``n_seq`` sequences of a context of their own (``llm.scheduler``; ``size``
        positions, a stream per sequence or one ``unified`` pool), with this model's end-of-generation tokens
        and prompt cache. ``model.close()`` closes it if it is still open."""
        scheduler = Scheduler(self.runtime, n_seq, is_end=self.is_end_of_generation, size=size, unified=unified,
                              prompt_cache=self.prompt_cache)
        self._schedulers.add(scheduler)
        return scheduler

    def _encode(self, image: Image.Image, on_tile: TileCallback | None, *, tiled: bool = True) -> np.ndarray:
        """An image's packed features [n_tokens, d]; ``tiled``: OneVision's view (see `image_views`)."""
        start = time.perf_counter()
        tiles, size_hw = preprocess(image, self.settings, tiled=tiled)
        if on_tile is not None:
            on_tile(0, len(tiles))  # a new image: its progress starts (an encoder may report tiles in groups)
        features = self.encoder.encode(tiles, on_tile)  # [n_tiles, n_patches, d]
        if self.settings.image_mode in (ImageMode.ANYRES, ImageMode.ANYRES_MAX):
            newline = self.encoder.image_newline
            assert newline is not None  # checked at load
            packed = pack_image_features(features, size_hw, self.settings, newline, tiled=tiled)
        else:
            packed = features[0]
        expected = count_image_tokens(size_hw, self.settings, tiled=tiled)
        if len(packed) != expected:
            raise GGUFFormatError(f"packed {len(packed)} image features but the reference uses {expected}")
        # [n_tokens, d]
        self.timings.vision_encode_s += time.perf_counter() - start
        return packed

    def image_features(self, source: ImageSource) -> np.ndarray:
        """The packed features ``[n_image_tokens, llm_hidden]`` the LLM receives for an image."""
        return self.encode_image(self.prepare_image(source))

    def count_image_tokens(self, source: ImageSource) -> int:
        return self.prepare_image(source).slot.n_tokens

    # ------------------------------------------------------------------ prompts

    def render(self, messages: list[Message], system: str | None = None) -> str:
        """The prompt text for a conversation: the checkpoint's own chat template rendered as transformers
        renders it (``Template.CHECKPOINT``), else the named template."""
        if self.template is Template.CHECKPOINT:
            assert self.chat_template is not None  # checked at load
            return render_chat_template(self.chat_template, messages, system, self.special_tokens)
        return render(self.template, messages, system)

    def sequence(self, prompt: str, images: Sequence[PreparedImage], *, rendered: bool = True) -> list[Item]:
        """The prompt's token ids and image slots. ``rendered``: the text came from a template, so a BOS it
        opens with is not doubled (transformers' processor); a raw prompt gets the vocabulary's BOS as given.
        Every caller comes here: the images become the views the reference uses for them (`image_views`)."""
        images = self.image_views(images)
        self._pending.update({p.slot.key: p for p in images})
        return self._tokenize(prompt, images, rendered)

    def _tokenize(self, prompt: str, views: Sequence[PreparedImage], rendered: bool) -> list[Item]:
        return tokenize_prompt(self.runtime, prompt, [p.slot for p in views], self.tokenize_mode, self.image_token_id,
                               self.special_tokens.get("bos_token") if rendered else None)

    def prefill(self, items: list[Item], reserve: int = 0) -> None:
        """Make the KV cache hold exactly ``items``, reusing the longest cached prefix: the one in the
        context, or a longer one saved on disk by an earlier run (the prompt cache).

        The context is checked (and sized) before any image is encoded or token decoded.
        """
        needed = sequence_length(items) + reserve
        before = self.runtime.n_ctx
        self.runtime.ensure_context(needed)
        if self.runtime.n_ctx != before or self.runtime.n_past == 0:
            self._cached = []
        keep = common_prefix(self._cached, items)
        if keep == len(items):  # logits of the last position are needed again
            keep -= 1
        keep = self._restore_prefix(items, keep)
        self.runtime.truncate(sequence_length(items[:keep]))
        self._cached = items[:keep]
        keys = {item.key for item in items if isinstance(item, ImageSlot)}
        for item in items[keep:]:
            if isinstance(item, ImageSlot) and item.key not in self._features:
                self.encode_image(self._pending[item.key])
        # hold only the features this sequence uses; images restored with their prefix stay pending
        self._features = {k: v for k, v in self._features.items() if k in keys}
        self._pending = {k: v for k, v in self._pending.items() if k in keys and k not in self._features}
        # the prefix through the last image is what a follow-up question shares: save it once decoded
        save_at = max((i + 1 for i, item in enumerate(items) if isinstance(item, ImageSlot)), default=0)
        if self.prompt_cache is None or save_at <= keep or self.prompt_cache.has(items[:save_at]):
            save_at = keep
        start = time.perf_counter()
        try:
            self._decode_items(items[keep:save_at])
            if save_at > keep:
                assert self.prompt_cache is not None
                self.prompt_cache.save(items[:save_at], self.runtime.n_past, self.runtime.state_size(),
                                       self.runtime.save_state)
            self._decode_items(items[max(keep, save_at):])
        except BaseException:
            self._cached = []  # an interrupted decode leaves the cache unknown: the next prefill starts over
            raise
        self._cached = list(items)
        self.timings.prefill_s += time.perf_counter() - start
        self.timings.n_prompt_tokens = sequence_length(items)
        self.timings.n_prefilled = sequence_length(items[keep:])

    def _restore_prefix(self, items: list[Item], keep: int) -> int:
        """How many leading items the KV cache holds after trying the prompt cache for a longer prefix."""
        if self.prompt_cache is None:
            return keep
        hit = self.prompt_cache.find(items, longer_than=keep)
        if hit is None:
            return keep
        prefix = items[: hit.n_items]
        if hit.n_positions == sequence_length(prefix) and self.runtime.restore_state(hit.state, hit.n_positions):
            self.timings.n_restored = hit.n_positions
            return hit.n_items
        log.warning("llama.cpp refused a prompt cache entry; removed, the prompt is decoded instead")
        self.prompt_cache.discard_items(prefix)
        if self.runtime.n_past != sequence_length(items[:keep]):
            self._cached = []
            return 0  # the context was emptied trying
        return keep

    def _decode_items(self, items: list[Item]) -> None:
        """Decode runs of text tokens as one batch each, and each image's features as embeddings."""
        tokens: list[int] = []
        for item in items:
            if isinstance(item, ImageSlot):
                if tokens:
                    self.runtime.decode_tokens(tokens)
                    tokens = []
                self.runtime.decode_embeddings(self._features[item.key])
            else:
                tokens.append(item)
        if tokens:
            self.runtime.decode_tokens(tokens)

    def prompt_logits(self, prompt: str, images: Sequence[ImageSource] = ()) -> np.ndarray:
        """Final-position logits ``[n_vocab]`` of a raw prompt with one ``<image>`` per image."""
        prepared = [self.prepare_image(i) for i in images]
        self.prefill(self.sequence(prompt, prepared, rendered=False))
        return self.runtime.last_logits()

    def generate(self, items: list[Item], options: GenerationOptions = GenerationOptions()) -> Iterator[int]:
        """Prefill ``items`` and yield generated token ids until EOS, ``max_tokens`` or a stop."""
        self.prefill(items, reserve=options.max_tokens)
        sampler = Sampler(options.sampling)
        history = [i for i in items if isinstance(i, int)]
        start = time.perf_counter()
        self.timings.n_generated = 0
        try:
            for _ in range(options.max_tokens):
                token = sampler.sample(self.runtime.last_logits(), history)
                if self.is_end_of_generation(token):
                    break
                self.timings.n_generated += 1
                yield token
                history.append(token)
                self.runtime.decode_tokens([token])
                self._cached.append(token)
        finally:
            self.timings.decode_s += time.perf_counter() - start

    def stream_text(self, items: list[Item], options: GenerationOptions = GenerationOptions(),
                    tokens_out: list[int] | None = None) -> Iterator[str]:
        """Generated text, piece by piece, whole UTF-8 characters only, cut before any stop string."""
        stream = TextStream(self.runtime.token_bytes, options.stop)
        for token in self.generate(items, options):
            if tokens_out is not None:
                tokens_out.append(token)
            piece = stream.push(token)
            if piece:
                yield piece
            if stream.stopped:
                return
        piece = stream.finish()
        if piece:
            yield piece

    # ------------------------------------------------------------------ conversation

    def chat(self, system: str | None = None) -> Chat:
        return Chat(self, system)

    def ask(self, question: str, images: Sequence[ImageSource] = (), options: GenerationOptions = GenerationOptions(),
            on_tile: TileCallback | None = None) -> Iterator[str]:
        """Stream the answer to one question about ``images`` (a fresh conversation)."""
        return self.chat().send(question, images, options, on_tile)

    def close(self) -> None:
        for scheduler in list(getattr(self, "_schedulers", ())):
            scheduler.close()  # their contexts refer to the llama model
        close = getattr(getattr(self, "encoder", None), "close", None)
        if close is not None:
            close()  # libmtmd's context refers to the llama model: free it first
        self.runtime.close()


class Chat:
    """A multi-turn conversation whose earlier turns stay in the KV cache."""

    def __init__(self, model: LlavaModel, system: str | None = None) -> None:
        self.model = model
        self.system = system
        self.messages: list[Message] = []
        self.images: list[PreparedImage] = []
        self.last_prompt = ""
        self.last_items: list[Item] = []
        self.last_tokens: list[int] = []

    def clear(self) -> None:
        self.messages, self.images = [], []

    def prepare(self, text: str, images: Sequence[ImageSource] = (), on_tile: TileCallback | None = None,
                raw: bool = False) -> Turn:
        """The prompt of the conversation with a user message (and its images) added, as ``send`` would
        answer it; the conversation itself is unchanged."""
        model = self.model
        prepared = [model.prepare_image(i, on_tile) for i in images]
        if raw:
            prompt, message, all_images = text, None, prepared
        else:
            if prepared and "<image>" in text:
                raise PromptError("put the question alone: the images are placed before it (or use raw mode)")
            message = Message(Role.USER, user_text(text, len(prepared)))
            prompt = model.render([*self.messages, message], self.system)
            all_images = [*self.images, *prepared]
        views = model.image_views(all_images)  # OneVision's untiled views among several
        items = model._tokenize(prompt, views, rendered=not raw)
        return Turn(prompt, items, views, [v.slot.n_tokens for v in views[len(views) - len(prepared):]], message,
                    all_images)

    def send(self, text: str, images: Sequence[ImageSource] = (), options: GenerationOptions = GenerationOptions(),
             on_tile: TileCallback | None = None, raw: bool = False) -> Iterator[str]:
        """Add a user message (with its images) and stream the assistant's answer.

        The answer joins the history when the stream ends, also when it is stopped early.
        """
        model = self.model
        model.timings = Timings()
        turn = self.prepare(text, images, on_tile, raw)
        model._pending.update({p.slot.key: p for p in turn.views})
        model.timings.n_image_tokens = turn.n_image_tokens
        self.last_prompt, self.last_items, self.last_tokens = turn.prompt, turn.items, []
        answer: list[str] = []
        try:
            for piece in model.stream_text(turn.items, options, self.last_tokens):
                answer.append(piece)
                yield piece
        finally:
            if turn.message is not None:
                self.messages += [turn.message, Message(Role.ASSISTANT, "".join(answer).strip())]
                self.images = turn.images
