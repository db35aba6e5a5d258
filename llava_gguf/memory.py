"""What running a model needs in memory, against what the machine has, before anything loads."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf

from llava_gguf.llm.llama import KVCacheType
from llava_gguf.machine_load import available_memory
from llava_gguf.metadata import GGUFFields, LlavaKeys, TowerKind, VisionSettings, read_gguf
from llava_gguf.packing import count_image_tokens
from llava_gguf.vision.numpy_encoder import DEFAULT_CACHE_BYTES
from llava_gguf.vision.weights import TOWER_SPECS

_KV_BYTES = {KVCacheType.F32: 4.0, KVCacheType.F16: 2.0, KVCacheType.Q8_0: 34 / 32, KVCacheType.Q4_0: 18 / 32}


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int  # the LLM file and what stays resident of the mmproj
    kv_cache: int
    vision: int  # the vision encoder's working set beyond its file: float32 copies, activations
    n_ctx: int
    available: int | None

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.vision

    @property
    def fits(self) -> bool | None:
        return None if self.available is None else self.total <= self.available


def context_needed(mmproj: Path, image_sizes_hw: Sequence[tuple[int, int]], max_tokens: int,
                   text_tokens: int = 256, llava_version: str | None = None) -> int:
    """Positions a one-shot request needs: its images' tokens, some text and the answer."""
    settings = VisionSettings.read(read_gguf(mmproj))
    if llava_version is not None:
        settings = settings.with_llava_version(llava_version)
    tiled = len(image_sizes_hw) <= 1  # LLaVA-OneVision tiles an image only when it is alone in the prompt
    return sum(count_image_tokens(size, settings, tiled=tiled) for size in image_sizes_hw) + text_tokens + max_tokens


def estimate_memory(llm_path: Path, mmproj_path: Path, *, n_ctx: int | None, kv_cache_type: KVCacheType,
                    n_tiles: int = 5, vision_cache_bytes: int = DEFAULT_CACHE_BYTES, n_seq: int = 1) -> MemoryEstimate:
    """What loading and running the pair needs. ``n_ctx=None``: the model's trained context; ``n_seq``: sequences
    of ``n_ctx`` positions each (a server's); ``vision_cache_bytes``: the NumPy encoder's cache of converted
    weights (0 with low memory)."""
    llm = GGUFFields(read_gguf(llm_path))
    arch = llm.get(gguf.Keys.General.ARCHITECTURE)
    key = lambda k: k.format(arch=arch)  # noqa: E731
    n_layer = int(llm.get(key(gguf.Keys.LLM.BLOCK_COUNT)) or 0)
    n_embd = int(llm.get(key(gguf.Keys.LLM.EMBEDDING_LENGTH)) or 0)
    n_head = int(llm.get(key(gguf.Keys.Attention.HEAD_COUNT)) or 1)
    n_head_kv = int(llm.get(key(gguf.Keys.Attention.HEAD_COUNT_KV)) or n_head)
    ctx = min(n_ctx, int(llm.get(key(gguf.Keys.LLM.CONTEXT_LENGTH)) or n_ctx)) if n_ctx else int(
        llm.get(key(gguf.Keys.LLM.CONTEXT_LENGTH)) or 4096)
    ctx *= n_seq
    n_embd_kv = n_embd * n_head_kv // n_head
    kv = int(2 * n_layer * ctx * n_embd_kv * _KV_BYTES[kv_cache_type])

    reader = read_gguf(mmproj_path)
    clip = GGUFFields(reader)
    mmproj_resident, upcast = vision_weight_bytes(reader, mmproj_path.stat().st_size, vision_cache_bytes)
    side = int(clip.get(gguf.Keys.ClipVision.IMAGE_SIZE) or 336) // int(clip.get(gguf.Keys.ClipVision.PATCH_SIZE) or 14)
    tower = TowerKind(clip.get(LlavaKeys.VISION_TOWER) or TowerKind.CLIP.value)
    tokens = side * side + (1 if TOWER_SPECS[tower].class_token else 0)  # positions through the blocks
    hidden = int(clip.get(gguf.Keys.ClipVision.EMBEDDING_LENGTH) or 1024)
    ffn = int(clip.get(gguf.Keys.ClipVision.FEED_FORWARD_LENGTH) or 4 * hidden)
    heads = int(clip.get(gguf.Keys.ClipVision.Attention.HEAD_COUNT) or 16)
    # one tile's block at a time: attention scores [heads, T, T], the MLP's [T, ffn] twice, a few
    # [T, hidden]; every tile's hidden states [T, hidden] (twice while a layer replaces them)
    activations = 4 * (heads * tokens * tokens + 2 * tokens * ffn + 8 * tokens * hidden + 2 * n_tiles * tokens * hidden)
    outputs = 4 * n_tiles * tokens * n_embd  # projected features of every tile
    weights = llm_path.stat().st_size + mmproj_resident
    return MemoryEstimate(weights, kv, upcast + activations + outputs, ctx, available_memory())


def vision_weight_bytes(reader: gguf.GGUFReader, file_size: int, cache_bytes: int) -> tuple[int, int]:
    """(bytes of the mmproj file resident, bytes of float32 copies held) while the NumPy encoder runs.

    It computes in float32: float16 / quantized tensors are converted a layer at a time (the
    embeddings, each block, the projector), kept up to ``cache_bytes``, and their file pages leave
    resident memory once converted; float32 tensors are used in place.
    """
    f32: dict[str, int] = defaultdict(int)  # by layer
    stored: dict[str, int] = defaultdict(int)
    for t in reader.tensors:
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            block = re.search(r"\bblk\.\d+\.", t.name)
            layer = block.group(0) if block else t.name.split(".")[0]
            f32[layer] += 4 * int(t.n_elements)
            stored[layer] += int(t.n_bytes)
    resident = file_size - sum(stored.values()) + max(stored.values(), default=0)
    return resident, min(sum(f32.values()), cache_bytes + max(f32.values(), default=0))
