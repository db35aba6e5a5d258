"""Every GGUF key the project reads or writes beyond what `gguf.Keys` names, in one table,
and the settings the runtime needs to reproduce the reference model's preprocessing.

llama.cpp's own clip keys that gguf-py does not (yet) name are spelled here once; the keys
in the project's own namespace (``llava_gguf.*``) carry what llama.cpp has no key for.
"""

from __future__ import annotations

import enum
import mmap
import os
import struct
from dataclasses import dataclass, field, replace
from typing import Any

import gguf

from llava_gguf.errors import GGUFFormatError, ModelLoadError

FORMAT_VERSION = 1
# bumped whenever the converter writes different files for the same checkpoint (the conversion
# cache keys on it, so conversions made before a fix are made again): 2 = RoPE from
# rope_parameters, sentencepiece piece types, tokenizer.space_after_special; 3 = the LLaVA family's other
# LLMs (Llama-3 BPE, Phi-3, Mistral 1.5), eos_token_ids, the checkpoint's chat template
CONVERTER_REVISION = 3


class Layout(str, enum.Enum):
    """A checkpoint's layout (``llava_gguf.checkpoint_layout``): it decides which reference the runtime follows."""

    LLAVA_HF = "llava-hf"  # transformers' LlavaForConditionalGeneration / LlavaNext...
    ORIGINAL = "original"  # liuhaotian's LlavaLlamaForCausalLM / LlavaMistralForCausalLM
    CLIP = "clip"  # a CLIPModel / CLIPVisionModel repo (LLaVA 1.5's frozen tower)


class ClipKeys:
    """llama.cpp clip keys (tools/mtmd/clip-impl.h and its legacy converter) that `gguf.Keys` lacks."""

    FEATURE_LAYER = "clip.vision.feature_layer"
    IMAGE_GRID_PINPOINTS = "clip.vision.image_grid_pinpoints"
    MM_PATCH_MERGE_TYPE = "clip.vision.mm_patch_merge_type"
    IMAGE_ASPECT_RATIO = "clip.vision.image_aspect_ratio"  # the original config's "pad" / "anyres"
    HAS_MINICPMV_PROJECTOR = "clip.has_minicpmv_projector"
    PROJECTOR_MLP = "mlp"  # value of clip.projector_type for LLaVA's projector


# LLaVA 1.6's image_grid_pinpoints (liuhaotian's and llava-hf's configs) for a 336 px tile
LLAVA_16_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
LLAVA_VERSIONS = ("1.5", "1.6")


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
    VISION_TOWER = "llava_gguf.vision.tower"  # a TowerKind; files without it hold a CLIP tower
    PROJECTOR_ACT = "llava_gguf.projector.activation"
    # LLaVA-OneVision's "anyres_max_N" (ImageMode.ANYRES_MAX); files without it hold another mode
    VISION_ASPECT_RATIO = "llava_gguf.image.vision_aspect_ratio"
    # language model
    TEMPLATE = "llava_gguf.template"
    IMAGE_TOKEN_ID = "llava_gguf.image_token_id"
    TOKENIZE_MODE = "llava_gguf.tokenize_mode"
    # the Unicode normalization (NFC, NFKC...) a tokenizer.json applies before splitting; llama.cpp applies none
    UNICODE_NORMALIZATION = "llava_gguf.tokenizer.unicode_normalization"
    # every token id that ends an answer (generation_config.json's eos_token_id list, the tokenizer's eos)
    EOS_TOKEN_IDS = "llava_gguf.eos_token_ids"
    # whether the reference tokenizer gives text after a special token the "▁" prefix (transformers' legacy)
    SPACE_AFTER_SPECIAL = "llava_gguf.tokenizer.space_after_special"


