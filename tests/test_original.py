"""Original-layout checkpoints against the original LLaVA code (llava-torch): anyres geometry where it
differs from transformers (pinpoint order on ties, unpad rounding) and where it agrees, packed
features, logits and greedy answers on the same weights, and the conversation templates."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from checkpoints import TinyCheckpoint
from original_llava import OriginalLlava, load_module
from test_runtime import EXACT, GREEDY, random_image

from llava_gguf.convert import ConvertOptions, MmprojType, Quant, convert_checkpoint
from llava_gguf.llm.templates import Message, Role, Template, render, user_text
from llava_gguf.metadata import ImageMode, Layout, VisionSettings
from llava_gguf.model import LlavaModel
from llava_gguf.packing import count_image_tokens

REAL_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # liuhaotian's config.json
# (width, height): both sides <= 336 (pinpoint tie), 1-px thin, sizes whose unpad rounding differs, ordinary
DIFFERING_SIZES = [(200, 300), (336, 336), (1, 1), (300, 200), (1, 1009), (1009, 1)]
ROUNDING_SIZES_HW = [(47, 1128), (110, 352), (205, 656), (328, 861), (396, 704), (752, 1598), (1128, 47), (704, 396)]
ORDINARY_SIZES = [(640, 480), (1000, 700), (337, 900), (2000, 1500), (500, 500), (123, 456)]


def real_settings(layout: Layout) -> VisionSettings:
    return VisionSettings(
        llava_version="1.6", layout=layout.value, image_mode=ImageMode.ANYRES, image_size=336, patch_size=14,
        shortest_edge=336, crop_size=(336, 336), image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
        image_grid_pinpoints=tuple((a, b) for a, b in REAL_PINPOINTS), mm_patch_merge_type="spatial_unpad",
    )


def original_token_count(size_wh: tuple[int, int]) -> int:
    """Image positions the original code gives a CLIP-L/336 LLaVA 1.6 image (its own geometry functions)."""
    mm_utils = load_module("mm_utils")
    arch = load_module("model.llava_arch")
    cols, rows = mm_utils.get_anyres_image_grid_shape(size_wh, REAL_PINPOINTS, 336)
    grid = torch.zeros(1, rows * 24, cols * 24)  # [d, rows*h, cols*w] as packed before unpadding
    height, width = arch.unpad_image(grid, size_wh).shape[1:]
    return 576 + height * (width + 1)


@pytest.mark.parametrize("size_wh", DIFFERING_SIZES + ORDINARY_SIZES)
def test_token_counts_follow_the_original_code(size_wh: tuple[int, int]) -> None:
    width, height = size_wh
    assert count_image_tokens((height, width), real_settings(Layout.ORIGINAL)) == original_token_count(size_wh)


def test_the_two_references_differ_where_expected() -> None:
    """The cases the original rules exist for: llava-hf files keep transformers' counts there."""
    hf, orig = real_settings(Layout.LLAVA_HF), real_settings(Layout.ORIGINAL)
    assert count_image_tokens((300, 200), hf) == 984 and count_image_tokens((300, 200), orig) == 1476
    # where x * scale lands just below a whole number, truncation and transformers' rounding part ways
    # (52 such (height, width) up to 2000 px a side, same grid in both; these are some of them)
    for h, w in ROUNDING_SIZES_HW:
        assert count_image_tokens((h, w), hf) != count_image_tokens((h, w), orig)
        assert count_image_tokens((h, w), orig) == original_token_count((w, h))
    for w, h in ORDINARY_SIZES:
        assert count_image_tokens((h, w), hf) == count_image_tokens((h, w), orig)


# ---------------------------------------------------------------- tiny checkpoints

ORIGINAL_CASES = [
    pytest.param(("1.6", "llama"), id="orig-1.6-llama"),
    pytest.param(("1.6", "mistral"), id="orig-1.6-mistral"),
    pytest.param(("1.5", "llama"), id="orig-1.5-llama"),
]
# (width, height) for a 56 px tile: both sides <= 56 (tie: the original lays the tiles out tall),
# thin, square tile, and sizes where both references agree
TINY_SIZES = [(40, 30), (56, 56), (30, 50), (1, 1), (1, 170), (90, 50), (400, 300)]


