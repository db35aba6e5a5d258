"""Tiny llava-hf checkpoints with a SigLIP vision tower (llava-interleave's layout: `LlavaForConditionalGeneration`
over a `SiglipVisionModel`, a `SiglipImageProcessor`), written as the Hub repos are, with their reference.

The LLM, tokenizer and weight drawing are `checkpoints.py`'s (read-only reuse).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from checkpoints import (
    IMAGE_TOKEN,
    PATCH_SIZE,
    SP_VOCAB_SIZE,
    _t4_config,
    _write_json,
    hf_tensors,
    make_exact_,
    randomize_,
    reference_tokenizer,
    save_safetensors,
    text_config,
    write_tokenizer_files,
)
from transformers import AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

SIGLIP_IMAGE_SIZE = 56
SIGLIP_MEAN = SIGLIP_STD = [0.5, 0.5, 0.5]
N_VISION_LAYERS = 3


@dataclass
class SiglipCheckpoint:
    """What `test_runtime.reference_run` reads of a `TinyCheckpoint`, for a SigLIP checkpoint."""

    path: Path
    model: torch.nn.Module  # transformers reference, float32, eval()
    tokenizer: Any
    image_processor: SiglipImageProcessorPil
    image_token_id: int
    layout: str = "llava-hf"
    llava_version: str = "1.5"

    @property
    def placeholder_id(self) -> int:
        return int(self.model.config.image_token_id)


def siglip_vision_config(image_size: int = SIGLIP_IMAGE_SIZE) -> SiglipVisionConfig:
    # vision_use_head (the default) keeps the attention-pooling head in the checkpoint, as the Hub's towers do
    return SiglipVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=N_VISION_LAYERS, num_attention_heads=4,
        image_size=image_size, patch_size=PATCH_SIZE, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
    )


def siglip_image_processor(image_size: int = SIGLIP_IMAGE_SIZE) -> SiglipImageProcessorPil:
    return SiglipImageProcessorPil(size={"height": image_size, "width": image_size}, resample=3,
                                   image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD, rescale_factor=1 / 255)


def siglip_preprocessor_config(image_size: int = SIGLIP_IMAGE_SIZE) -> dict[str, Any]:
    """preprocessor_config.json as google/siglip-so400m-patch14-384 and llava-interleave ship it."""
    return {
        "do_convert_rgb": None,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": SIGLIP_MEAN,
        "image_processor_type": "SiglipImageProcessor",
        "image_std": SIGLIP_STD,
        "processor_class": "LlavaProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"height": image_size, "width": image_size},
    }


def build_siglip_checkpoint(
    root: Path,
    sp_model_path: Path,
    *,
    feature_layer: int = -2,
    strategy: str = "default",
    exact_in: str | None = None,
    seed: int = 0,
) -> SiglipCheckpoint:
    """Write a tiny random SigLIP llava-hf checkpoint under ``root``; ``exact_in`` ("f16" / "q8_0") rounds the
    weights to values that storage holds losslessly (`checkpoints.make_exact_`)."""
    vision = siglip_vision_config()
    patches = (SIGLIP_IMAGE_SIZE // PATCH_SIZE) ** 2
    config = LlavaConfig(
        vision_config=vision, text_config=text_config("llama", SP_VOCAB_SIZE + 2, SP_VOCAB_SIZE + 1),
        image_token_index=SP_VOCAB_SIZE, vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy, projector_hidden_act="gelu", tie_word_embeddings=False,
        image_seq_length=patches - (1 if strategy == "default" else 0),
    )
    model = LlavaForConditionalGeneration(config).float().eval()
    randomize_(model, seed)  # a larger spread than the default init, so that any mistake shows
    if exact_in is not None:
        make_exact_(model, exact_in)
    path = root / f"siglip-{feature_layer}-{strategy}-{exact_in or 'f32'}-{seed}"
    path.mkdir(parents=True)
    save_safetensors(path, hf_tensors(model, 4), torch.float32, None)  # the Hub's transformers-4 spelling
    model.config.save_pretrained(str(path))
    written = {"architectures": ["LlavaForConditionalGeneration"], **json.loads((path / "config.json").read_text()),
               "dtype": "float32"}
    written.pop("transformers_version", None)
    _write_json(path / "config.json", _t4_config(written))
    _write_json(path / "generation_config.json",
                {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": SP_VOCAB_SIZE + 1})
    _write_json(path / "preprocessor_config.json", siglip_preprocessor_config())
    _write_json(path / "processor_config.json", {
        "image_token": IMAGE_TOKEN, "num_additional_image_tokens": 0, "patch_size": PATCH_SIZE,
        "processor_class": "LlavaProcessor", "vision_feature_select_strategy": strategy,
    })
    write_tokenizer_files(path, reference_tokenizer(sp_model_path, with_image_token=True), sp_model_path,
                          files="both", llava_hf=True, model_max_length=2048)
    return SiglipCheckpoint(path=path, model=model, tokenizer=AutoTokenizer.from_pretrained(str(path)),
                            image_processor=siglip_image_processor(), image_token_id=SP_VOCAB_SIZE)