class ImageMode(str, enum.Enum):
    """How an image becomes tiles of the CLIP input size."""

    PAD = "pad"  # original LLaVA 1.5: expand to a square of the mean colour, then resize and crop
    CROP = "crop"  # llava-hf 1.5 default: resize the shortest edge, then center crop
    ANYRES = "anyres"  # LLaVA 1.6: best grid resolution, tiles plus the base image
    RESIZE = "resize"  # SiglipImageProcessor: resize to the crop size (aspect not kept), no crop
    # LLaVA-OneVision: anyres tiles only for an image alone in its prompt, the grid downscaled to N tiles'
    # worth ("anyres_max_N", `vision_aspect_ratio`); several images are one square tile each
    ANYRES_MAX = "anyres_max"


class TowerKind(str, enum.Enum):
    """The vision tower's architecture (``llava_gguf.vision.tower``)."""

    CLIP = "clip"  # CLIPVisionModel: class token, pre-layernorm, patch conv without bias
    SIGLIP = "siglip"  # SiglipVisionModel: no class token, no pre-layernorm, patch conv with bias


class SelectStrategy(str, enum.Enum):
    DEFAULT = "default"  # drop position 0 (CLIP's class token; SigLIP's first patch, as transformers does)
    FULL = "full"  # keep every position


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
    tower: TowerKind = TowerKind.CLIP
    vision_aspect_ratio: str = ""  # LLaVA-OneVision's "anyres_max_N" (ImageMode.ANYRES_MAX), else ""
    # what the file did not say and was inferred, in words (files made by other tools); the version's evidence first
    inferred: tuple[str, ...] = field(default=(), compare=False)

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def extra_tokens(self) -> int:
        """Features per tile beyond the patch grid: transformers' "default" drops position 0 (CLIP's
        class token, else SigLIP's first patch), "full" keeps every position."""
        class_tokens = 1 if self.tower is TowerKind.CLIP else 0
        return class_tokens - (1 if self.vision_feature_select_strategy == SelectStrategy.DEFAULT else 0)

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
        writer.add_float64(LlavaKeys.IMAGE_RESCALE_FACTOR, self.rescale_factor)  # float32 would move pixels
        writer.add_int32(LlavaKeys.SELECT_LAYER, self.vision_feature_layer)
        writer.add_string(LlavaKeys.SELECT_STRATEGY, self.vision_feature_select_strategy.value)
        writer.add_string(LlavaKeys.PROJECTOR_ACT, self.projector_hidden_act)
        writer.add_string(LlavaKeys.VISION_TOWER, self.tower.value)
        if self.vision_aspect_ratio:
            writer.add_string(LlavaKeys.VISION_ASPECT_RATIO, self.vision_aspect_ratio)

    @property
    def is_onevision(self) -> bool:
        """LLaVA-OneVision (kept as LLaVA 1.6 internally: its files carry 1.6's newline and pinpoints)."""
        return self.image_mode is ImageMode.ANYRES_MAX

    @property
    def description(self) -> str:
        """In words, e.g. "LLaVA 1.6 (anyres, original LLaVA rules)"."""
        rules = "original LLaVA rules" if self.follows_original_code else "transformers rules"
        if self.is_onevision:
            return f"LLaVA-OneVision ({self.vision_aspect_ratio}, {rules})"
        return f"LLaVA {self.llava_version} ({self.image_mode.value}, {rules})"

    def with_llava_version(self, version: str) -> VisionSettings:
        """These settings for another LLaVA version (``--llava-version``): 1.5 pads to a square (the
        original code) or center-crops (transformers), 1.6 cuts anyres tiles (the file's pinpoints, else
        LLaVA 1.6's own scaled to the tile)."""
        if version not in LLAVA_VERSIONS:
            raise ModelLoadError(f"unknown LLaVA version {version!r}; choose one of {', '.join(LLAVA_VERSIONS)}")
        if self.is_onevision:
            raise ModelLoadError(f"a LLaVA-OneVision mmproj ({self.vision_aspect_ratio}) runs only as LLaVA-OneVision; "
                                 f"drop --llava-version {version}")
        if version == self.llava_version:
            return self
        note = "version as asked (--llava-version)"
        if version == "1.5":
            mode = ImageMode.PAD if self.follows_original_code else ImageMode.CROP
            return replace(self, llava_version=version, image_mode=mode, image_grid_pinpoints=(),
                           mm_patch_merge_type="flat", inferred=(note, *self.inferred))
        grid = self.image_grid_pinpoints or _scaled_pinpoints(self.image_size)
        return replace(self, llava_version=version, image_mode=ImageMode.ANYRES, image_grid_pinpoints=grid,
                       mm_patch_merge_type="spatial_unpad", inferred=(note, *self.inferred))

    @classmethod
    def read(cls, reader: gguf.GGUFReader) -> VisionSettings:
        """The settings of any LLaVA mmproj: written by llava-gguf's converter (``llava_gguf.*`` keys),
        or by llama.cpp's legacy tools (only clip keys: the rest is inferred, see ``inferred``)."""
        fields = GGUFFields(reader)
        check_llava_mmproj(fields)
        if fields.get(LlavaKeys.FORMAT_VERSION) is None:
            return _infer_settings(fields)
        crop = fields.require(LlavaKeys.IMAGE_CROP_SIZE)
        mode = ImageMode(fields.require(LlavaKeys.IMAGE_MODE))
        aspect = fields.require(LlavaKeys.VISION_ASPECT_RATIO) if mode is ImageMode.ANYRES_MAX else ""
        return cls(
            llava_version=fields.require(LlavaKeys.LLAVA_VERSION),
            layout=fields.require(LlavaKeys.LAYOUT),
            image_mode=mode,
            image_size=int(fields.require(gguf.Keys.ClipVision.IMAGE_SIZE)),
            patch_size=int(fields.require(gguf.Keys.ClipVision.PATCH_SIZE)),
            shortest_edge=int(fields.require(LlavaKeys.IMAGE_SHORTEST_EDGE)),
            crop_size=(int(crop[0]), int(crop[1])),
            image_mean=_triple(fields, gguf.Keys.ClipVision.IMAGE_MEAN),
            image_std=_triple(fields, gguf.Keys.ClipVision.IMAGE_STD),
            resample=int(fields.require(LlavaKeys.IMAGE_RESAMPLE)),
            rescale_factor=_rescale_factor(float(fields.require(LlavaKeys.IMAGE_RESCALE_FACTOR))),
            vision_feature_layer=int(fields.require(LlavaKeys.SELECT_LAYER)),
            vision_feature_select_strategy=SelectStrategy(fields.require(LlavaKeys.SELECT_STRATEGY)),
            image_grid_pinpoints=_pinpoints(fields),
            mm_patch_merge_type=fields.get(ClipKeys.MM_PATCH_MERGE_TYPE) or "flat",
            projector_hidden_act=fields.require(LlavaKeys.PROJECTOR_ACT),
            tower=TowerKind(fields.get(LlavaKeys.VISION_TOWER) or TowerKind.CLIP.value),
            vision_aspect_ratio=aspect,
        )


