"""Every GGUF key the project reads or writes beyond what `gguf.Keys` names, in one table,
and the settings the runtime needs to reproduce the reference model's preprocessing.

llama.cpp's own clip keys that gguf-py does not (yet) name are spelled here once; the keys
in the project's own namespace (``llava_gguf.*``) carry what llama.cpp has no key for.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from typing import Any

import gguf

from llava_gguf.errors import GGUFFormatError, ModelLoadError

FORMAT_VERSION = 1
# bumped whenever the converter writes different files for the same checkpoint (the conversion
# cache keys on it, so conversions made before a fix are made again): 2 = RoPE from
# rope_parameters, sentencepiece piece types, tokenizer.space_after_special
CONVERTER_REVISION = 2


class Layout(str, enum.Enum):
    """A checkpoint's layout (``llava_gguf.checkpoint_layout``): it decides which reference the runtime follows."""

    LLAVA_HF = "llava-hf"  # transformers' LlavaForConditionalGeneration / LlavaNext...
    ORIGINAL = "original"  # liuhaotian's LlavaLlamaForCausalLM / LlavaMistralForCausalLM
    CLIP = "clip"  # a CLIPModel / CLIPVisionModel repo (LLaVA 1.5's frozen tower)


class ClipKeys:
    """llama.cpp clip keys (tools/mtmd/clip-impl.h) that `gguf.Keys` lacks."""

    FEATURE_LAYER = "clip.vision.feature_layer"
    IMAGE_GRID_PINPOINTS = "clip.vision.image_grid_pinpoints"
    MM_PATCH_MERGE_TYPE = "clip.vision.mm_patch_merge_type"
    PROJECTOR_MLP = "mlp"  # value of clip.projector_type for LLaVA's projector


class LlavaKeys:
    """The project's own keys."""

    FORMAT_VERSION = "llava_gguf.format_version"
    LLAVA_VERSION = "llava_gguf.llava_version"
    LAYOUT = "llava_gguf.checkpoint_layout"
    # vision (mmproj)
    IMAGE_MODE = "llava_gguf.image.mode"
    IMAGE_SHORTEST_EDGE = "llava_gguf.image.shortest_edge"
    IMAGE_CROP_SIZE = "llava_gguf.image.crop_size"
    IMAGE_RESAMPLE = "llava_gguf.image.resample"
    IMAGE_RESCALE_FACTOR = "llava_gguf.image.rescale_factor"
    SELECT_LAYER = "llava_gguf.vision.select_layer"
    SELECT_STRATEGY = "llava_gguf.vision.select_strategy"
    PROJECTOR_ACT = "llava_gguf.projector.activation"
    # language model
    TEMPLATE = "llava_gguf.template"
    IMAGE_TOKEN_ID = "llava_gguf.image_token_id"
    TOKENIZE_MODE = "llava_gguf.tokenize_mode"
    # whether the reference tokenizer gives text after a special token the "▁" prefix (transformers' legacy)
    SPACE_AFTER_SPECIAL = "llava_gguf.tokenizer.space_after_special"


class ImageMode(str, enum.Enum):
    """How an image becomes tiles of the CLIP input size."""

    PAD = "pad"  # original LLaVA 1.5: expand to a square of the mean colour, then resize and crop
    CROP = "crop"  # llava-hf 1.5 default: resize the shortest edge, then center crop
    ANYRES = "anyres"  # LLaVA 1.6: best grid resolution, tiles plus the base image


class SelectStrategy(str, enum.Enum):
    DEFAULT = "default"  # drop the class token
    FULL = "full"  # keep it


class TokenizeMode(str, enum.Enum):
    """How the reference tokenizes a prompt with image placeholders."""

    WHOLE = "whole"  # llava-hf: the whole prompt at once, `<image>` is a special token
    SPLIT = "split"  # original LLaVA: `tokenizer_image_token`, text chunks tokenized apart


