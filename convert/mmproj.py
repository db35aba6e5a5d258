"""The vision half: CLIP or SigLIP tower, projector and ``image_newline`` as an "mmproj" GGUF that
llama.cpp's libmtmd loads and the runtime's exact encoder reads."""

from __future__ import annotations

import enum
from pathlib import Path

import gguf
import numpy as np

from llava_gguf.convert.checkpoint import LlavaCheckpoint
from llava_gguf.convert.names import Layout, block_index, canonical_name, gguf_name, is_vision
from llava_gguf.convert.tensors import TensorStore
from llava_gguf.convert.writer import PlannedTensor, ProgressCallback, write_gguf
from llava_gguf.errors import CheckpointError
from llava_gguf.metadata import ClipKeys
from llava_gguf.vision.weights import TOWER_SPECS, TowerLayout

ARCH = gguf.MODEL_ARCH.MMPROJ
Q = gguf.GGMLQuantizationType


class MmprojType(str, enum.Enum):
    F16 = "f16"
    F32 = "f32"
    Q8_0 = "q8_0"


def feature_layer(ckpt: LlavaCheckpoint) -> int:
    """The selected hidden state in transformers' numbering (0 = embeddings), non-negative."""
    n = ckpt.vision.num_hidden_layers
    k = ckpt.settings.vision_feature_layer
    index = k if k >= 0 else n + 1 + k
    if not 0 < index <= n:
        raise CheckpointError(f"{ckpt.path}: vision feature layer {k} is out of range for {n} layers")
    return index


def _storage_type(gguf_tensor: str, shape: tuple[int, ...], kind: MmprojType) -> Q:
    if len(shape) == 1 or gguf_tensor == "v.class_embd" or kind is MmprojType.F32:
        return Q.F32
    # the patch conv and position table stay f16: llama.cpp convolves and gathers rows in f16/f32
    is_matrix = gguf_tensor.startswith(("v.blk.", "mm.")) and len(shape) == 2 and shape[-1] % 32 == 0
    if kind is MmprojType.Q8_0 and is_matrix:
        return Q.Q8_0
    return Q.F16


def plan_mmproj_tensors(
    ckpt: LlavaCheckpoint, store: TensorStore, clip_store: TensorStore | None, kind: MmprojType
) -> list[PlannedTensor]:
    n_blocks = feature_layer(ckpt)
    sources: dict[str, tuple[TensorStore, str]] = {}
    for name in store.names():
        c = canonical_name(name, ckpt.layout)
        if c is not None and is_vision(c):
            sources[c] = (store, name)
    if clip_store is not None:
        for name in clip_store.names():
            c = canonical_name(name, Layout.CLIP)
            if c is not None:
                sources[c] = (clip_store, name)
    planned = []
    for c, (src, name) in sources.items():
        block = block_index(c)
        if block is not None and block >= n_blocks:
            continue  # layers after the selected hidden state never run
        shape = src.ref(name).shape
        if c == "model.image_newline" and ckpt.llava_version != "1.6":
            continue
        target = gguf_name(c, ARCH, ckpt.vision.num_hidden_layers)

        def produce(src: TensorStore = src, name: str = name) -> np.ndarray:
            return src.load(name)

        planned.append(PlannedTensor(target, shape, _storage_type(target, shape, kind), produce))
    _check_complete(ckpt, {t.name for t in planned}, n_blocks)
    planned.sort(key=_tensor_order)
    return planned


def _tensor_order(t: PlannedTensor) -> tuple[int, int, str]:
    block = t.name.split(".")[2] if t.name.startswith("v.blk.") else None
    group = 1 if block is not None else (2 if t.name.startswith("mm.") else 0)
    return group, int(block) if block is not None else -1, t.name


def _check_complete(ckpt: LlavaCheckpoint, names: set[str], n_blocks: int) -> None:
    spec = TOWER_SPECS[ckpt.vision.tower]
    required = [TowerLayout.patch + ".weight", TowerLayout.position + ".weight", "mm.0.weight"]
    required += [TowerLayout.class_embedding] if spec.class_token else []
    required += [TowerLayout.pre_layernorm + ".weight"] if spec.pre_layernorm else []
    required += [TowerLayout.patch + ".bias"] if spec.patch_bias else []
    if ckpt.projector_type == "mlp2x_gelu":
        required.append("mm.2.weight")
    if ckpt.llava_version == "1.6":
        required.append("v.image_newline")
    for i in range(n_blocks):
        required += [f"v.blk.{i}.{t}.weight" for t in ("attn_q", "attn_k", "attn_v", "attn_out", "ln1", "ln2", "ffn_up", "ffn_down")]
    missing = [n for n in required if n not in names]
    if missing:
        where = f"{ckpt.path}" + (f" / {ckpt.clip_path}" if ckpt.clip_weights_from_repo else "")
        raise CheckpointError(
            f"{where}: {len(missing)} vision tensor(s) missing, e.g. {missing[0]!r}; "
            "the checkpoint (or its CLIP vision tower) is incomplete"
        )


def write_mmproj(
    ckpt: LlavaCheckpoint,
    store: TensorStore,
    clip_store: TensorStore | None,
    path: Path,
    kind: MmprojType = MmprojType.F16,
    progress: ProgressCallback | None = None,
) -> None:
    tensors = plan_mmproj_tensors(ckpt, store, clip_store, kind)
    vision, settings = ckpt.vision, ckpt.settings
    n_blocks = feature_layer(ckpt)
    writer = gguf.GGUFWriter(path, "clip")
    writer.add_name(f"{ckpt.name} mmproj")
    writer.add_file_type({MmprojType.F32: 0, MmprojType.F16: 1, MmprojType.Q8_0: 7}[kind])
    writer.add_clip_has_vision_encoder(True)
    writer.add_bool(gguf.Keys.Clip.HAS_LLAVA_PROJECTOR, True)
    writer.add_clip_projector_type(ClipKeys.PROJECTOR_MLP)
    writer.add_vision_image_size(vision.image_size)
    writer.add_vision_patch_size(vision.patch_size)
    writer.add_vision_embedding_length(vision.hidden_size)
    writer.add_vision_feed_forward_length(vision.intermediate_size)
    writer.add_vision_block_count(n_blocks)
    writer.add_vision_projection_dim(ckpt.text.hidden_size)
    writer.add_vision_head_count(vision.num_attention_heads)
    writer.add_vision_attention_layernorm_eps(vision.layer_norm_eps)
    writer.add_vision_image_mean(list(settings.image_mean))
    writer.add_vision_image_std(list(settings.image_std))
    # CLIP-L's MLP uses quick-gelu; SigLIP's the tanh GELU (clip.cpp's FFN_GELU)
    writer.add_vision_use_gelu(vision.hidden_act in ("gelu", "gelu_pytorch_tanh"))
    writer.add_array(ClipKeys.FEATURE_LAYER, [n_blocks])
    if ckpt.llava_version == "1.6":
        # flat [h0, w0, h1, w1, ...], int32 as llama.cpp reads it
        flat = [int(x) for hw in settings.image_grid_pinpoints for x in hw]
        writer.add_key_value(ClipKeys.IMAGE_GRID_PINPOINTS, flat, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
        writer.add_string(ClipKeys.MM_PATCH_MERGE_TYPE, settings.mm_patch_merge_type)
    settings.write(writer)
    write_gguf(writer, tensors, progress)