def check_llava_mmproj(fields: GGUFFields) -> None:
    """A one-line error unless the file is an mmproj with LLaVA's MLP projector."""
    name = fields.filename
    arch = fields.get(gguf.Keys.General.ARCHITECTURE)
    if arch != "clip":
        raise GGUFFormatError(f"{name}: not an mmproj GGUF (general.architecture is {arch!r}, not 'clip')")
    projector = fields.get(gguf.Keys.Clip.PROJECTOR_TYPE) or fields.get(gguf.Keys.ClipVision.PROJECTOR_TYPE)
    if fields.get(ClipKeys.HAS_MINICPMV_PROJECTOR):
        projector = projector or "resampler (MiniCPM-V)"
    if projector is None and not fields.get(gguf.Keys.Clip.HAS_LLAVA_PROJECTOR):
        raise GGUFFormatError(
            f"{name}: a CLIP model without a LLaVA projector (no clip.projector_type, "
            "clip.has_llava_projector unset); give the mmproj made for the LLaVA model"
        )
    if projector is not None and projector != ClipKeys.PROJECTOR_MLP:
        raise GGUFFormatError(
            f"{name}: its projector is {projector!r}, not LLaVA's MLP ('mlp'); llava-gguf runs LLaVA 1.5 / 1.6 "
            "mmproj files (for other models use llama.cpp's llama-mtmd-cli)"
        )
    has_tower = fields.get(gguf.Keys.Clip.HAS_VISION_ENCODER)
    if has_tower is not None and not has_tower:
        raise GGUFFormatError(f"{name}: clip.has_vision_encoder is false: the file holds no vision tower")


