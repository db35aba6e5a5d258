"""Synthetic LLaVA checkpoints at real shapes, random weights, written without torch.

The llava-hf layout (transformers-4 key spelling, what the Hub repos hold): a LLaVA 1.5
``LlavaForConditionalGeneration`` and a LLaVA 1.6 ``LlavaNextForConditionalGeneration`` with
the real pinpoints. Both share the language model: the 1.6 directory hard-links the 1.5
shards and adds one shard for ``image_newline``. Weights are float16 normal draws taken from
one shared pool at random offsets, written tensor by tensor, so the generator holds about
one shard in memory whatever the model's size.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

SP_VOCAB_SIZE = 480
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# LLaVA 1.6's pinpoints in units of the 336 px tile
PINPOINT_TILES = [[1, 2], [2, 1], [2, 2], [3, 1], [1, 3]]
SHARD_BYTES = 2 << 30
_POOL_SIZE = 1 << 24  # float16 normal draws shared by every tensor


@dataclass(frozen=True)
class VisionShape:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    projection_dim: int = 768


@dataclass(frozen=True)
class TextShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int = 32064  # llava-hf: 32000 Vicuna pieces, <image> = 32000, <pad> = 32001, padded to 64
    max_position_embeddings: int = 4096


@dataclass(frozen=True)
class Shape:
    name: str
    text: TextShape
    vision: VisionShape

    @property
    def image_token_id(self) -> int:
        return 32000 if self.text.vocab_size > 32000 else SP_VOCAB_SIZE


SHAPES: dict[str, Shape] = {
    # Vicuna-7B (LLaVA 1.5 / 1.6 7B) with CLIP ViT-L/14-336
    "7b": Shape("7b", TextShape(4096, 11008, 32, 32, 32), VisionShape()),
    # TinyLlama-1.1B's shape with the same CLIP tower
    "1b": Shape("1b", TextShape(2048, 5632, 22, 32, 4), VisionShape()),
    # seconds, for the test: k-quant friendly widths, a 56 px tower
    "tiny": Shape("tiny", TextShape(256, 512, 2, 4, 2, vocab_size=SP_VOCAB_SIZE + 2, max_position_embeddings=8192),
                  VisionShape(64, 128, 3, 4, 56, 14, 64)),
}


def pinpoints(shape: Shape) -> list[list[int]]:
    s = shape.vision.image_size
    return [[h * s, w * s] for h, w in PINPOINT_TILES]


# ---------------------------------------------------------------- tokenizer


def _training_lines(n_lines: int = 2000, seed: int = 0) -> Iterator[str]:
    rng = random.Random(seed)
    syllables = ["ka", "to", "ri", "men", "sa", "lo", "ver", "the", "an", "in", "ing", "er", "ed", "st",
                 "qu", "ch", "sh", "ou", "ea", "ai", "or", "ly", "ion", "ent", "al", "re", "de", "un"]
    words = ["USER", "ASSISTANT", "image", "what", "is", "in", "this", "describe", "the", "a", "picture"]
    words += ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    for _ in range(n_lines):
        yield " ".join(rng.choice(words) for _ in range(rng.randint(3, 14)))


def train_tokenizer(root: Path) -> Path:
    """A small LLaMA-style SentencePiece BPE model (byte fallback); any valid vocab serves for speed."""
    import sentencepiece as spm

    root.mkdir(parents=True, exist_ok=True)
    prefix = root / "tokenizer"
    if not prefix.with_suffix(".model").exists():
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(), model_prefix=str(prefix), model_type="bpe",
            vocab_size=SP_VOCAB_SIZE, byte_fallback=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True, unk_id=0, bos_id=1,
            eos_id=2, pad_id=-1, character_coverage=1.0, num_threads=1, minloglevel=2,
        )
    return prefix.with_suffix(".model")


# ---------------------------------------------------------------- tensors


def _vision_tensors(v: VisionShape) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """(name, torch shape, init kind) of CLIPVisionModel's vision_model, llava-hf prefix."""
    p = "vision_tower.vision_model."
    n_pos = (v.image_size // v.patch_size) ** 2 + 1
    yield p + "embeddings.class_embedding", (v.hidden_size,), "unit"
    yield p + "embeddings.patch_embedding.weight", (v.hidden_size, 3, v.patch_size, v.patch_size), "linear"
    yield p + "embeddings.position_embedding.weight", (n_pos, v.hidden_size), "embed"
    yield p + "pre_layrnorm.weight", (v.hidden_size,), "ones"
    yield p + "pre_layrnorm.bias", (v.hidden_size,), "bias"
    for i in range(v.num_hidden_layers):
        q = f"{p}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            yield q + f"self_attn.{proj}.weight", (v.hidden_size, v.hidden_size), "linear"
            yield q + f"self_attn.{proj}.bias", (v.hidden_size,), "bias"
        for norm in ("layer_norm1", "layer_norm2"):
            yield q + f"{norm}.weight", (v.hidden_size,), "ones"
            yield q + f"{norm}.bias", (v.hidden_size,), "bias"
        yield q + "mlp.fc1.weight", (v.intermediate_size, v.hidden_size), "linear"
        yield q + "mlp.fc1.bias", (v.intermediate_size,), "bias"
        yield q + "mlp.fc2.weight", (v.hidden_size, v.intermediate_size), "linear"
        yield q + "mlp.fc2.bias", (v.hidden_size,), "bias"
    yield p + "post_layernorm.weight", (v.hidden_size,), "ones"
    yield p + "post_layernorm.bias", (v.hidden_size,), "bias"


def _projector_tensors(v: VisionShape, t: TextShape) -> Iterator[tuple[str, tuple[int, ...], str]]:
    yield "multi_modal_projector.linear_1.weight", (t.hidden_size, v.hidden_size), "linear"
    yield "multi_modal_projector.linear_1.bias", (t.hidden_size,), "bias"
    yield "multi_modal_projector.linear_2.weight", (t.hidden_size, t.hidden_size), "linear"
    yield "multi_modal_projector.linear_2.bias", (t.hidden_size,), "bias"


def _text_tensors(t: TextShape) -> Iterator[tuple[str, tuple[int, ...], str]]:
    p = "language_model.model."
    head = t.hidden_size // t.num_attention_heads
    kv = t.num_key_value_heads * head
    yield p + "embed_tokens.weight", (t.vocab_size, t.hidden_size), "embed"
    for i in range(t.num_hidden_layers):
        q = f"{p}layers.{i}."
        yield q + "input_layernorm.weight", (t.hidden_size,), "ones"
        yield q + "self_attn.q_proj.weight", (t.hidden_size, t.hidden_size), "linear"
        yield q + "self_attn.k_proj.weight", (kv, t.hidden_size), "linear"
        yield q + "self_attn.v_proj.weight", (kv, t.hidden_size), "linear"
        yield q + "self_attn.o_proj.weight", (t.hidden_size, t.hidden_size), "linear"
        yield q + "post_attention_layernorm.weight", (t.hidden_size,), "ones"
        yield q + "mlp.gate_proj.weight", (t.intermediate_size, t.hidden_size), "linear"
        yield q + "mlp.up_proj.weight", (t.intermediate_size, t.hidden_size), "linear"
        yield q + "mlp.down_proj.weight", (t.hidden_size, t.intermediate_size), "linear"
    yield p + "norm.weight", (t.hidden_size,), "ones"
    yield "language_model.lm_head.weight", (t.vocab_size, t.hidden_size), "linear"


class _Draws:
    """Float16 tensors cut from one pool of standard normal draws at random offsets, then scaled."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.pool = self.rng.standard_normal(_POOL_SIZE, dtype=np.float32).astype(np.float16)

    def tensor(self, shape: tuple[int, ...], kind: str) -> np.ndarray:
        n = int(np.prod(shape))
        if kind == "ones":
            return (1.0 + 0.1 * self._flat(n)).astype(np.float16).reshape(shape)
        std = {"linear": 1.0 / np.sqrt(np.prod(shape[1:])), "embed": 0.5, "unit": 1.0, "bias": 0.02}[kind]
        return (self._flat(n) * np.float16(std)).reshape(shape)

    def _flat(self, n: int) -> np.ndarray:
        out = np.empty(n, dtype=np.float16)
        done = 0
        while done < n:
            start = int(self.rng.integers(0, _POOL_SIZE // 2))
            k = min(n - done, _POOL_SIZE - start)
            out[done : done + k] = self.pool[start : start + k]
            done += k
        return out


def _write_shards(dest: Path, specs: list[tuple[str, tuple[int, ...], str]], draws: _Draws, stem: str,
                  first: int, total: int) -> dict[str, str]:
    """Write ``specs`` as shards ``stem-{first..}-of-{total}``; returns the weight map."""
    weight_map: dict[str, str] = {}
    shard: dict[str, np.ndarray] = {}
    size, index = 0, first

    def flush() -> None:
        nonlocal shard, size, index
        name = f"{stem}-{index:05d}-of-{total:05d}.safetensors"
        save_file(shard, str(dest / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard, size, index = {}, 0, index + 1

    for name, shape, kind in specs:
        nbytes = 2 * int(np.prod(shape))
        if shard and size + nbytes > SHARD_BYTES:
            flush()
        shard[name] = draws.tensor(shape, kind)
        size += nbytes
    if shard:
        flush()
    return weight_map


def _n_shards(specs: list[tuple[str, tuple[int, ...], str]]) -> int:
    n, size = 1, 0
    for _, shape, _ in specs:
        nbytes = 2 * int(np.prod(shape))
        if size and size + nbytes > SHARD_BYTES:
            n, size = n + 1, 0
        size += nbytes
    return n


# ---------------------------------------------------------------- configs


def _llava_config(shape: Shape, version: str) -> dict[str, Any]:
    t, v = shape.text, shape.vision
    config: dict[str, Any] = {
        "architectures": ["LlavaForConditionalGeneration" if version == "1.5" else "LlavaNextForConditionalGeneration"],
        "model_type": "llava" if version == "1.5" else "llava_next",
        "ignore_index": -100,
        "image_token_index": shape.image_token_id,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "image_seq_length": (v.image_size // v.patch_size) ** 2,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "text_config": {
            "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
            "vocab_size": t.vocab_size, "max_position_embeddings": t.max_position_embeddings,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None, "hidden_act": "silu",
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
            "pad_token_id": shape.image_token_id + 1, "torch_dtype": "float16",
        },
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_hidden_layers,
            "num_attention_heads": v.num_attention_heads, "image_size": v.image_size,
            "patch_size": v.patch_size, "projection_dim": v.projection_dim, "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5, "num_channels": 3,
        },
    }
    if version == "1.6":
        config["image_grid_pinpoints"] = pinpoints(shape)
    return config


def _preprocessor_config(shape: Shape, version: str) -> dict[str, Any]:
    s = shape.vision.image_size
    config: dict[str, Any] = {
        "crop_size": {"height": s, "width": s}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": OPENAI_CLIP_MEAN,
        "image_std": OPENAI_CLIP_STD, "resample": 3, "rescale_factor": 1 / 255, "size": {"shortest_edge": s},
        "image_processor_type": "CLIPImageProcessor" if version == "1.5" else "LlavaNextImageProcessor",
        "processor_class": "LlavaProcessor" if version == "1.5" else "LlavaNextProcessor",
    }
    if version == "1.6":
        config.update({"do_pad": True, "image_grid_pinpoints": pinpoints(shape)})
    return config


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _write_tokenizer(dest: Path, sp_model: Path, image_token_id: int) -> None:
    (dest / "tokenizer.model").write_bytes(sp_model.read_bytes())

    def added(content: str) -> dict[str, Any]:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True}

    decoder = {str(i): added(t) for i, t in enumerate(["<unk>", "<s>", "</s>"])}
    decoder[str(image_token_id)] = added("<image>")
    decoder[str(image_token_id + 1)] = added("<pad>")
    _write_json(dest / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder, "bos_token": "<s>",
        "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "legacy": False,
        "model_max_length": 4096, "tokenizer_class": "LlamaTokenizer", "padding_side": "left",
    })
    _write_json(dest / "special_tokens_map.json",
                {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"})


# ---------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class Checkpoints:
    llava15: Path
    llava16: Path
    size_bytes: int  # the 1.5 checkpoint's safetensors
    largest_tensor_bytes: int
    largest_tensor: str


def build_checkpoints(root: Path, shape: Shape, seed: int = 0) -> Checkpoints:
    """Write (or reuse) the LLaVA 1.5 and 1.6 checkpoints of ``shape`` under ``root``."""
    llava15, llava16 = root / f"llava-1.5-{shape.name}-hf", root / f"llava-1.6-{shape.name}-hf"
    done = root / f"{shape.name}.json"
    if not done.exists() or json.loads(done.read_text()).get("shape") != asdict(shape):
        _build(root, shape, llava15, llava16, seed)
        _write_json(done, {"shape": asdict(shape)})
    specs = [*_vision_tensors(shape.vision), *_projector_tensors(shape.vision, shape.text), *_text_tensors(shape.text)]
    sizes = {name: 2 * int(np.prod(s)) for name, s, _ in specs}
    largest = max(sizes, key=lambda k: sizes[k])
    return Checkpoints(llava15, llava16, sum(sizes.values()), sizes[largest], largest)


def _build(root: Path, shape: Shape, llava15: Path, llava16: Path, seed: int) -> None:
    import shutil

    for d in (llava15, llava16):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    sp_model = train_tokenizer(root / "sentencepiece")
    draws = _Draws(seed)
    specs = [*_vision_tensors(shape.vision), *_projector_tensors(shape.vision, shape.text), *_text_tensors(shape.text)]
    n = _n_shards(specs)
    weight_map = _write_shards(llava15, specs, draws, "model", 1, n)
    total = sum(2 * int(np.prod(s)) for _, s, _ in specs)
    _write_json(llava15 / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    # 1.6: the same shards (hard links) plus one holding image_newline
    for name in sorted(set(weight_map.values())):
        os.link(llava15 / name, llava16 / f"{name.rsplit('-of-', 1)[0]}-of-{n + 1:05d}.safetensors")
    map16 = {k: f"{v.rsplit('-of-', 1)[0]}-of-{n + 1:05d}.safetensors" for k, v in weight_map.items()}
    newline = [("image_newline", (shape.text.hidden_size,), "unit")]
    map16.update(_write_shards(llava16, newline, draws, "model", n + 1, n + 1))
    _write_json(llava16 / "model.safetensors.index.json",
                {"metadata": {"total_size": total + 2 * shape.text.hidden_size}, "weight_map": map16})
    for version, dest in (("1.5", llava15), ("1.6", llava16)):
        _write_json(dest / "config.json", _llava_config(shape, version))
        _write_json(dest / "preprocessor_config.json", _preprocessor_config(shape, version))
        _write_json(dest / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2,
                                                      "pad_token_id": shape.image_token_id + 1})
        _write_tokenizer(dest, sp_model, shape.image_token_id)
