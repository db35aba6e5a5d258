"""Reading a LLaVA checkpoint's configuration, whatever its layout.

Two layouts exist: llava-hf (transformers' ``LlavaForConditionalGeneration`` /
``LlavaNextForConditionalGeneration``, with ``text_config`` and ``vision_config``) and the
original one (liuhaotian's ``LlavaLlamaForCausalLM`` / ``LlavaMistralForCausalLM``: a flat LLM
config with ``mm_*`` fields, whose CLIP configuration lives in the repo ``mm_vision_tower`` names).
Both become one `LlavaCheckpoint`. Field names are Hugging Face's.
"""

from __future__ import annotations

import ast
import enum
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from llava_gguf.convert.families import FAMILIES, TEXT_DEFAULTS, LlmFamily
from llava_gguf.convert.names import Layout
from llava_gguf.errors import CheckpointError, ImageError
from llava_gguf.llm.templates import Template
from llava_gguf.metadata import ImageMode, SelectStrategy, TokenizeMode, TowerKind, VisionSettings
from llava_gguf.packing_onevision import ONEVISION_PINPOINTS, parse_max_num_patches

log = logging.getLogger(__name__)

# LLaVA-OneVision is kept as 1.6 inside: its files carry 1.6's image_newline and pinpoints (ImageMode.ANYRES_MAX)
LLAVA_HF_ARCHITECTURES = {"LlavaForConditionalGeneration": "1.5", "LlavaNextForConditionalGeneration": "1.6",
                          "LlavaOnevisionForConditionalGeneration": "1.6"}
LLAVA_HF_MODEL_TYPES = {"llava": "1.5", "llava_next": "1.6", "llava_onevision": "1.6"}
ONEVISION_ARCHITECTURE, ONEVISION_MODEL_TYPE = "LlavaOnevisionForConditionalGeneration", "llava_onevision"
# LlavaOnevisionConfig's defaults (llava-onevision-qwen2-*-ov-hf)
ONEVISION_DEFAULTS: dict[str, Any] = dict(vision_feature_layer=-1, vision_feature_select_strategy="full",
                                          vision_aspect_ratio="anyres_max_9")
ONEVISION_IMAGE_TOKEN_DEFAULT = 151646  # LlavaOnevisionConfig image_token_index
# LlavaOnevisionConfig builds this SigLIP-so400m/14 at 384 px when vision_config is absent
ONEVISION_VISION_DEFAULTS: dict[str, Any] = dict(
    model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
    num_attention_heads=16, image_size=384, patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
)
ORIGINAL_ARCHITECTURES = {"LlavaLlamaForCausalLM": "llama", "LlavaMistralForCausalLM": "mistral"}
SUPPORTED_TEXT_MODELS = tuple(FAMILIES)
# model types whose GGUF tokenizer is not one LLaVA's conv_templates were written for: the checkpoint's
# own chat template renders their prompts
CHECKPOINT_TEMPLATE_MODELS = tuple(name for name, family in FAMILIES.items() if family.checkpoint_template)
VISION_DEFAULTS: dict[str, Any] = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    image_size=224, patch_size=32, layer_norm_eps=1e-5, hidden_act="quick_gelu", projection_dim=512,
)
# LlavaConfig / LlavaNextConfig build this CLIP-L/336 when vision_config is absent
LLAVA_HF_VISION_DEFAULTS: dict[str, Any] = {
    **VISION_DEFAULTS, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
    "num_attention_heads": 16, "image_size": 336, "patch_size": 14, "projection_dim": 768,
}
# SiglipVisionConfig's defaults (siglip-base-patch16-224), for a vision_config with model_type "siglip_vision_model"
SIGLIP_VISION_DEFAULTS: dict[str, Any] = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    image_size=224, patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", projection_dim=0,
)
# vision_config model_type -> (tower kind, defaults, MLP activations the encoders compute exactly)
VISION_TOWERS: dict[str, tuple[TowerKind, dict[str, Any], tuple[str, ...]]] = {
    "clip_vision_model": (TowerKind.CLIP, VISION_DEFAULTS, ("quick_gelu", "gelu")),
    "siglip_vision_model": (TowerKind.SIGLIP, SIGLIP_VISION_DEFAULTS, ("gelu_pytorch_tanh",)),
}
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)  # SiglipImageProcessor's IMAGENET_STANDARD_MEAN / _STD
LLAVA_HF_IMAGE_TOKEN_DEFAULT = 32000  # LlavaConfig / LlavaNextConfig image_token_index
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
    sliding_window: int | None = None  # Mistral: attention sees only the last N positions
    name_or_path: str = ""
    original_max_position_embeddings: int | None = None  # Phi-3: the context its RoPE was trained at
    partial_rotary_factor: float = 1.0  # the share of each head's dimensions RoPE rotates

    @property
    def family(self) -> LlmFamily:
        return FAMILIES[self.model_type]

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rope_scaling_kind(self) -> str | None:
        """None, "linear" or "longrope"."""
        return None if not self.rope_scaling else self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))

    @property
    def longrope_attention_factor(self) -> float:
        """transformers' longrope ``attention_factor`` (cos and sin are scaled by it at every length): the
        config's, else sqrt(1 + ln(s) / ln(original)) for s = max / original positions > 1, else 1."""
        given = (self.rope_scaling or {}).get("attention_factor")
        if given is not None:
            return float(given)
        original = self.original_max_position_embeddings or self.max_position_embeddings
        scale = self.max_position_embeddings / original
        return math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0

    @property
    def rope_dimension_count(self) -> int:
        """The rotated dimensions per head (transformers' ``int(head_dim * partial_rotary_factor)``)."""
        return int(self.head_size * self.partial_rotary_factor)

    @property
    def context_length(self) -> int:
        """The longest sequence the reference computes like llama.cpp: past a sliding window they differ."""
        if self.sliding_window is not None:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings


class TokenizerKind(str, enum.Enum):
    """The LLM tokenizer's kind, as llama.cpp's ``tokenizer.ggml.model`` names it."""

    SPM = "llama"  # SentencePiece (tokenizer.model, or a byte-fallback BPE tokenizer.json)
    BPE = "gpt2"  # byte-level BPE (tokenizer.json only: Llama 3, Qwen2...)


@dataclass(frozen=True)
class VisionConfig:
    """The vision tower's hyperparameters (CLIPVisionConfig / SiglipVisionConfig names)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    layer_norm_eps: float
    hidden_act: str
    projection_dim: int
    model_type: str = "clip_vision_model"

    @property
    def tower(self) -> TowerKind:
        return VISION_TOWERS[self.model_type][0]


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
    tokenizer_kind: TokenizerKind = TokenizerKind.SPM
    chat_template: str | None = None  # the checkpoint's own (processor or tokenizer) chat template


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
    if arch in LLAVA_HF_ARCHITECTURES or config.get("model_type") in LLAVA_HF_MODEL_TYPES:
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


def _rope(
    config: dict[str, Any], where: Path, default_theta: float, supported: tuple[str, ...] = ("linear",)
) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling or None) from either spelling: transformers 4's flat ``rope_theta`` and
    ``rope_scaling``, or transformers 5's ``rope_parameters`` (``{"rope_theta": ..., "rope_type": ...}``).
    ``supported``: the scaling kinds the LLM family's llama.cpp graph runs (besides "default")."""
    parameters = config.get("rope_parameters")
    flat_theta = config.get("rope_theta")
    scaling = config.get("rope_scaling")
    theta = None
    if isinstance(parameters, dict):
        if "full_attention" in parameters and isinstance(parameters["full_attention"], dict):
            parameters = parameters["full_attention"]  # per-layer-type form
        theta = parameters.get("rope_theta")
        if parameters.get("rope_type", parameters.get("type", "default")) != "default":
            scaling = scaling or parameters
    if theta is not None and flat_theta is not None and float(theta) != float(flat_theta):
        raise CheckpointError(
            f"{where}: config.json gives two RoPE bases, rope_theta={flat_theta} and rope_parameters.rope_theta={theta}"
        )
    theta = theta if theta is not None else flat_theta
    if theta is None:
        theta = default_theta
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "su":  # Phi-3's first name for longrope
            kind = "longrope"
        if kind not in (*supported, "default"):
            shown = {k: v for k, v in scaling.items() if not isinstance(v, (list, tuple))}  # not longrope's factor lists
            raise CheckpointError(
                f"{where}: RoPE scaling {kind!r} ({shown}) is not supported; supported: {', '.join(supported)}, default"
            )
        if kind == "default":
            scaling = None
        elif kind == "linear" and not isinstance(scaling.get("factor"), (int, float)):
            raise CheckpointError(f"{where}: linear RoPE scaling without a numeric factor ({scaling})")
        elif kind == "longrope":
            scaling = {**scaling, "rope_type": kind}
            for name in ("long_factor", "short_factor"):
                if not isinstance(scaling.get(name), (list, tuple)):
                    raise CheckpointError(f"{where}: longrope RoPE scaling without a {name} list")
    return float(theta), scaling or None


