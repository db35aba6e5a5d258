"""Tensor names: every checkpoint layout to one canonical spelling, then to GGUF names.

The canonical spelling is llava-hf's (transformers 4): ``vision_tower.vision_model.*``,
``multi_modal_projector.linear_{1,2}.*``, ``model.image_newline`` and a plain Llama
``model.*`` / ``lm_head.*`` for the language model. GGUF names then come from gguf-py's
own tensor map, except the LLaVA projector, whose ``linear_1`` is llama.cpp's ``mm.0``.
"""

from __future__ import annotations

from functools import lru_cache

import gguf

from llava_gguf.metadata import Layout

__all__ = ["Layout", "canonical_name", "gguf_name", "is_vision", "block_index"]


# (source prefix, canonical prefix or None to drop); the first matching prefix wins.
PREFIXES: dict[Layout, list[tuple[str, str | None]]] = {
    Layout.LLAVA_HF: [
        # transformers 4
        ("vision_tower.", "vision_tower."),
        ("multi_modal_projector.", "multi_modal_projector."),
        ("image_newline", "model.image_newline"),
        ("language_model.model.", "model."),
        ("language_model.lm_head.", "lm_head."),
        # transformers 5
        ("model.vision_tower.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.image_newline", "model.image_newline"),
        ("model.language_model.", "model."),
        ("lm_head.", "lm_head."),
    ],
    Layout.ORIGINAL: [
        ("model.vision_tower.vision_tower.", "vision_tower."),
        ("model.mm_projector.0.", "multi_modal_projector.linear_1."),  # mlp2x_gelu
        ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
        ("model.mm_projector.", "multi_modal_projector.linear_1."),  # linear
        ("model.image_newline", "model.image_newline"),
        ("model.", "model."),
        ("lm_head.", "lm_head."),
    ],
    Layout.CLIP: [
        ("vision_model.", "vision_tower.vision_model."),
        ("text_model.", None),
        ("visual_projection.", None),
        ("text_projection.", None),
        ("logit_scale", None),
    ],
}

_TOWER = "vision_tower.vision_model."
# Canonical names that llama.cpp has no use for.
DROPPED_SUFFIXES = ("position_ids", "rotary_emb.inv_freq")
# LLaVA reads an encoder layer's hidden state, so the tower's post-layernorm and SigLIP's attention-pooling
# head never run (transformers' get_image_features reads hidden_states[k], before both).
DROPPED_PREFIXES = ("vision_tower.vision_model.post_layernorm.", "vision_tower.vision_model.head.")

# The LLaVA projector is a Sequential(Linear, GELU, Linear): indices 0 and 2.
PROJECTOR = {
    "multi_modal_projector.linear_1": gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_MMPROJ].format(bid=0),
    "multi_modal_projector.linear_2": gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_MMPROJ].format(bid=2),
}


def canonical_name(name: str, layout: Layout) -> str | None:
    """The canonical spelling of a source tensor name, or None when it is dropped or unknown."""
    for source, canonical in PREFIXES[layout]:
        if name.startswith(source):
            if canonical is None:
                return None
            out = canonical + name[len(source) :]
            if out.startswith("vision_tower.") and not out.startswith(_TOWER):
                # transformers 5's save_pretrained drops CLIP's "vision_model." level
                out = _TOWER + out[len("vision_tower.") :]
            if out.endswith(DROPPED_SUFFIXES) or out.startswith(DROPPED_PREFIXES):
                return None
            return out
    return None


def is_vision(canonical: str) -> bool:
    return canonical.startswith(("vision_tower.", "multi_modal_projector.", "model.image_newline"))


@lru_cache(maxsize=8)
def _tensor_map(arch: gguf.MODEL_ARCH, n_blocks: int) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(arch, n_blocks)


def gguf_name(canonical: str, arch: gguf.MODEL_ARCH, n_blocks: int) -> str:
    """The GGUF tensor name of a canonical tensor name; KeyError when llama.cpp has none."""
    base, dot, suffix = canonical.rpartition(".")
    if base in PROJECTOR:
        return f"{PROJECTOR[base]}.{suffix}"
    name = _tensor_map(arch, n_blocks).get_name(canonical, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise KeyError(canonical)
    return name


def block_index(canonical: str) -> int | None:
    """The layer index of ``...layers.{i}...``, or None for tensors outside the blocks."""
    parts = canonical.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None
