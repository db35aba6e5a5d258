"""A tiny llava-hf LLaVA-OneVision checkpoint (`LlavaOnevisionForConditionalGeneration`: a SigLIP 384/14 tower,
"full" features of the last layer, a Qwen2 LLM with q/k/v biases, "anyres_max_9", the real pinpoints and
``image_newline``), written as llava-hf/llava-onevision-qwen2-*-ov-hf ship it, with its reference processor.

The Qwen2 LLM, tokenizer and weight drawing are `checkpoints.py`'s (read-only reuse). The tower keeps the real
geometry (384 px tiles of 27x27 patches) at tiny widths, so that tiling, unpadding and the downscale are real.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from checkpoints import (
    IMAGE_TOKEN,
    QWEN2_BIAS_STD,
    QWEN2_PROCESSOR_TEMPLATE,
    ByteLevelTokenizer,
    _redraw_attention_biases_,
    _t4_config,
    _unused_sliding_window,
    _write_json,
    family_text_config,
    hf_tensors,
    make_exact_,
    randomize_,
    save_safetensors,
    train_qwen2_bpe,
    write_qwen2_tokenizer,
)
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    SiglipVisionConfig,
)

from llava_gguf.packing_onevision import ONEVISION_PINPOINTS

TILE = 384
PATCH = 14
N_IMAGE_TOKENS = (TILE // PATCH) ** 2  # 729 per tile with "full"
VISION_ASPECT_RATIO = "anyres_max_9"
# llava-hf/llava-onevision-qwen2-*-ov-hf preprocessor_config.json (pinpoints as (height, width) lists)
PREPROCESSOR_CONFIG: dict[str, Any] = {
    "image_processor_type": "LlavaOnevisionImageProcessor",
    "processor_class": "LlavaOnevisionProcessor",
    "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
    "image_grid_pinpoints": [list(p) for p in ONEVISION_PINPOINTS],
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "resample": 3, "rescale_factor": 1 / 255, "size": {"height": TILE, "width": TILE},
}  # fmt: skip


@dataclass
class OnevisionCheckpoint:
    path: Path
    model: LlavaOnevisionForConditionalGeneration  # transformers reference, float32, eval()
    processor: LlavaOnevisionProcessor
    image_token_id: int


def onevision_vision_config() -> SiglipVisionConfig:
    """SigLIP-so400m's geometry (384 px, patch 14: 27x27 patches, the last 6 pixels unused) at tiny widths."""
    return SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=TILE,
        patch_size=PATCH, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", vision_use_head=False,
    )


def onevision_processor(path: Path) -> LlavaOnevisionProcessor:
    """The checkpoint's processor as `AutoProcessor` builds it, less the video processor: that class needs
    torchvision (absent here), and without it the video argument check fails even for None."""
    check = LlavaOnevisionProcessor.check_argument_for_proper_class

    def check_but_video(self: LlavaOnevisionProcessor, name: str, argument: object) -> object:
        return None if name == "video_processor" else check(self, name, argument)

    config = json.loads((path / "processor_config.json").read_text())
    template = json.loads((path / "chat_template.json").read_text())["chat_template"]
    with mock.patch.object(LlavaOnevisionProcessor, "check_argument_for_proper_class", check_but_video):
        return LlavaOnevisionProcessor(
            image_processor=LlavaOnevisionImageProcessorPil.from_pretrained(str(path)),
            tokenizer=AutoTokenizer.from_pretrained(str(path)), chat_template=template,
            num_image_tokens=config["num_image_tokens"],
            vision_feature_select_strategy=config["vision_feature_select_strategy"],
            vision_aspect_ratio=config["vision_aspect_ratio"],
        )  # fmt: skip


def build_onevision_checkpoint(
    root: Path, *, seed: int = 0, bpe: ByteLevelTokenizer | None = None, exact_in: str | None = None
) -> OnevisionCheckpoint:
    """Write a tiny random OneVision checkpoint under ``root``; ``exact_in`` ("f16" / "q8_0") rounds the weights to
    values that storage holds losslessly (`checkpoints.make_exact_`); ``bpe`` reuses a trained Qwen2 tokenizer."""
    bpe = bpe or train_qwen2_bpe(root / "qwen2-bpe")
    ids = bpe.ids
    image_id = ids[IMAGE_TOKEN]
    vocab_size = -(-bpe.vocab_size // 32) * 32 + 32  # rows past the tokens, as Qwen2's 151936 for 151646
    eos = pad = ids["<|endoftext|>"]
    generation = {"bos_token_id": eos, "eos_token_id": [ids["<|im_end|>"], eos], "pad_token_id": pad}
    config = LlavaOnevisionConfig(
        vision_config=onevision_vision_config(),
        text_config=family_text_config("qwen2", vocab_size, bos=None, eos=eos, pad=pad),
        image_token_index=image_id, vision_feature_layer=-1, vision_feature_select_strategy="full",
        vision_aspect_ratio=VISION_ASPECT_RATIO, image_grid_pinpoints=[list(p) for p in ONEVISION_PINPOINTS],
        projector_hidden_act="gelu", tie_word_embeddings=False,
    )  # fmt: skip
    model = LlavaOnevisionForConditionalGeneration(config).float().eval()
    randomize_(model, seed)  # a larger spread than the default init, so that any mistake shows
    _redraw_attention_biases_(model, seed, QWEN2_BIAS_STD)
    if exact_in is not None:
        make_exact_(model, exact_in)
    model.generation_config = GenerationConfig(**generation)  # the reference stops where the files say

    path = root / f"llava-onevision-qwen2-{exact_in or 'f32'}-{seed}"
    path.mkdir(parents=True)
    save_safetensors(path, hf_tensors(model, 4), torch.float32, None)  # the Hub's transformers-4 spelling
    model.config.save_pretrained(str(path))
    written = {"architectures": ["LlavaOnevisionForConditionalGeneration"],
               **json.loads((path / "config.json").read_text()), "dtype": "float32"}  # fmt: skip
    written.pop("transformers_version", None)
    _write_json(path / "config.json", _t4_config(written))
    _unused_sliding_window(path / "config.json")
    _write_json(path / "generation_config.json", generation)
    _write_json(path / "preprocessor_config.json", PREPROCESSOR_CONFIG)
    _write_json(path / "processor_config.json", {
        "image_token": IMAGE_TOKEN, "num_image_tokens": N_IMAGE_TOKENS, "processor_class": "LlavaOnevisionProcessor",
        "video_token": "<video>", "vision_aspect_ratio": VISION_ASPECT_RATIO, "vision_feature_select_strategy": "full",
    })  # fmt: skip
    write_qwen2_tokenizer(path, bpe)
    _write_json(path / "chat_template.json", {"chat_template": QWEN2_PROCESSOR_TEMPLATE})
    return OnevisionCheckpoint(path=path, model=model, processor=onevision_processor(path), image_token_id=image_id)
