"""An mmproj's vision tower and projector as every encoder reads it: the tensors (memory-mapped, or
dequantized on access), the tower's hyperparameters, and which tensor plays which part, whichever
converter wrote the file (llava-gguf's, or llama.cpp's legacy one with its trimmed tower, swapped
FFN names and ``model.image_newline``).

Weights keep torch's shapes (``GGUFReader`` reverses ggml's ``ne`` order); linear weights are ``[out, in]``.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import gguf
import numpy as np

from llava_gguf.errors import GGUFFormatError
from llava_gguf.metadata import (
    NEWLINE_TENSORS,
    ClipKeys,
    GGUFFields,
    SelectStrategy,
    TowerKind,
    VisionSettings,
    read_gguf,
)

PLAIN_TYPES = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
# what the encoders compute: the projector's, CLIP's MLP's and SigLIP's (torch's tanh GELU)
ACTIVATION_NAMES = ("gelu", "quick_gelu", "gelu_pytorch_tanh")

log = logging.getLogger(__name__)


class GGUFTensors(Mapping[str, np.ndarray]):
    """The tensors of a GGUF file by name, in torch's shapes.

    F32 and F16 tensors are memory-mapped views (no copy); quantized tensors are dequantized to
    float32 on each access, so callers should convert once per use.
    """

    def __init__(self, reader: gguf.GGUFReader) -> None:
        self._tensors = {t.name: t for t in reader.tensors}
        # the read-only shared file mapping under every view; dropping its pages loses nothing
        # (a copy-on-write mapping's pages would be lost, so those are never dropped)
        shared = getattr(reader.data, "mode", None) == "r"
        self._mapping = getattr(reader.data, "_mmap", None) if shared and hasattr(mmap, "MADV_DONTNEED") else None

    def __contains__(self, name: object) -> bool:
        return name in self._tensors  # without dequantizing, as Mapping's would

    def release_pages(self) -> None:
        """Drop the file's pages from this process's resident memory (the page cache keeps them)."""
        if self._mapping is not None:
            self._madvise(0, len(self._mapping))

    def release_tensor(self, name: str) -> None:
        """Drop one tensor's whole pages from resident memory, once it has been converted."""
        if self._mapping is None:
            return
        t = self._tensors[name]
        start = -(-int(t.data_offset) // mmap.PAGESIZE) * mmap.PAGESIZE  # first whole page
        end = (int(t.data_offset) + int(t.n_bytes)) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start:
            self._madvise(start, end - start)

    def _madvise(self, start: int, length: int) -> None:
        """Only an optimisation: where the kernel refuses (locked memory...), pages stay resident."""
        assert self._mapping is not None
        try:
            self._mapping.madvise(mmap.MADV_DONTNEED, start, length)
        except OSError as e:
            log.debug("pages of the mmproj stay resident: madvise refused (%s)", e)
            self._mapping = None

    def __getitem__(self, name: str) -> np.ndarray:
        t = self._tensors[name]
        if t.tensor_type in PLAIN_TYPES:
            return t.data
        # t.data: [..., n_bytes] uint8 blocks -> [..., n_elements] float32
        return gguf.quants.dequantize(t.data, t.tensor_type)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def is_quantized(self, name: str) -> bool:
        return self._tensors[name].tensor_type not in PLAIN_TYPES

    def shape(self, name: str) -> tuple[int, ...]:
        """Torch's shape, without dequantizing: ggml's ne order reversed."""
        return tuple(int(n) for n in reversed(self._tensors[name].shape))


def load_mmproj_tensors(path: str | os.PathLike[str]) -> GGUFTensors:
    """The tensors of an mmproj GGUF, memory-mapped (F32/F16) or dequantized lazily (quantized)."""
    return GGUFTensors(read_gguf(path))


@dataclass(frozen=True)
class TowerSpec:
    """What one tower kind's graph has; the encoders and the converter read it, one path for all kinds."""

    class_token: bool  # a class embedding before the patches (position row 0 is its)
    pre_layernorm: bool  # a layernorm on the embeddings (CLIP's pre_layrnorm)
    patch_bias: bool  # the patch convolution has a bias
    mlp_activation: str | None  # the blocks' MLP activation; None: from clip.use_gelu (gelu or quick_gelu)


TOWER_SPECS: dict[TowerKind, TowerSpec] = {
    TowerKind.CLIP: TowerSpec(class_token=True, pre_layernorm=True, patch_bias=False, mlp_activation=None),
    TowerKind.SIGLIP: TowerSpec(class_token=False, pre_layernorm=False, patch_bias=True,
                                mlp_activation="gelu_pytorch_tanh"),
}


@dataclass(frozen=True)
class VisionTowerConfig:
    """Hyperparameters of the part of the CLIP tower that runs, plus LLaVA's feature selection.

    ``vision_feature_layer`` is the index into transformers' ``hidden_states`` (0 is the
    embeddings output), so it is also the number of blocks that run.
    """

    hidden_size: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    vision_feature_layer: int
    vision_feature_select_strategy: SelectStrategy = SelectStrategy.DEFAULT
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"  # the blocks' MLP activation
    projector_hidden_act: str = "gelu"
    tower: TowerKind = TowerKind.CLIP

    @property
    def spec(self) -> TowerSpec:
        return TOWER_SPECS[self.tower]

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        """Tokens through the blocks: the patches, after the class token where the tower has one."""
        return self.num_patches + (1 if self.spec.class_token else 0)

    @property
    def n_tokens(self) -> int:
        """Image features per tile: every position under "full"; "default" drops position 0 (as transformers)."""
        default = self.vision_feature_select_strategy == SelectStrategy.DEFAULT
        return self.num_positions - (1 if default else 0)

    @classmethod
    def read(cls, reader: gguf.GGUFReader, settings: VisionSettings | None = None) -> VisionTowerConfig:
        """The tower of any LLaVA mmproj. Without ``clip.vision.feature_layer`` (llama.cpp's legacy
        converter trims the tower to the selected layer) every stored block runs."""
        settings = settings or VisionSettings.read(reader)
        fields = GGUFFields(reader)
        block_count = int(fields.require(gguf.Keys.ClipVision.BLOCK_COUNT))
        feature_layer = fields.get(ClipKeys.FEATURE_LAYER)
        if feature_layer is None:
            feature_layer = [block_count]
        if len(feature_layer) != 1:
            raise GGUFFormatError(
                f"{fields.filename}: {ClipKeys.FEATURE_LAYER} holds {len(feature_layer)} layers; "
                "only one selected hidden state is supported"
            )
        layer = int(feature_layer[0])
        if not 0 <= layer <= block_count:
            raise GGUFFormatError(
                f"{fields.filename}: feature layer {layer} is outside the {block_count} stored blocks"
            )
        use_gelu = fields.get(gguf.Keys.ClipVision.USE_GELU)
        spec = TOWER_SPECS[settings.tower]
        return cls(
            hidden_size=int(fields.require(gguf.Keys.ClipVision.EMBEDDING_LENGTH)),
            num_attention_heads=int(fields.require(gguf.Keys.ClipVision.Attention.HEAD_COUNT)),
            image_size=settings.image_size,
            patch_size=settings.patch_size,
            vision_feature_layer=layer,
            vision_feature_select_strategy=settings.vision_feature_select_strategy,
            layer_norm_eps=float(fields.require(gguf.Keys.ClipVision.Attention.LAYERNORM_EPS)),
            hidden_act=spec.mlp_activation or ("gelu" if use_gelu else "quick_gelu"),
            projector_hidden_act=settings.projector_hidden_act,
            tower=settings.tower,
        )


def tensor_name(tensor: gguf.MODEL_TENSOR, suffix: str = "", bid: int | None = None) -> str:
    """gguf-py's name of a tensor (``bid``: its block), plus ``suffix`` (".weight", ".bias")."""
    base = gguf.TENSOR_NAMES[tensor]
    return (base.format(bid=bid) if bid is not None else base) + suffix


@dataclass(frozen=True)
class BlockNames:
    """One encoder layer's tensors (names without ".weight" / ".bias")."""

    ln1: str
    q: str
    k: str
    v: str
    out: str
    ln2: str
    fc1: str  # [ffn, hidden]: reads the hidden state
    fc2: str  # [hidden, ffn]


class TowerLayout:
    """Which tensor of an mmproj plays which part of the reference graph, checked for presence and shape.

    Names are without ".weight" / ".bias" except where a tensor has no suffix (the class embedding,
    the newline vector).
    """

    patch = tensor_name(gguf.MODEL_TENSOR.V_ENC_EMBD_PATCH)
    class_embedding = tensor_name(gguf.MODEL_TENSOR.V_ENC_EMBD_CLS)
    position = tensor_name(gguf.MODEL_TENSOR.V_ENC_EMBD_POS)
    pre_layernorm = tensor_name(gguf.MODEL_TENSOR.V_PRE_NORM)

    def __init__(self, tensors: Mapping[str, np.ndarray], config: VisionTowerConfig, source: str) -> None:
        self._tensors = tensors
        self.config = config
        self.source = source
        self._check_present()
        self.blocks = [self._block(i) for i in range(config.vision_feature_layer)]
        # the projector: linear_1 (mm.0), then linear_2 (mm.2) when it is an MLP
        candidates = [tensor_name(gguf.MODEL_TENSOR.V_MMPROJ, "", 0), tensor_name(gguf.MODEL_TENSOR.V_MMPROJ, "", 2)]
        self.projector = [n for n in candidates if n + ".weight" in tensors]
        self.newline = next((n for n in NEWLINE_TENSORS if n in tensors), None)
        self._check_shapes()

    def shape(self, name: str) -> tuple[int, ...]:
        """Torch's shape of a stored tensor, without dequantizing it."""
        if isinstance(self._tensors, GGUFTensors):
            return self._tensors.shape(name)
        return tuple(self._tensors[name].shape)

    def has(self, name: str) -> bool:
        return name in self._tensors

    @property
    def llm_hidden_size(self) -> int:
        return self.shape(self.projector[-1] + ".weight")[0]

    def _block(self, i: int) -> BlockNames:
        t = gguf.MODEL_TENSOR
        fc1, fc2 = self._ffn_names(i)
        return BlockNames(
            ln1=tensor_name(t.V_ENC_INPUT_NORM, "", i), q=tensor_name(t.V_ENC_ATTN_Q, "", i),
            k=tensor_name(t.V_ENC_ATTN_K, "", i), v=tensor_name(t.V_ENC_ATTN_V, "", i),
            out=tensor_name(t.V_ENC_ATTN_O, "", i), ln2=tensor_name(t.V_ENC_POST_ATTN_NORM, "", i), fc1=fc1, fc2=fc2,
        )

    def _ffn_names(self, i: int) -> tuple[str, str]:
        """(fc1, fc2) of block ``i``. llama.cpp's legacy converter stores fc1 as ``ffn_down`` and fc2 as
        ``ffn_up``; the shapes tell: fc1 [ffn, hidden] reads the hidden state, fc2 [hidden, ffn] the
        FFN's (as llama.cpp's clip.cpp decides; a square FFN keeps the names)."""
        up = tensor_name(gguf.MODEL_TENSOR.V_ENC_FFN_UP, "", i)
        down = tensor_name(gguf.MODEL_TENSOR.V_ENC_FFN_DOWN, "", i)
        hidden = self.config.hidden_size
        up_in, down_in = self.shape(up + ".weight")[-1], self.shape(down + ".weight")[-1]
        if down_in == hidden and up_in != hidden:
            return down, up
        if up_in != hidden:
            raise GGUFFormatError(
                f"{self.source}: block {i}'s FFN weights read widths {up_in} and {down_in}, neither the hidden "
                f"size {hidden}"
            )
        return up, down

    _BLOCK_TENSORS = (
        gguf.MODEL_TENSOR.V_ENC_INPUT_NORM,
        gguf.MODEL_TENSOR.V_ENC_ATTN_Q,
        gguf.MODEL_TENSOR.V_ENC_ATTN_K,
        gguf.MODEL_TENSOR.V_ENC_ATTN_V,
        gguf.MODEL_TENSOR.V_ENC_ATTN_O,
        gguf.MODEL_TENSOR.V_ENC_POST_ATTN_NORM,
        gguf.MODEL_TENSOR.V_ENC_FFN_UP,
        gguf.MODEL_TENSOR.V_ENC_FFN_DOWN,
    )

    def _check_present(self) -> None:
        spec = self.config.spec
        required = [self.patch + ".weight", self.position + ".weight", tensor_name(gguf.MODEL_TENSOR.V_MMPROJ, ".weight", 0)]
        required += [self.class_embedding] if spec.class_token else []
        required += [self.pre_layernorm + ".weight"] if spec.pre_layernorm else []
        required += [self.patch + ".bias"] if spec.patch_bias else []
        for i in range(self.config.vision_feature_layer):
            for tensor in self._BLOCK_TENSORS:
                required += [tensor_name(tensor, ".weight", i), tensor_name(tensor, ".bias", i)]
        missing = [n for n in required if n not in self._tensors]
        if missing:
            raise GGUFFormatError(
                f"{self.source}: not a complete LLaVA mmproj: {len(missing)} tensor(s) missing, first {missing[0]!r}"
            )

    def _check_shapes(self) -> None:
        cfg = self.config
        h, p = cfg.hidden_size, cfg.patch_size
        patch = self.shape(self.patch + ".weight")
        if patch != (h, 3, p, p):
            raise GGUFFormatError(f"{self.source}: patch embedding has shape {patch}, expected {(h, 3, p, p)}")
        pos = self.shape(self.position + ".weight")
        if pos != (cfg.num_positions, h):
            raise GGUFFormatError(
                f"{self.source}: position embedding has shape {pos}, expected {(cfg.num_positions, h)}"
            )
        if h % cfg.num_attention_heads:
            raise GGUFFormatError(f"{self.source}: hidden size {h} is not a multiple of {cfg.num_attention_heads} heads")
        ffn = self.shape(self.blocks[0].fc1 + ".weight")[0] if self.blocks else 0
        expected: dict[str, tuple[int, ...]] = {self.pre_layernorm + ".weight": (h,), self.patch + ".bias": (h,)}
        for b in self.blocks:
            expected.update({b.ln1 + ".weight": (h,), b.ln2 + ".weight": (h,), b.fc1 + ".weight": (ffn, h),
                             b.fc2 + ".weight": (h, ffn), b.fc1 + ".bias": (ffn,), b.fc2 + ".bias": (h,)})
            for name in (b.q, b.k, b.v, b.out):
                expected.update({name + ".weight": (h, h), name + ".bias": (h,)})
        width = h  # the projector: linear_1 reads the tower's width, linear_2 linear_1's output
        for name in self.projector:
            out = self.shape(name + ".weight")[0]
            expected[name + ".weight"] = (out, width)
            width = out
        for name, shape in expected.items():
            if self.has(name) and self.shape(name) != shape:
                raise GGUFFormatError(f"{self.source}: {name} has shape {self.shape(name)}, expected {shape}; "
                                      "not a LLaVA mmproj this tower's sizes describe")
        for act in (cfg.hidden_act, cfg.projector_hidden_act):
            if act not in ACTIVATION_NAMES:
                raise GGUFFormatError(f"{self.source}: unsupported activation {act!r}; known: {sorted(ACTIVATION_NAMES)}")


def read_tower(path: str | os.PathLike[str], settings: VisionSettings | None = None) -> tuple[GGUFTensors, TowerLayout]:
    """An mmproj's tensors and their layout. ``settings``: the file's, already read (or overridden)."""
    reader = read_gguf(path)
    tensors = GGUFTensors(reader)
    return tensors, TowerLayout(tensors, VisionTowerConfig.read(reader, settings), os.fspath(path))
