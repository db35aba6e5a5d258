"""Reading a LLaVA checkpoint's configuration, whatever its layout.

Two layouts exist: llava-hf (transformers' ``LlavaForConditionalGeneration`` /
``LlavaNextForConditionalGeneration``, with ``text_config`` and ``vision_config``) and the
original one (liuhaotian's ``LlavaLlamaForCausalLM`` / ``LlavaMistralForCausalLM``: a flat LLM
config with ``mm_*`` fields, whose CLIP configuration lives in the repo ``mm_vision_tower`` names).
Both become one `LlavaCheckpoint`. Field names are Hugging Face's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from llava_gguf.convert.names import Layout
from llava_gguf.errors import CheckpointError
from llava_gguf.metadata import ImageMode, SelectStrategy, TokenizeMode, VisionSettings
from llava_gguf.templates import Template

log = logging.getLogger(__name__)

LLAVA_HF_ARCHITECTURES = {"LlavaForConditionalGeneration": "1.5", "LlavaNextForConditionalGeneration": "1.6"}
ORIGINAL_ARCHITECTURES = {"LlavaLlamaForCausalLM": "llama", "LlavaMistralForCausalLM": "mistral"}
SUPPORTED_TEXT_MODELS = ("llama", "mistral")

# transformers' defaults for fields a config may leave out (LlamaConfig, MistralConfig, CLIPVisionConfig)
TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048, vocab_size=32000,
        tie_word_embeddings=False,
    ),
    "mistral": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=4096 * 32,
        vocab_size=32000, tie_word_embeddings=False,
    ),
}
VISION_DEFAULTS: dict[str, Any] = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    image_size=224, patch_size=32, layer_norm_eps=1e-5, hidden_act="quick_gelu", projection_dim=512,
)
LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class TextConfig:
    """The language model's hyperparameters (LlamaConfig / MistralConfig names)."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    vocab_size: int
    tie_word_embeddings: bool = False
    head_dim: int | None = None
    rope_scaling: dict[str, Any] | None = None
    name_or_path: str = ""

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class VisionConfig:
    """The CLIP vision tower's hyperparameters (CLIPVisionConfig names)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    layer_norm_eps: float
    hidden_act: str
    projection_dim: int


@dataclass(frozen=True)
class LlavaCheckpoint:
    """Everything the converter needs to know about a checkpoint, before reading any weight."""

    path: Path
    layout: Layout
    llava_version: str
    text: TextConfig
    vision: VisionConfig
    settings: VisionSettings
    projector_type: str  # "mlp2x_gelu" or "linear"
    template: Template
    tokenize_mode: TokenizeMode
    image_token_id: int | None
    clip_path: Path | None  # the CLIP repo (original layout): its config, and LLaVA 1.5's tower weights
    clip_weights_from_repo: bool  # True when the tower's weights come from clip_path
    name: str


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError(f"{path} is missing") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_checkpoint(path: Path, resolve_repo: Callable[[str], Path] | None = None) -> LlavaCheckpoint:
    """Read a checkpoint directory's configuration.

    ``resolve_repo`` turns the original layout's ``mm_vision_tower`` (a Hub id or a local path)
    into a local directory; without it only local paths are accepted.
    """
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; give a checkpoint directory or a Hub repo id")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{path} is not a Hugging Face checkpoint: it has no config.json")
    config = read_json(config_path)
    architectures = config.get("architectures") or []
    arch = architectures[0] if architectures else config.get("model_type", "?")
    if "mm_vision_tower" in config:
        return _read_original(path, config, arch, resolve_repo)
    if arch in LLAVA_HF_ARCHITECTURES or config.get("model_type") in ("llava", "llava_next"):
        return _read_llava_hf(path, config, arch)
    if "llava" in str(arch).lower() or "llava" in str(config.get("model_type", "")).lower():
        raise CheckpointError(
            f"{path}: unsupported LLaVA architecture {arch!r}; supported: "
            f"{', '.join([*LLAVA_HF_ARCHITECTURES, *ORIGINAL_ARCHITECTURES])}"
        )
    raise CheckpointError(f"{path} is not a LLaVA checkpoint (architecture {arch!r})")


def _with_defaults(cls: type, defaults: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    merged = {**defaults, **{k: v for k, v in config.items() if k in names and v is not None}}
    return {k: v for k, v in merged.items() if k in names}


def _text_config(config: dict[str, Any], where: Path) -> TextConfig:
    model_type = config.get("model_type", "llama")
    if model_type in ("llava_llama", "llava"):
        model_type = "llama"
    elif model_type == "llava_mistral":
        model_type = "mistral"
    if model_type not in SUPPORTED_TEXT_MODELS:
        raise CheckpointError(
            f"{where}: unsupported language model {model_type!r}; supported: {', '.join(SUPPORTED_TEXT_MODELS)}"
        )
    values = _with_defaults(TextConfig, TEXT_DEFAULTS[model_type], config)
    values.setdefault("num_key_value_heads", values["num_attention_heads"])
    values["model_type"] = model_type
    values["name_or_path"] = str(config.get("_name_or_path", ""))
    scaling = values.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) not in ("linear", "default"):
        raise CheckpointError(f"{where}: unsupported rope_scaling {scaling}")
    return TextConfig(**values)


def _vision_config(config: dict[str, Any]) -> VisionConfig:
    return VisionConfig(**_with_defaults(VisionConfig, VISION_DEFAULTS, config))


def _size(value: Any, default: int) -> tuple[int, int]:
    """A processor size (int, {"shortest_edge": n}, {"height": h, "width": w}) as (h, w)."""
    if value is None:
        return default, default
    if isinstance(value, int):
        return value, value
    if isinstance(value, dict):
        if "shortest_edge" in value:
            return int(value["shortest_edge"]), int(value["shortest_edge"])
        if "height" in value and "width" in value:
            return int(value["height"]), int(value["width"])
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    raise CheckpointError(f"unrecognised image processor size {value!r}")


def _pinpoints(value: Any) -> tuple[tuple[int, int], ...]:
    return tuple((int(h), int(w)) for h, w in value) if value else ()


def _processor_settings(
    processor: dict[str, Any], vision: VisionConfig, *, llava_version: str, layout: Layout, mode: ImageMode,
    feature_layer: int, strategy: SelectStrategy, pinpoints: tuple[tuple[int, int], ...], merge_type: str,
    projector_act: str,
) -> VisionSettings:
    shortest = _size(processor.get("size"), vision.image_size)
    if shortest[0] != shortest[1]:
        log.warning("processor size %s is not square; using its height as the shortest edge", shortest)
    return VisionSettings(
        llava_version=llava_version,
        layout=layout.value,
        image_mode=mode,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        shortest_edge=shortest[0],
        crop_size=_size(processor.get("crop_size"), vision.image_size),
        image_mean=tuple(processor.get("image_mean", OPENAI_CLIP_MEAN)),  # type: ignore[arg-type]
        image_std=tuple(processor.get("image_std", OPENAI_CLIP_STD)),  # type: ignore[arg-type]
        resample=int(processor.get("resample", 3)),
        rescale_factor=float(processor.get("rescale_factor", 1 / 255)),
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
        image_grid_pinpoints=pinpoints,
        mm_patch_merge_type=merge_type,
        projector_hidden_act=projector_act,
    )


def _read_llava_hf(path: Path, config: dict[str, Any], arch: str) -> LlavaCheckpoint:
    version = LLAVA_HF_ARCHITECTURES.get(arch) or ("1.6" if config.get("model_type") == "llava_next" else "1.5")
    text = _text_config(config.get("text_config") or {}, path)
    vision = _vision_config(config.get("vision_config") or {})
    feature_layer = config.get("vision_feature_layer", -2)
    if not isinstance(feature_layer, int):
        raise CheckpointError(f"{path}: several vision_feature_layer values {feature_layer} are not supported")
    processor_path = path / "preprocessor_config.json"
    processor = read_json(processor_path) if processor_path.is_file() else {}
    if not processor:
        log.warning("%s has no preprocessor_config.json; using CLIP defaults", path)
    pinpoints = _pinpoints(config.get("image_grid_pinpoints") or processor.get("image_grid_pinpoints"))
    if version == "1.6":
        mode, merge = ImageMode.ANYRES, "spatial_unpad"
        pinpoints = pinpoints or LLAVA_NEXT_PINPOINTS
    else:
        mode, merge = (ImageMode.PAD if processor.get("do_pad") else ImageMode.CROP), "flat"
    settings = _processor_settings(
        processor, vision, llava_version=version, layout=Layout.LLAVA_HF, mode=mode,
        feature_layer=feature_layer,
        strategy=SelectStrategy(config.get("vision_feature_select_strategy", "default")),
        pinpoints=pinpoints, merge_type=merge, projector_act=config.get("projector_hidden_act", "gelu"),
    )
    image_token_id = config.get("image_token_index", config.get("image_token_id"))
    return LlavaCheckpoint(
        path=path, layout=Layout.LLAVA_HF, llava_version=version, text=text, vision=vision,
        settings=settings, projector_type="mlp2x_gelu",
        template=choose_template(Layout.LLAVA_HF, version, text, path.name),
        tokenize_mode=TokenizeMode.WHOLE, image_token_id=image_token_id,
        clip_path=None, clip_weights_from_repo=False, name=path.name,
    )


def _read_original(
    path: Path, config: dict[str, Any], arch: str, resolve_repo: Callable[[str], Path] | None
) -> LlavaCheckpoint:
    if arch not in ORIGINAL_ARCHITECTURES:
        raise CheckpointError(
            f"{path}: unsupported LLaVA architecture {arch!r}; supported: {', '.join(ORIGINAL_ARCHITECTURES)}"
        )
    text = _text_config({**config, "model_type": ORIGINAL_ARCHITECTURES[arch]}, path)
    tower = str(config["mm_vision_tower"])
    clip_path = resolve_repo(tower) if resolve_repo is not None else Path(tower)
    if not clip_path.is_dir():
        raise CheckpointError(f"{path}: vision tower {tower!r} is not a local directory; pass it with --vision-tower")
    clip_config = read_json(clip_path / "config.json")
    vision = _vision_config(clip_config.get("vision_config", clip_config))
    processor_path = clip_path / "preprocessor_config.json"
    processor = read_json(processor_path) if processor_path.is_file() else {}
    aspect = config.get("image_aspect_ratio") or "square"
    if str(aspect).startswith("anyres"):
        version, mode = "1.6", ImageMode.ANYRES
    else:
        version, mode = "1.5", ImageMode.PAD if aspect == "pad" else ImageMode.CROP
    select_feature = config.get("mm_vision_select_feature", "patch")
    if select_feature not in ("patch", "cls_patch"):
        raise CheckpointError(f"{path}: unsupported mm_vision_select_feature {select_feature!r}")
    projector_type = config.get("mm_projector_type", "linear")
    if projector_type not in ("linear", "mlp2x_gelu"):
        raise CheckpointError(f"{path}: unsupported mm_projector_type {projector_type!r}; supported: linear, mlp2x_gelu")
    merge = config.get("mm_patch_merge_type", "flat")
    if version == "1.6" and merge != "spatial_unpad":
        raise CheckpointError(f"{path}: unsupported mm_patch_merge_type {merge!r} for anyres; supported: spatial_unpad")
    settings = _processor_settings(
        processor, vision, llava_version=version, layout=Layout.ORIGINAL, mode=mode,
        feature_layer=int(config.get("mm_vision_select_layer", -2)),
        strategy=SelectStrategy.DEFAULT if select_feature == "patch" else SelectStrategy.FULL,
        pinpoints=_pinpoints(config.get("image_grid_pinpoints")) if version == "1.6" else (),
        merge_type=merge, projector_act="gelu",
    )
    return LlavaCheckpoint(
        path=path, layout=Layout.ORIGINAL, llava_version=version, text=text, vision=vision,
        settings=settings, projector_type=projector_type,
        template=choose_template(Layout.ORIGINAL, version, text, path.name),
        tokenize_mode=TokenizeMode.SPLIT, image_token_id=None,
        clip_path=clip_path, clip_weights_from_repo=version == "1.5", name=path.name,
    )


def choose_template(layout: Layout, version: str, text: TextConfig, name: str) -> Template:
    """The conversation template the model was trained with (LLaVA's ``conv_templates``)."""
    lowered = f"{name} {text.name_or_path}".lower()
    if text.model_type == "mistral" or "mistral" in lowered:
        return Template.MISTRAL_INSTRUCT
    if "34b" in lowered or "yi-" in lowered or text.vocab_size in (64000, 64064):
        return Template.CHATML_DIRECT
    if layout is Layout.LLAVA_HF and version == "1.5":
        return Template.LLAVA_HF
    return Template.VICUNA_V1