def _infer_settings(fields: GGUFFields) -> VisionSettings:
    """Settings of an mmproj written by llama.cpp's legacy converter (convert_image_encoder_to_gguf.py).

    Those files come from liuhaotian's checkpoints, so the original LLaVA code is the reference:
    LLaVA 1.6 when the file carries 1.6's keys or newline vector, else 1.5, whose original config pads
    images to a square (``image_aspect_ratio: pad``); the image side is the tower's.
    """
    pinpoints = _pinpoints(fields)
    merge = fields.get(ClipKeys.MM_PATCH_MERGE_TYPE)
    aspect = fields.get(ClipKeys.IMAGE_ASPECT_RATIO)
    has_newline = any(name in fields.tensor_names for name in NEWLINE_TENSORS)
    signs = [what for what, present in (
        (ClipKeys.IMAGE_GRID_PINPOINTS, bool(pinpoints)),
        (f"{ClipKeys.MM_PATCH_MERGE_TYPE} = spatial_unpad", merge == "spatial_unpad"),
        (f"{ClipKeys.IMAGE_ASPECT_RATIO} = {aspect}", str(aspect).startswith("anyres")),
        ("an image_newline tensor", has_newline),
    ) if present]
    size = int(fields.require(gguf.Keys.ClipVision.IMAGE_SIZE))
    inferred: list[str] = []
    if signs:
        version, mode = "1.6", ImageMode.ANYRES
        inferred.append(f"version from {signs[0]}")
        if merge not in (None, "spatial_unpad"):
            raise GGUFFormatError(
                f"{fields.filename}: {ClipKeys.MM_PATCH_MERGE_TYPE} is {merge!r}; llava-gguf packs LLaVA 1.6 "
                "images only as 'spatial_unpad' (LLaVA 1.6's own)"
            )
        if not pinpoints:
            pinpoints = _scaled_pinpoints(size)
            inferred.append("LLaVA 1.6's grid pinpoints (the file names none)")
    else:
        version = "1.5"
        mode = ImageMode.CROP if aspect not in (None, "pad") else ImageMode.PAD
        inferred.append("version from the absence of LLaVA 1.6's keys and newline vector")
        if aspect is None:
            inferred.append("images padded to a square (LLaVA 1.5's image_aspect_ratio: pad)")
    return VisionSettings(
        llava_version=version,
        layout=Layout.ORIGINAL.value,
        image_mode=mode,
        image_size=size,
        patch_size=int(fields.require(gguf.Keys.ClipVision.PATCH_SIZE)),
        shortest_edge=size,
        crop_size=(size, size),
        image_mean=_triple(fields, gguf.Keys.ClipVision.IMAGE_MEAN),
        image_std=_triple(fields, gguf.Keys.ClipVision.IMAGE_STD),
        image_grid_pinpoints=pinpoints,
        mm_patch_merge_type="spatial_unpad" if version == "1.6" else "flat",
        inferred=(*inferred, "the original LLaVA code as the reference (llama.cpp's converter takes liuhaotian "
                             "checkpoints)"),
    )


# the newline vector's names: gguf-py's, and the legacy converter's (the checkpoint's own name)
NEWLINE_TENSORS = (gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_ENC_EMBD_IMGNL], "model.image_newline")