def _text_config(config: dict[str, Any], where: Path, outer: dict[str, Any] | None = None) -> TextConfig:
    """The LLM's hyperparameters; ``outer`` is the llava-hf top-level config (for ``tie_word_embeddings``)."""
    model_type = config.get("model_type", "llama")
    if model_type in ("llava_llama", "llava"):
        model_type = "llama"
    elif model_type == "llava_mistral":
        model_type = "mistral"
    if model_type not in SUPPORTED_TEXT_MODELS:
        raise CheckpointError(
            f"{where}: unsupported language model {model_type!r}; supported: {', '.join(SUPPORTED_TEXT_MODELS)}"
        )
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{where}: language model activation {act!r} is not supported; supported: silu")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise CheckpointError(f"{where}: {flag}=true is not supported (llama.cpp's llama graph has no such biases)")
    values = _with_defaults(TextConfig, TEXT_DEFAULTS[model_type], config)
    if config.get("num_key_value_heads") is None:
        values["num_key_value_heads"] = values["num_attention_heads"]
    if config.get("tie_word_embeddings") is None and outer is not None and outer.get("tie_word_embeddings") is not None:
        values["tie_word_embeddings"] = bool(outer["tie_word_embeddings"])
    values["rope_theta"], values["rope_scaling"] = _rope(
        config, where, TEXT_DEFAULTS[model_type]["rope_theta"], FAMILIES[model_type].rope_scalings)
    values["model_type"] = model_type
    values["name_or_path"] = str(config.get("_name_or_path", ""))
    # an explicit null means no window; a missing key means MistralConfig's default; Qwen2Config keeps a
    # window only when use_sliding_window (default false) turns it on
    window = config.get("sliding_window", TEXT_DEFAULTS[model_type].get("sliding_window"))
    if config.get("use_sliding_window", TEXT_DEFAULTS[model_type].get("use_sliding_window")) is False:
        window = None
    values["sliding_window"] = int(window) if window is not None else None
    values.update(_rotary_fields(config, model_type, where))
    text = TextConfig(**values)
    if text.hidden_size % text.num_attention_heads or text.num_attention_heads % text.num_key_value_heads:
        raise CheckpointError(
            f"{where}: {text.num_attention_heads} attention heads, {text.num_key_value_heads} KV heads and "
            f"hidden size {text.hidden_size} do not divide evenly"
        )
    if text.rope_scaling_kind == "longrope":
        lengths = {len(text.rope_scaling[n]) for n in ("long_factor", "short_factor")}  # type: ignore[index]
        if lengths != {text.rope_dimension_count // 2}:
            raise CheckpointError(
                f"{where}: longrope factors of lengths {sorted(lengths)}, expected {text.rope_dimension_count // 2} "
                "(half the rotated dimensions)"
            )
    return text


def _rotary_fields(config: dict[str, Any], model_type: str, where: Path) -> dict[str, Any]:
    """``partial_rotary_factor`` and ``original_max_position_embeddings`` where the family has them (Phi-3),
    flat (transformers 4) or inside ``rope_parameters`` (transformers 5)."""
    defaults = TEXT_DEFAULTS[model_type]
    parameters = config.get("rope_parameters") if isinstance(config.get("rope_parameters"), dict) else {}
    if "partial_rotary_factor" not in defaults:
        factor = config.get("partial_rotary_factor", parameters.get("partial_rotary_factor"))
        if factor not in (None, 1.0):
            raise CheckpointError(f"{where}: partial_rotary_factor={factor} is not supported for {model_type}")
        return {}
    factor = config.get("partial_rotary_factor", parameters.get("partial_rotary_factor"))
    factor = float(defaults["partial_rotary_factor"] if factor is None else factor)
    original = config.get("original_max_position_embeddings", parameters.get("original_max_position_embeddings"))
    original = int(defaults["original_max_position_embeddings"] if original is None else original)
    if not 0.0 < factor <= 1.0:
        raise CheckpointError(f"{where}: partial_rotary_factor={factor} is not in (0, 1]")
    return {"partial_rotary_factor": factor, "original_max_position_embeddings": original}


def _vision_config(config: dict[str, Any] | None, where: Path) -> VisionConfig:
    """CLIPVisionConfig or SiglipVisionConfig fields (by ``model_type``, with that class's defaults); a
    llava-hf config without ``vision_config`` gets LlavaConfig's CLIP-L/336."""
    model_type = (config or {}).get("model_type") or "clip_vision_model"
    if model_type not in VISION_TOWERS:
        raise CheckpointError(f"{where}: vision tower {model_type!r} is not supported; supported: "
                              f"{', '.join(VISION_TOWERS)}")
    _, defaults, activations = VISION_TOWERS[model_type]
    if config is None:
        defaults = LLAVA_HF_VISION_DEFAULTS
    vision = VisionConfig(**_with_defaults(VisionConfig, {**defaults, "model_type": model_type}, config or {}))
    if vision.hidden_act not in activations:
        raise CheckpointError(f"{where}: vision activation {vision.hidden_act!r} is not supported for {model_type}; "
                              f"supported: {', '.join(activations)}")
    return vision


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


def _pinpoints(value: Any, where: Path) -> tuple[tuple[int, int], ...]:
    """The config's pairs, unchanged (their order is the layout's: see `VisionSettings.pinpoints_hw`);
    the original code also accepts them as a string literal."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError) as e:
            raise CheckpointError(f"{where}: image_grid_pinpoints {value!r} is not a list of pairs") from e
    try:
        return tuple((int(a), int(b)) for a, b in value) if value else ()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: image_grid_pinpoints {value!r} is not a list of pairs") from e


def _resizes_to_size(processor: dict[str, Any], vision: VisionConfig) -> bool:
    """SiglipImageProcessor's way: resize to {"height", "width"} with no center crop (a SigLIP tower
    without a processor file gets its processor's)."""
    if not processor:
        return vision.tower is TowerKind.SIGLIP
    size = processor.get("size")
    squashed = isinstance(size, dict) and "height" in size and "width" in size
    return squashed and not processor.get("do_center_crop") and not processor.get("do_pad")


def _processor_settings(
    processor: dict[str, Any], vision: VisionConfig, *, llava_version: str, layout: Layout, mode: ImageMode,
    feature_layer: int, strategy: SelectStrategy, pinpoints: tuple[tuple[int, int], ...], merge_type: str,
    projector_act: str,
) -> VisionSettings:
    shortest = _size(processor.get("size"), vision.image_size)
    if shortest[0] != shortest[1]:
        log.warning("processor size %s is not square; using its height as the shortest edge", shortest)
    siglip = vision.tower is TowerKind.SIGLIP
    # RESIZE: the image is squashed to `size` itself (SiglipImageProcessor), the tile
    crop = shortest if mode is ImageMode.RESIZE else _size(processor.get("crop_size"), vision.image_size)
    return VisionSettings(
        tower=vision.tower,
        llava_version=llava_version,
        layout=layout.value,
        image_mode=mode,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        shortest_edge=shortest[0],
        crop_size=crop,
        image_mean=tuple(processor.get("image_mean", SIGLIP_MEAN if siglip else OPENAI_CLIP_MEAN)),  # type: ignore[arg-type]
        image_std=tuple(processor.get("image_std", SIGLIP_STD if siglip else OPENAI_CLIP_STD)),  # type: ignore[arg-type]
        resample=int(processor.get("resample", 3)),
        rescale_factor=float(processor.get("rescale_factor", 1 / 255)),
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
        image_grid_pinpoints=pinpoints,
        mm_patch_merge_type=merge_type,
        projector_hidden_act=projector_act,
    )


def _read_llava_hf(path: Path, config: dict[str, Any], arch: str) -> LlavaCheckpoint:
    version = LLAVA_HF_ARCHITECTURES.get(arch) or LLAVA_HF_MODEL_TYPES.get(config.get("model_type", ""), "1.5")
    onevision = arch == ONEVISION_ARCHITECTURE or config.get("model_type") == ONEVISION_MODEL_TYPE
    if onevision:
        config = {**ONEVISION_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    text = _text_config(config.get("text_config") or {}, path, outer=config)
    vision_config = config.get("vision_config") or (ONEVISION_VISION_DEFAULTS if onevision else None)
    vision = _vision_config(vision_config, path)
    feature_layer = config.get("vision_feature_layer", -2)
    if not isinstance(feature_layer, int):
        raise CheckpointError(f"{path}: several vision_feature_layer values {feature_layer} are not supported")
    processor_path = path / "preprocessor_config.json"
    processor = read_json(processor_path) if processor_path.is_file() else {}
    if not processor:
        log.warning("%s has no preprocessor_config.json; using CLIP defaults", path)
    pinpoints = _pinpoints(config.get("image_grid_pinpoints") or processor.get("image_grid_pinpoints"), path)
    if onevision:
        mode, merge = ImageMode.ANYRES_MAX, "spatial_unpad"
        pinpoints = pinpoints or ONEVISION_PINPOINTS
    elif version == "1.6":
        mode, merge = ImageMode.ANYRES, "spatial_unpad"
        pinpoints = pinpoints or LLAVA_NEXT_PINPOINTS
    else:
        mode, merge = (ImageMode.PAD if processor.get("do_pad") else ImageMode.CROP), "flat"
        if _resizes_to_size(processor, vision):
            mode = ImageMode.RESIZE
    settings = _processor_settings(
        processor, vision, llava_version=version, layout=Layout.LLAVA_HF, mode=mode,
        feature_layer=feature_layer,
        strategy=SelectStrategy(config.get("vision_feature_select_strategy", "default")),
        pinpoints=pinpoints, merge_type=merge, projector_act=config.get("projector_hidden_act", "gelu"),
    )
    if onevision:
        settings = _onevision_settings(settings, str(config["vision_aspect_ratio"]), path)
    default_token = ONEVISION_IMAGE_TOKEN_DEFAULT if onevision else LLAVA_HF_IMAGE_TOKEN_DEFAULT
    image_token_id = config.get("image_token_index", config.get("image_token_id", default_token))
    kind = tokenizer_kind(path)
    chat_template = read_chat_template(path)
    return LlavaCheckpoint(
        path=path, layout=Layout.LLAVA_HF, llava_version=version, text=text, vision=vision,
        settings=settings, projector_type="mlp2x_gelu",
        template=choose_template(Layout.LLAVA_HF, version, text, path.name, kind, chat_template, added_token_texts(path)),
        tokenize_mode=TokenizeMode.WHOLE, image_token_id=image_token_id,
        clip_path=None, clip_weights_from_repo=False, name=path.name,
        tokenizer_kind=kind, chat_template=chat_template,
    )


def _onevision_settings(settings: VisionSettings, vision_aspect_ratio: str, where: Path) -> VisionSettings:
    """LLaVA-OneVision's settings: "anyres_max_N" checked, every tile's patch grid kept whole ("full" on SigLIP)."""
    try:
        parse_max_num_patches(vision_aspect_ratio)
    except ImageError as e:
        raise CheckpointError(f"{where}: {e}") from e
    if settings.extra_tokens != 0:
        raise CheckpointError(
            f"{where}: LLaVA-OneVision packing needs each tile's {settings.patches_per_side**2} patch features; "
            f"a {settings.tower.value} tower with vision_feature_select_strategy "
            f"{settings.vision_feature_select_strategy.value!r} gives {settings.extra_tokens:+d} "
            "(use 'full' on SigLIP)"
        )
    return replace(settings, vision_aspect_ratio=vision_aspect_ratio)


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
    vision = _vision_config(clip_config.get("vision_config", clip_config), clip_path)
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
        pinpoints=_pinpoints(config.get("image_grid_pinpoints"), path) if version == "1.6" else (),
        merge_type=merge, projector_act="gelu",
    )
    return LlavaCheckpoint(
        path=path, layout=Layout.ORIGINAL, llava_version=version, text=text, vision=vision,
        settings=settings, projector_type=projector_type,
        template=choose_template(Layout.ORIGINAL, version, text, path.name),
        tokenize_mode=TokenizeMode.SPLIT, image_token_id=None,
        clip_path=clip_path, clip_weights_from_repo=version == "1.5", name=path.name,
        chat_template=read_chat_template(path),
    )


def tokenizer_kind(path: Path) -> TokenizerKind:
    """SentencePiece when the checkpoint has ``tokenizer.model`` or a byte-fallback BPE ``tokenizer.json``
    (a SentencePiece model in tokenizers' form); byte-level BPE for a ``tokenizer.json`` without byte fallback."""
    if (path / "tokenizer.model").is_file() or not (path / "tokenizer.json").is_file():
        return TokenizerKind.SPM
    model = read_json(path / "tokenizer.json").get("model") or {}
    if model.get("type") == "BPE" and not model.get("byte_fallback", False):
        return TokenizerKind.BPE
    return TokenizerKind.SPM


def added_token_texts(path: Path) -> frozenset[str]:
    """The contents of the added tokens ``tokenizer.json`` and ``tokenizer_config.json`` list."""
    texts: set[str] = set()
    if (path / "tokenizer.json").is_file():
        texts |= {t.get("content") for t in read_json(path / "tokenizer.json").get("added_tokens") or []}
    if (path / "tokenizer_config.json").is_file():
        decoder = read_json(path / "tokenizer_config.json").get("added_tokens_decoder") or {}
        texts |= {t.get("content") for t in decoder.values() if isinstance(t, dict)}
    return frozenset(t for t in texts if isinstance(t, str))


def read_chat_template(path: Path) -> str | None:
    """The checkpoint's chat template, where transformers' processor finds it first: ``chat_template.json``
    (``{"chat_template": ...}``), then ``chat_template.jinja``, then ``tokenizer_config.json``'s."""
    json_path, jinja_path, config_path = (
        path / "chat_template.json", path / "chat_template.jinja", path / "tokenizer_config.json")
    template = None
    if json_path.is_file():
        template = read_json(json_path).get("chat_template")
    elif jinja_path.is_file():
        template = jinja_path.read_text(encoding="utf-8")
    elif config_path.is_file():
        template = read_json(config_path).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise CheckpointError(f"{path}: the chat template is a {type(template).__name__}, not a string")
    return template or None


def choose_template(
    layout: Layout, version: str, text: TextConfig, name: str, kind: TokenizerKind = TokenizerKind.SPM,
    chat_template: str | None = None, added_tokens: frozenset[str] = frozenset(),
) -> Template:
    """The conversation template the model was trained with (LLaVA's ``conv_templates``), or the
    checkpoint's own chat template for LLMs those templates do not cover (byte-level BPE, Phi-3)."""
    lowered = f"{name} {text.name_or_path}".lower()
    if kind is TokenizerKind.BPE or text.model_type in CHECKPOINT_TEMPLATE_MODELS:
        if chat_template is not None:
            return Template.CHECKPOINT
        if text.model_type == "phi3":
            return Template.PHI3
        if kind is TokenizerKind.BPE and "<|start_header_id|>" in added_tokens:
            return Template.LLAMA3
        raise CheckpointError(
            f"{name}: a {text.model_type} LLM with a {kind.value} tokenizer and no chat template "
            "(chat_template.json, chat_template.jinja or tokenizer_config.json); add the model's chat template"
        )
    if "34b" in lowered or "yi-" in lowered or text.vocab_size in (64000, 64064):
        return Template.CHATML_DIRECT
    if layout is Layout.LLAVA_HF and version == "1.5":
        return Template.LLAVA_HF  # llava-hf's 1.5 repos (Vicuna, BakLLaVA's Mistral): "USER: <image>\n... ASSISTANT:"
    if text.model_type == "mistral" or "mistral" in lowered:
        return Template.MISTRAL_INSTRUCT
    return Template.VICUNA_V1
