"""A prompt as the LLM sees it: token ids with image slots where each image's features go,
tokenized as the reference does."""

from __future__ import annotations

from dataclasses import dataclass

from llava_gguf.errors import PromptError
from llava_gguf.llm.llama import LlamaRuntime
from llava_gguf.llm.templates import IMAGE_PLACEHOLDER
from llava_gguf.metadata import TokenizeMode

# LLaVA's own code marks an image's place in input_ids with this value.
IMAGE_TOKEN_INDEX = -200


@dataclass(frozen=True)
class ImageSlot:
    """An image's place in the sequence: its feature-cache key and how many positions it fills."""

    key: str
    n_tokens: int


Item = int | ImageSlot


def tokenize_prompt(
    runtime: LlamaRuntime, prompt: str, images: list[ImageSlot], mode: TokenizeMode, image_token_id: int | None,
    bos_text: str | None = None,
) -> list[Item]:
    """``prompt`` with one ``<image>`` per image, as a sequence of token ids and image slots.

    ``WHOLE`` (llava-hf): the whole prompt at once, ``<image>`` being a special token.
    ``SPLIT`` (original LLaVA, ``tokenizer_image_token``): each text chunk between images on its
    own, every chunk but the first without its BOS.

    Special tokens in the text are parsed (a template's ``<|eot_id|>`` is one token). The vocabulary's BOS
    (``add_bos``) is added unless the text already opens with it (``bos_text``, e.g. a chat template that
    writes ``{{ bos_token }}``): transformers' processor then tokenizes with ``add_special_tokens=False``
    (``ProcessorMixin.apply_chat_template``), so there is one BOS, never two.
    """
    add_bos = runtime.add_bos and not (bos_text and prompt.startswith(bos_text))
    n_placeholders = prompt.count(IMAGE_PLACEHOLDER)
    if n_placeholders != len(images):
        raise PromptError(f"the prompt has {n_placeholders} <image> placeholder(s) but {len(images)} image(s) were given")
    if mode is TokenizeMode.WHOLE and image_token_id is not None:
        tokens = runtime.tokenize(prompt, add_bos=add_bos, special=True)
        n_image_tokens = tokens.count(image_token_id)
        if n_image_tokens != len(images):
            raise PromptError(
                f"{runtime.path.name}: the prompt's {len(images)} {IMAGE_PLACEHOLDER} placeholder(s) became "
                f"{n_image_tokens} image token(s) (id {image_token_id}) once tokenized, so image(s) would be "
                "dropped; the GGUF's tokenizer does not keep <image> whole: re-convert the checkpoint with llava-gguf"
            )
        queue = iter(images)
        return [next(queue) if t == image_token_id else t for t in tokens]
    chunks = prompt.split(IMAGE_PLACEHOLDER)
    items: list[Item] = list(runtime.tokenize(chunks[0], add_bos=add_bos, special=True))
    for image, chunk in zip(images, chunks[1:]):
        items.append(image)
        items.extend(runtime.tokenize(chunk, add_bos=False, special=True))
    return items


def sequence_length(items: list[Item]) -> int:
    return sum(item.n_tokens if isinstance(item, ImageSlot) else 1 for item in items)


def common_prefix(a: list[Item], b: list[Item]) -> int:
    """How many leading items ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def display_ids(items: list[Item]) -> list[int]:
    """Token ids with each image shown as one ``IMAGE_TOKEN_INDEX``, as LLaVA's code shows them."""
    return [IMAGE_TOKEN_INDEX if isinstance(item, ImageSlot) else item for item in items]
