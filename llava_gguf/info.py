"""What a GGUF holds: architecture, types, tensors, vision settings, tokenizer, template."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import gguf

from llava_gguf.errors import GGUFFormatError
from llava_gguf.guess import guess_template
from llava_gguf.llm.templates import Template
from llava_gguf.metadata import ClipKeys, GGUFFields, Layout, LlavaKeys, VisionSettings, read_gguf

# whose answers the runtime reproduces for a checkpoint of each layout
REFERENCES = {
    Layout.LLAVA_HF.value: "transformers (LlavaForConditionalGeneration / LlavaNextForConditionalGeneration)",
    Layout.ORIGINAL.value: "the original LLaVA code (pinpoints as width x height, truncating unpad)",
}

_SUMMARY_KEYS = {
    "llama": [
        gguf.Keys.LLM.CONTEXT_LENGTH, gguf.Keys.LLM.EMBEDDING_LENGTH, gguf.Keys.LLM.BLOCK_COUNT,
        gguf.Keys.LLM.FEED_FORWARD_LENGTH, gguf.Keys.Attention.HEAD_COUNT, gguf.Keys.Attention.HEAD_COUNT_KV,
        gguf.Keys.Rope.FREQ_BASE, gguf.Keys.Attention.LAYERNORM_RMS_EPS,
    ],
    "clip": [
        gguf.Keys.ClipVision.IMAGE_SIZE, gguf.Keys.ClipVision.PATCH_SIZE, gguf.Keys.ClipVision.EMBEDDING_LENGTH,
        gguf.Keys.ClipVision.FEED_FORWARD_LENGTH, gguf.Keys.ClipVision.BLOCK_COUNT,
        gguf.Keys.ClipVision.PROJECTION_DIM, gguf.Keys.ClipVision.Attention.HEAD_COUNT,
        gguf.Keys.ClipVision.IMAGE_MEAN, gguf.Keys.ClipVision.IMAGE_STD, ClipKeys.FEATURE_LAYER,
        ClipKeys.IMAGE_GRID_PINPOINTS, ClipKeys.MM_PATCH_MERGE_TYPE, gguf.Keys.Clip.PROJECTOR_TYPE,
    ],
}


def describe_gguf(path: str | Path) -> dict[str, Any]:
    """A JSON-ready summary of a GGUF file."""
    reader = read_gguf(path)
    fields = GGUFFields(reader)
    arch = fields.get(gguf.Keys.General.ARCHITECTURE)
    arch_key = lambda key: key.format(arch=arch)  # noqa: E731
    types = Counter(t.tensor_type.name for t in reader.tensors)
    info: dict[str, Any] = {
        "path": str(path),
        "architecture": arch,
        "name": fields.get(gguf.Keys.General.NAME),
        "file_type": _file_type(fields.get(gguf.Keys.General.FILE_TYPE)),
        "tensor_count": len(reader.tensors),
        "tensor_bytes": int(sum(int(t.n_bytes) for t in reader.tensors)),
        "tensor_types": dict(types.most_common()),
        "hyperparameters": {
            arch_key(k): fields.get(arch_key(k)) for k in _SUMMARY_KEYS.get(str(arch), []) if fields.get(arch_key(k)) is not None
        },
        "llava_gguf": {k: fields.get(k) for k in fields.keys() if k.startswith("llava_gguf.")},
    }
    layout = fields.get(LlavaKeys.LAYOUT)
    if arch == "clip":
        try:
            settings = VisionSettings.read(reader)
        except GGUFFormatError as e:
            info["llava"] = {"error": str(e)}
        else:
            layout = settings.layout
            info["llava"] = {"version": settings.llava_version, "image_mode": settings.image_mode.value,
                             "description": settings.description,
                             "inferred": list(settings.inferred)}
    if layout is not None:
        info["reference"] = REFERENCES.get(layout, layout)
    if arch != "clip":
        tokens = fields.get(gguf.Keys.Tokenizer.LIST)
        info["tokenizer"] = {
            "model": fields.get(gguf.Keys.Tokenizer.MODEL),
            "tokens": len(tokens) if tokens else 0,
            "bos_token_id": fields.get(gguf.Keys.Tokenizer.BOS_ID),
            "eos_token_id": fields.get(gguf.Keys.Tokenizer.EOS_ID),
            "pad_token_id": fields.get(gguf.Keys.Tokenizer.PAD_ID),
            "add_bos_token": fields.get(gguf.Keys.Tokenizer.ADD_BOS),
        }
        info["tokenizer"]["pre"] = fields.get(gguf.Keys.Tokenizer.PRE)
        info["tokenizer"]["eos_token_ids"] = fields.get(LlavaKeys.EOS_TOKEN_IDS)
        info["template"], info["template_source"] = _template(fields, tokens)
        info["chat_template"] = fields.get(gguf.Keys.Tokenizer.CHAT_TEMPLATE)
    return info


def _template(fields: GGUFFields, tokens: list[str] | None) -> tuple[str | None, str | None]:
    """The template the runtime uses for this LLM, and where it comes from, in words."""
    named = fields.get(LlavaKeys.TEMPLATE)
    if named == Template.CHECKPOINT.value:
        return named, (f"the checkpoint's chat template ({gguf.Keys.Tokenizer.CHAT_TEMPLATE}), "
                       "rendered as transformers does")
    if named is not None:
        return named, f"the file's {LlavaKeys.TEMPLATE}"
    if not tokens:
        return None, None
    # another tool's file: the runtime's guess
    vocabulary = set(tokens)
    metadata = {key: fields.get(key) for key in fields.keys() if not key.startswith("tokenizer.ggml.")}
    guess = guess_template(metadata, vocabulary.__contains__)
    return f"{guess.template.value} (guessed from {guess.reason})", f"guessed from {guess.reason}"


def _file_type(value: int | None) -> str | None:
    if value is None:
        return None
    try:
        return gguf.LlamaFileType(value).name.replace("MOSTLY_", "").replace("ALL_", "")
    except ValueError:
        return str(value)