def _scaled_pinpoints(tile: int) -> tuple[tuple[int, int], ...]:
    return tuple((a * tile // 336, b * tile // 336) for a, b in LLAVA_16_PINPOINTS)


def _pinpoints(fields: GGUFFields) -> tuple[tuple[int, int], ...]:
    flat = fields.get(ClipKeys.IMAGE_GRID_PINPOINTS) or []
    if len(flat) % 2:
        raise GGUFFormatError(f"{fields.filename}: {ClipKeys.IMAGE_GRID_PINPOINTS} holds an odd count ({len(flat)})")
    # flat [a0, b0, a1, b1, ...] -> ((a0, b0), (a1, b1), ...), the config's pairs
    return tuple((int(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2))


def _rescale_factor(stored: float) -> float:
    """The processor's factor (1 / 255): files written before it was stored as float64 hold it rounded to
    float32, which moves some pixels by an ulp; 1 / n is what every processor config writes."""
    n = round(1.0 / stored) if stored > 0 else 0
    if n and struct.unpack("<f", struct.pack("<f", 1.0 / n))[0] == stored:
        return 1.0 / n
    return stored


def _triple(fields: GGUFFields, key: str) -> tuple[float, float, float]:
    values = fields.require(key)
    if len(values) != 3:
        raise GGUFFormatError(f"{fields.filename}: {key} holds {len(values)} values, expected 3 (RGB)")
    return float(values[0]), float(values[1]), float(values[2])


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

    @property
    def filename(self) -> str:
        return str(self._reader.data.filename)

    @property
    def tensor_names(self) -> set[str]:
        return {t.name for t in self._reader.tensors}

    def get(self, key: str) -> Any:
        f = self._fields.get(key)
        if f is None:
            return None
        return f.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise GGUFFormatError(f"{self.filename}: missing key {key!r}; not a complete LLaVA GGUF (convert the "
                                  "checkpoint with `llava-gguf convert`)")
        return value

    def keys(self) -> list[str]:
        return list(self._fields)


# GGUF value types (gguf.GGUFValueType) -> struct format of one scalar; STRING and ARRAY are read apart
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def read_header_keys(path: str | os.PathLike[str], keys: set[str]) -> dict[str, Any]:
    """The values of ``keys`` in a GGUF's header, read without building the rest (an LLM's vocabulary
    holds hundreds of thousands of strings, which `gguf.GGUFReader` turns into arrays one by one).
    Keys the file lacks are absent from the result."""
    wanted, found = set(keys), {}
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data[:4] != b"GGUF":
                raise GGUFFormatError(f"{path}: not a GGUF file")
            (n_kv,) = struct.unpack_from("<Q", data, 16)
            pos = 24

            def read_string(at: int) -> tuple[str, int]:
                (n,) = struct.unpack_from("<Q", data, at)
                return data[at + 8 : at + 8 + n].decode("utf-8", errors="replace"), at + 8 + n

            def read_value(kind: int, at: int, keep: bool) -> tuple[Any, int]:
                if kind == _STRING:
                    if keep:
                        return read_string(at)
                    (n,) = struct.unpack_from("<Q", data, at)
                    return None, at + 8 + n
                if kind == _ARRAY:
                    sub, n = struct.unpack_from("<IQ", data, at)
                    at += 12
                    if sub in _SCALARS:
                        size = struct.calcsize(_SCALARS[sub])
                        items = list(struct.unpack_from(f"<{n}{_SCALARS[sub]}", data, at)) if keep else None
                        return items, at + n * size
                    items = []
                    for _ in range(n):
                        item, at = read_value(sub, at, keep)
                        items.append(item)
                    return (items if keep else None), at
                fmt = "<" + _SCALARS[kind]
                return (struct.unpack_from(fmt, data, at)[0] if keep else None), at + struct.calcsize(fmt)

            for _ in range(n_kv):
                key, pos = read_string(pos)
                (kind,) = struct.unpack_from("<I", data, pos)
                value, pos = read_value(kind, pos + 4, key in wanted)
                if key in wanted:
                    found[key] = value
                    if len(found) == len(wanted):
                        break
    except FileNotFoundError as e:
        raise ModelLoadError(f"{path}: no such file") from e
    except (struct.error, KeyError, ValueError, OSError) as e:
        raise GGUFFormatError(f"{path}: not a readable GGUF header ({e})") from e
    return found