@dataclass(frozen=True)
class VisionSettings:
    """What the runtime needs to preprocess, encode and pack images as the reference does.

    Field names follow the Hugging Face configs (`vision_feature_layer`, `image_grid_pinpoints`...).
    Sizes are (height, width).
    """

    llava_version: str  # "1.5" or "1.6"
    layout: str  # "llava-hf" or "original"
    image_mode: ImageMode
    image_size: int  # CLIP input side (the tile size)
    patch_size: int
    shortest_edge: int
    crop_size: tuple[int, int]
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    resample: int = 3  # PIL.Image.BICUBIC
    rescale_factor: float = 1 / 255
    vision_feature_layer: int = -2
    vision_feature_select_strategy: SelectStrategy = SelectStrategy.DEFAULT
    # the config's pairs as written there: transformers reads each as (height, width), the original
    # LLaVA code as (width, height); `pinpoints_hw` gives them as the layout's reference reads them
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()
    mm_patch_merge_type: str = "flat"  # "spatial_unpad" for LLaVA 1.6
    projector_hidden_act: str = "gelu"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def follows_original_code(self) -> bool:
        """Original-layout checkpoints are reproduced as the original LLaVA code computes them
        (pinpoints read as (width, height), unpad sizes truncated); llava-hf ones as transformers."""
        return self.layout == Layout.ORIGINAL.value

    @property
    def pinpoints_hw(self) -> tuple[tuple[int, int], ...]:
        """The grid resolutions as (height, width), in the order the reference tries them (first best wins)."""
        if self.follows_original_code:
            return tuple((height, width) for width, height in self.image_grid_pinpoints)
        return self.image_grid_pinpoints

    def write(self, writer: gguf.GGUFWriter) -> None:
        writer.add_uint32(LlavaKeys.FORMAT_VERSION, FORMAT_VERSION)
        writer.add_string(LlavaKeys.LLAVA_VERSION, self.llava_version)
        writer.add_string(LlavaKeys.LAYOUT, self.layout)
        writer.add_string(LlavaKeys.IMAGE_MODE, self.image_mode.value)
        writer.add_uint32(LlavaKeys.IMAGE_SHORTEST_EDGE, self.shortest_edge)
        writer.add_array(LlavaKeys.IMAGE_CROP_SIZE, list(self.crop_size))
        writer.add_uint32(LlavaKeys.IMAGE_RESAMPLE, self.resample)
        writer.add_float32(LlavaKeys.IMAGE_RESCALE_FACTOR, self.rescale_factor)
        writer.add_int32(LlavaKeys.SELECT_LAYER, self.vision_feature_layer)
        writer.add_string(LlavaKeys.SELECT_STRATEGY, self.vision_feature_select_strategy.value)
        writer.add_string(LlavaKeys.PROJECTOR_ACT, self.projector_hidden_act)

    @classmethod
    def read(cls, reader: gguf.GGUFReader) -> VisionSettings:
        fields = GGUFFields(reader)
        if fields.get(gguf.Keys.General.ARCHITECTURE) != "clip":
            raise GGUFFormatError(f"{reader.data.filename}: not an mmproj GGUF (general.architecture is not 'clip')")
        if fields.get(LlavaKeys.FORMAT_VERSION) is None:
            raise GGUFFormatError(
                f"{reader.data.filename}: mmproj GGUF was not written by llava-gguf's converter "
                "(no llava_gguf.* keys); convert the checkpoint with `llava-gguf convert`"
            )
        pinpoints = fields.get(ClipKeys.IMAGE_GRID_PINPOINTS) or []
        # flat [a0, b0, a1, b1, ...] -> ((a0, b0), (a1, b1), ...), the config's pairs
        grid = tuple((int(pinpoints[i]), int(pinpoints[i + 1])) for i in range(0, len(pinpoints), 2))
        crop = fields.require(LlavaKeys.IMAGE_CROP_SIZE)
        return cls(
            llava_version=fields.require(LlavaKeys.LLAVA_VERSION),
            layout=fields.require(LlavaKeys.LAYOUT),
            image_mode=ImageMode(fields.require(LlavaKeys.IMAGE_MODE)),
            image_size=int(fields.require(gguf.Keys.ClipVision.IMAGE_SIZE)),
            patch_size=int(fields.require(gguf.Keys.ClipVision.PATCH_SIZE)),
            shortest_edge=int(fields.require(LlavaKeys.IMAGE_SHORTEST_EDGE)),
            crop_size=(int(crop[0]), int(crop[1])),
            image_mean=tuple(float(x) for x in fields.require(gguf.Keys.ClipVision.IMAGE_MEAN)),  # type: ignore[arg-type]
            image_std=tuple(float(x) for x in fields.require(gguf.Keys.ClipVision.IMAGE_STD)),  # type: ignore[arg-type]
            resample=int(fields.require(LlavaKeys.IMAGE_RESAMPLE)),
            rescale_factor=float(fields.require(LlavaKeys.IMAGE_RESCALE_FACTOR)),
            vision_feature_layer=int(fields.require(LlavaKeys.SELECT_LAYER)),
            vision_feature_select_strategy=SelectStrategy(fields.require(LlavaKeys.SELECT_STRATEGY)),
            image_grid_pinpoints=grid,
            mm_patch_merge_type=fields.get(ClipKeys.MM_PATCH_MERGE_TYPE) or "flat",
            projector_hidden_act=fields.require(LlavaKeys.PROJECTOR_ACT),
        )


def read_gguf(path: str | os.PathLike[str]) -> gguf.GGUFReader:
    """A read-only, memory-mapped reader; the project's errors for a missing or broken file."""
    try:
        return gguf.GGUFReader(path, "r")
    except FileNotFoundError as e:
        raise ModelLoadError(f"{path}: no such file") from e
    except (ValueError, IndexError, OSError) as e:
        raise GGUFFormatError(f"{path}: not a readable GGUF file ({e})") from e


class GGUFFields:
    """Plain Python values of a GGUF's key-value fields."""

    def __init__(self, reader: gguf.GGUFReader) -> None:
        self._reader = reader
        self._fields = reader.fields

    def get(self, key: str) -> Any:
        f = self._fields.get(key)
        if f is None:
            return None
        return f.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise GGUFFormatError(f"{self._reader.data.filename}: missing key {key!r}; re-convert with `llava-gguf convert`")
        return value

    def keys(self) -> list[str]:
        return list(self._fields)
