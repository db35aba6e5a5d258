"""Tokenization of the converted GGUF against the reference tokenizer, for every arrangement of
tokenizer files: token types as sentencepiece has them, ``<image>`` kept whole, text after special
tokens as the reference gives it; an image never silently dropped."""

from __future__ import annotations

from collections.abc import Callable

import gguf
import numpy as np
import pytest
from checkpoints import IMAGE_TOKEN, TinyCheckpoint
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from test_runtime import EXACT, GREEDY, random_image, reference_run

from llava_gguf.convert import ConvertOptions, ConvertResult, MmprojType, Quant, convert_checkpoint
from llava_gguf.errors import PromptError
from llava_gguf.llm.llama import LlamaRuntime
from llava_gguf.llm.templates import Message, Role, user_text
from llava_gguf.metadata import GGUFFields, LlavaKeys, read_gguf
from llava_gguf.model import LlavaModel

ARRANGEMENTS = [
    pytest.param(("llava-hf", "both"), id="hf-model+json"),
    pytest.param(("llava-hf", "json"), id="hf-json"),
    pytest.param(("llava-hf", "model"), id="hf-model"),
    pytest.param(("llava-hf", "model-user-defined"), id="hf-model-user-defined"),
    pytest.param(("llava-hf", "added-tokens-json"), id="hf-added-tokens-json"),
    pytest.param(("original", "model"), id="orig-model"),
    pytest.param(("original", "model-user-defined"), id="orig-model-user-defined"),
]
STRINGS = [
    "USER: <image>\nWhat is in this image? ASSISTANT:",
    "<image>\nDescribe it.",
    "A chat. USER: <image>\nWhat? ASSISTANT: A cat.</s>USER: And the colour? ASSISTANT:",
    "[INST] <image>\nWhat is shown? [/INST] A dog </s>[INST] Why? [/INST]",
    "<s>hi</s> there</s>\nnext",
    "café naïve 日本語 😀 — 12345 6789",
    "digits 0 1 12 123 1234567890 3.14159 and\ttabs\n\nnewlines  trailing  ",
    "unseen ☃ ∑ ζ characters <im_start> <imag",
]


@pytest.fixture(scope="module")
def arranged(tiny_checkpoint: Callable[..., TinyCheckpoint], tmp_path_factory: pytest.TempPathFactory):
    cache: dict[tuple, tuple[TinyCheckpoint, ConvertResult, LlamaRuntime]] = {}

    def make(case: tuple) -> tuple[TinyCheckpoint, ConvertResult, LlamaRuntime]:
        if case not in cache:
            layout, files = case
            ckpt = tiny_checkpoint(llava_version="1.5", layout=layout, tokenizer_files=files)
            out = tmp_path_factory.mktemp("gguf-tokenizer")
            result = convert_checkpoint(ckpt.path, out, ConvertOptions(quant=Quant.F32, mmproj_type=MmprojType.F32))
            cache[case] = ckpt, result, LlamaRuntime(result.llm)
        return cache[case]

    return make


@pytest.mark.parametrize("case", ARRANGEMENTS)
def test_tokenization_equals_the_reference(arranged, case) -> None:
    ckpt, _, runtime = arranged(case)
    for text in STRINGS:
        if ckpt.layout == "original" and IMAGE_TOKEN in text and "user-defined" not in case[1]:
            text = text.replace(IMAGE_TOKEN, "")  # the original code never tokenizes <image>: it splits on it
        if case[1] == "added-tokens-json" and text.startswith(IMAGE_TOKEN):
            # a string that opens with a non-special added token: transformers 4 (whose added_tokens.json
            # this is) keeps a lone "▁" before it, as we do; the emulation on transformers 5 drops it
            continue
        assert runtime.tokenize(text, add_bos=True) == list(ckpt.tokenizer(text)["input_ids"]), text


@pytest.mark.parametrize("case", ARRANGEMENTS)
def test_token_types_follow_sentencepiece(arranged, case) -> None:
    ckpt, result, _ = arranged(case)
    fields = GGUFFields(read_gguf(result.llm))
    tokens = [t.decode() if isinstance(t, bytes) else t for t in fields.get(gguf.Keys.Tokenizer.LIST)]
    types = list(fields.get(gguf.Keys.Tokenizer.TOKEN_TYPE))
    if (ckpt.path / "tokenizer.model").is_file():
        proto = sp_pb2.ModelProto()
        proto.ParseFromString((ckpt.path / "tokenizer.model").read_bytes())
        for i, piece in enumerate(proto.pieces):  # sentencepiece's and llama.cpp's type numbers agree
            assert (tokens[i], types[i]) == (piece.piece, piece.type), i
    if ckpt.layout == "llava-hf":
        image = tokens.index(IMAGE_TOKEN)
        assert image == ckpt.image_token_id
        assert types[image] in (gguf.TokenType.USER_DEFINED, gguf.TokenType.CONTROL)
    if case[1] == "model-user-defined":
        assert types[tokens.index(IMAGE_TOKEN)] == gguf.TokenType.USER_DEFINED


def test_space_after_special_is_recorded(arranged) -> None:
    """Legacy (tokenizer.json's Prepend normalizer) vs non-legacy (tokenizer_config legacy=false)."""
    expected = {("llava-hf", "both"): True, ("llava-hf", "model"): False, ("original", "model"): False}
    for case, value in expected.items():
        _, result, _ = arranged(case)
        assert GGUFFields(read_gguf(result.llm)).get(LlavaKeys.SPACE_AFTER_SPECIAL) is value


@pytest.mark.parametrize("files", ["model-user-defined", "added-tokens-json", "model"])
def test_image_reaches_the_model(tiny_checkpoint, tmp_path_factory, files: str) -> None:
    """An <image> that only tokenizer.model (or added_tokens.json) names: answers as the reference."""
    ckpt = tiny_checkpoint(llava_version="1.5", layout="llava-hf", tokenizer_files=files)
    out = tmp_path_factory.mktemp("gguf-image")
    result = convert_checkpoint(ckpt.path, out, ConvertOptions(quant=Quant.F32, mmproj_type=MmprojType.F32))
    model = LlavaModel(result.llm, result.mmproj, EXACT)
    image = random_image(90, 50, seed=11)
    prompt = model.render([Message(Role.USER, user_text("What is in the picture?", 1))])
    ref_logits, ref_tokens, _ = reference_run(ckpt, prompt, [image])
    assert np.abs(model.prompt_logits(prompt, [image]) - ref_logits).max() <= 2e-3
    chat = model.chat()
    "".join(chat.send("What is in the picture?", [image], GREEDY))
    assert chat.last_tokens == ref_tokens
    assert sum(1 for item in chat.last_items if not isinstance(item, int)) == 1


def test_an_image_token_the_tokenizer_never_makes_is_an_error(arranged) -> None:
    """A file whose recorded image token id is not what the tokenizer makes of <image>."""
    _, result, _ = arranged(("llava-hf", "both"))
    model = LlavaModel(result.llm, result.mmproj, EXACT)
    model.image_token_id = 5  # as a file converted with a tokenizer that split <image> would say
    with pytest.raises(PromptError, match=r"<image> placeholder\(s\) became 0 image token\(s\).*re-convert"):
        model.sequence("USER: <image>\nWhat? ASSISTANT:", [model.prepare_image(random_image(20, 20, seed=1))])
