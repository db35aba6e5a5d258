"""The original LLaVA code (PyPI ``llava-torch``, installed with ``--no-deps``), the reference for
original-layout checkpoints, run on a tiny checkpoint's weights.

Its package ``__init__`` files import the LLaMA / MPT model classes, which do not import under
transformers 5, so ``llava`` and ``llava.model`` are registered as bare packages and only the
modules needed are loaded from them: ``llava.mm_utils`` (preprocessing, anyres geometry,
``tokenizer_image_token``), ``llava.conversation`` (``conv_templates``) and ``llava.model.llava_arch``
(``unpad_image`` and the packing in ``prepare_inputs_labels_for_multimodal``), with its CLIP
tower wrapper and projector builder.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import json
import sys
import types
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch
from checkpoints import TinyCheckpoint
from PIL import Image
from transformers import CLIPImageProcessorPil


def _bare_package(name: str, path: Path) -> None:
    if name not in sys.modules:
        module = types.ModuleType(name)
        module.__path__ = [str(path)]
        sys.modules[name] = module


def load_module(name: str) -> ModuleType:
    """``llava.<name>`` from the installed llava-torch, without its package ``__init__``s."""
    spec = importlib.machinery.PathFinder.find_spec("llava")  # the files, whatever sys.modules holds
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llava-torch is not installed: pip install --no-deps llava-torch==1.2.2.post1 (see the README)")
    root = Path(next(iter(spec.submodule_search_locations)))
    _bare_package("llava", root)
    _bare_package("llava.model", root / "model")
    return importlib.import_module(f"llava.{name}")


class _Model(torch.nn.Module):
    """What ``LlavaMetaForCausalLM.get_model()`` returns: tower, projector, newline, token embeddings."""

    def __init__(self, tower: torch.nn.Module, projector: torch.nn.Module, newline: torch.Tensor | None,
                 embed_tokens: torch.nn.Module) -> None:
        super().__init__()
        self.vision_tower = tower
        self.mm_projector = projector
        if newline is not None:
            self.image_newline = torch.nn.Parameter(newline.clone())
        self.embed_tokens = embed_tokens

    def get_vision_tower(self) -> torch.nn.Module:
        return self.vision_tower


class OriginalLlava:
    """The original code's image path and prompt assembly around the reference model's weights."""

    def __init__(self, ckpt: TinyCheckpoint) -> None:
        assert ckpt.layout == "original" and ckpt.clip_path is not None
        arch = load_module("model.llava_arch")
        self.mm_utils = load_module("mm_utils")
        tower_module = load_module("model.multimodal_encoder.clip_encoder")
        projector_module = load_module("model.multimodal_projector.builder")
        self.ckpt = ckpt
        self.config = SimpleNamespace(**json.loads((ckpt.path / "config.json").read_text()))
        tower = tower_module.CLIPVisionTower(str(ckpt.clip_path), args=self.config)  # LLaVA 1.5: the CLIP repo's tower
        # the Pillow processor is what transformers 4's CLIPImageProcessor was
        tower.image_processor = CLIPImageProcessorPil.from_pretrained(str(ckpt.clip_path))
        reference = ckpt.model.model
        if ckpt.llava_version == "1.6":  # LLaVA 1.6 fine-tuned its tower: the checkpoint's weights
            tower.vision_tower.load_state_dict(reference.vision_tower.state_dict())
        projector = projector_module.build_vision_projector(self.config)
        weights = reference.multi_modal_projector.state_dict()
        projector.load_state_dict({k.replace("linear_1", "0").replace("linear_2", "2"): v for k, v in weights.items()})
        newline = reference.image_newline.detach() if ckpt.llava_version == "1.6" else None
        model = _Model(tower, projector, newline, reference.language_model.embed_tokens).float().eval()
        self.image_processor = tower.image_processor

        class Harness(arch.LlavaMetaForCausalLM):
            config = self.config
            device = torch.device("cpu")

            def get_model(self) -> Any:
                return model

        self.harness = Harness()
        self.harness.model = model  # the original code also reaches it as self.model
        self.unpad_image = arch.unpad_image

    def pixels(self, images: list[Image.Image]) -> Any:
        return self.mm_utils.process_images(images, self.image_processor, self.config)

    def input_ids(self, prompt: str) -> list[int]:
        return self.mm_utils.tokenizer_image_token(prompt, self.ckpt.tokenizer)

    @torch.no_grad()
    def embeddings(self, prompt: str, images: list[Image.Image]) -> torch.Tensor:
        """The LLM's input rows [n, d]: text embeddings with each image's packed features in place."""
        ids = torch.tensor([self.input_ids(prompt)])
        pixels = self.pixels(images) if images else None
        if isinstance(pixels, torch.Tensor) and pixels.ndim == 5:
            pixels = list(pixels)  # anyres: one [n_tiles, 3, h, w] per image
        sizes = [image.size for image in images]  # (width, height), as the original CLI passes them
        out = self.harness.prepare_inputs_labels_for_multimodal(ids, None, None, None, None, pixels, image_sizes=sizes)
        return out[4][0]

    @torch.no_grad()
    def image_features(self, image: Image.Image) -> torch.Tensor:
        """One image's packed features as the original feeds them to the LLM: [n_image_tokens, d]."""
        embeds = self.embeddings("<image>", [image])
        return embeds[1:]  # after the BOS row

    @torch.no_grad()
    def generate(self, prompt: str, images: list[Image.Image], max_new: int = 16) -> tuple[Any, list[int]]:
        """(final logits [n_vocab], greedy tokens) of the reference LLM on the original's embeddings."""
        embeds = self.embeddings(prompt, images)[None]
        lm = self.ckpt.model
        out = lm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                          max_new_tokens=max_new, do_sample=False, eos_token_id=2, pad_token_id=0,
                          output_logits=True, return_dict_in_generate=True)
        tokens = out.sequences[0].tolist()
        if 2 in tokens:
            tokens = tokens[: tokens.index(2)]
        return out.logits[0][0].numpy(), tokens