@pytest.fixture(scope="module")
def original_pair(tiny_checkpoint: Callable[..., TinyCheckpoint], tmp_path_factory: pytest.TempPathFactory):
    cache: dict[tuple, tuple[TinyCheckpoint, LlavaModel, OriginalLlava]] = {}

    def make(case: tuple) -> tuple[TinyCheckpoint, LlavaModel, OriginalLlava]:
        if case not in cache:
            version, llm = case
            ckpt = tiny_checkpoint(llava_version=version, layout="original", llm=llm)
            out = tmp_path_factory.mktemp("gguf-original")
            result = convert_checkpoint(ckpt.path, out, ConvertOptions(quant=Quant.F32, mmproj_type=MmprojType.F32))
            cache[case] = ckpt, LlavaModel(result.llm, result.mmproj, EXACT), OriginalLlava(ckpt)
        return cache[case]

    return make


@pytest.mark.parametrize("case", ORIGINAL_CASES)
@pytest.mark.parametrize("size_wh", TINY_SIZES)
def test_packed_features_match_the_original_code(original_pair, case, size_wh) -> None:
    _, model, original = original_pair(case)
    image = random_image(*size_wh, seed=sum(size_wh))
    ours = model.image_features(image)
    ref = original.image_features(image).numpy()
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-3


@pytest.mark.parametrize("case", ORIGINAL_CASES)
@pytest.mark.parametrize("sizes", [[(40, 30)], [(56, 56), (30, 50)]], ids=["one-image", "two-images"])
def test_logits_and_greedy_answer_match_the_original_code(original_pair, case, sizes) -> None:
    _, model, original = original_pair(case)
    images = [random_image(*wh, seed=7 + i) for i, wh in enumerate(sizes)]
    question = "What is in the picture?"
    prompt = model.render([Message(Role.USER, user_text(question, len(images)))])
    ref_logits, ref_tokens = original.generate(prompt, images)
    ours = model.prompt_logits(prompt, images)
    assert np.abs(ours - ref_logits).max() <= 2e-3
    chat = model.chat()
    "".join(chat.send(question, images, GREEDY))
    assert chat.last_prompt == prompt
    assert chat.last_tokens == ref_tokens


# ---------------------------------------------------------------- templates

TEMPLATE_NAMES = {
    Template.VICUNA_V1: "vicuna_v1",
    Template.LLAVA_V1: "llava_v1",
    Template.LLAVA_LLAMA_2: "llava_llama_2",
    Template.MISTRAL_INSTRUCT: "mistral_instruct",
    Template.CHATML_DIRECT: "chatml_direct",
    Template.PLAIN: "plain",
}


@pytest.mark.parametrize(("template", "n_turns"), [
    (t, n) for t in TEMPLATE_NAMES for n in (1, 2, 3)
    if t is not Template.PLAIN or n == 1  # conv_llava_plain has no sep2: the original cannot render answers
])
def test_templates_render_as_conv_templates(template: Template, n_turns: int) -> None:
    conversation = load_module("conversation")
    conv = conversation.conv_templates[TEMPLATE_NAMES[template]].copy()
    turns = [("What is in the picture?", "A cat on a mat."), ("What colour is it?", "Grey."), ("Why?", "")]
    messages: list[Message] = []
    for i, (question, answer) in enumerate(turns[:n_turns]):
        text = user_text(question, 1 if i == 0 else 0)
        conv.append_message(conv.roles[0], text)
        messages.append(Message(Role.USER, text))
        last = i == n_turns - 1
        conv.append_message(conv.roles[1], None if last else answer)
        if not last:
            messages.append(Message(Role.ASSISTANT, answer))
    assert render(template, messages) == conv.get_prompt()
