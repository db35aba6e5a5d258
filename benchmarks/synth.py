"""Synthetic LLaVA checkpoints at real shapes, random weights, written without torch.

The llava-hf layout (transformers-4 key spelling, what the Hub repos hold): a LLaVA 1.5
``LlavaForConditionalGeneration`` and a LLaVA 1.6 ``LlavaNextForConditionalGeneration`` with
the real pinpoints. Both share the language model: the 1.6 directory hard-links the 1.5
shards and adds one shard for ``image_newline``. The LLM is a Llama (Vicuna, TinyLlama), or, for
the LLaVA family's other LLMs, Phi-3 (``phi3``: fused ``qkv_proj`` / ``gate_up_proj``, SentencePiece
plus Phi-3's chat tokens, xtuner/llava-phi-3-mini-hf's layout) or Llama 3 (``llama3``: a byte-level
BPE ``tokenizer.json`` with Llama 3's split pattern, trained small, its vocabulary padded with unused
rows up to the real 128256 by the converter, as it pads any tokenizer to the embedding's rows). Those
two write only the 1.5 checkpoint unless asked, and their end-of-turn ids get zero ``lm_head`` rows,
so that greedy decoding of random weights never ends an answer early (a benchmark asks for N tokens). Weights are float16 normal draws taken from
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
    tower: str = "clip"  # "clip" (CLIPVisionModel, quick_gelu) or "siglip" (SiglipVisionModel, no class token)


# google/siglip-so400m-patch14-384 as llava-hf's Qwen2 LLaVAs hold it: the 27th layer is dropped (the HF
# conversions select the last of 26 with vision_feature_layer -1, as the originals took the 26th of 27 with -2)
SIGLIP_SO400M = VisionShape(1152, 4304, 26, 16, 384, 14, 0, tower="siglip")


@dataclass(frozen=True)
class TextShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int = 32064  # llava-hf: 32000 Vicuna pieces, <image> = 32000, <pad> = 32001, padded to 64
    max_position_embeddings: int = 4096
    family: str = "llama"  # "llama" (Vicuna, TinyLlama), "phi3" (Phi-3-mini), "llama3" (Llama 3)
    rope_theta: float = 10000.0
    sliding_window: int | None = None  # Phi-3-mini-4k: 2047
    tie_word_embeddings: bool = False  # Qwen2-0.5B: the output is the embedding (no lm_head in the files)


@dataclass(frozen=True)
class Shape:
    name: str
    text: TextShape
    vision: VisionShape
    layout: str = "llava"  # "llava" (LLaVA 1.5 / 1.6, llava-interleave) or "onevision" (LLaVA-OneVision)

    @property
    def image_token_id(self) -> int:
        if self.text.family == "phi3":
            return SP_VOCAB_SIZE + len(PHI3_ADDED)  # after Phi-3's chat tokens
        if self.text.family == "llama3":
            return LLAMA3_IDS["<image>"]
        if self.text.family == "qwen2":
            return QWEN2_IDS["<image>"]
        return 32000 if self.text.vocab_size > 32000 else SP_VOCAB_SIZE

    @property
    def versions(self) -> tuple[str, ...]:
        """The LLaVA versions ``build_checkpoints`` writes by default."""
        return ("1.5", "1.6") if self.text.family == "llama" else ("1.5",)


QWEN2_05B: dict[str, Any] = dict(vocab_size=151936, max_position_embeddings=32768, family="qwen2",
                                  rope_theta=1000000.0, tie_word_embeddings=True)
SHAPES: dict[str, Shape] = {
    # Vicuna-7B (LLaVA 1.5 / 1.6 7B) with CLIP ViT-L/14-336
    "7b": Shape("7b", TextShape(4096, 11008, 32, 32, 32), VisionShape()),
    # TinyLlama-1.1B's shape with the same CLIP tower
    "1b": Shape("1b", TextShape(2048, 5632, 22, 32, 4), VisionShape()),
    # seconds, for the test: k-quant friendly widths, a 56 px tower
    "tiny": Shape("tiny", TextShape(256, 512, 2, 4, 2, vocab_size=SP_VOCAB_SIZE + 2, max_position_embeddings=8192),
                  VisionShape(64, 128, 3, 4, 56, 14, 64)),
    # xtuner/llava-phi-3-mini-hf: Phi-3-mini-4k (3.8B) with CLIP ViT-L/14-336, LLaVA 1.5
    "phi3-mini": Shape("phi3-mini", TextShape(3072, 8192, 32, 32, 32, vocab_size=32064, max_position_embeddings=4096,
                                              family="phi3", sliding_window=2047), VisionShape()),
    # Llama-3-8B (xtuner/llava-llama-3-8b-hf, llava-hf/llama3-llava-next-8b-hf) with CLIP ViT-L/14-336
    "llama3-8b": Shape("llama3-8b", TextShape(4096, 14336, 32, 32, 8, vocab_size=128256, max_position_embeddings=8192,
                                              family="llama3", rope_theta=500000.0), VisionShape()),
    # the same families at seconds' size (for checking the layout)
    # llava-hf/llava-interleave-qwen-0.5b-hf: Qwen2-0.5B (tied, q/k/v biases) with SigLIP-so400m, "full" features
    # of the last layer (729 image tokens), LlavaForConditionalGeneration
    "interleave-0.5b": Shape("interleave-0.5b", TextShape(896, 4864, 24, 14, 2, **QWEN2_05B), SIGLIP_SO400M),
    # llava-hf/llava-onevision-qwen2-0.5b-ov-hf: the same tower and LLM, LlavaOnevisionForConditionalGeneration
    # (anyres_max_9 over 6x6 pinpoints of 384, image_newline)
    "onevision-0.5b": Shape("onevision-0.5b", TextShape(896, 4864, 24, 14, 2, **QWEN2_05B), SIGLIP_SO400M,
                            layout="onevision"),
    "onevision-tiny": Shape("onevision-tiny", TextShape(256, 512, 2, 4, 2, **{**QWEN2_05B, "vocab_size": 1024}),
                            VisionShape(64, 128, 2, 4, 384, 14, 0, tower="siglip"), layout="onevision"),
    "phi3-tiny": Shape("phi3-tiny", TextShape(256, 512, 2, 4, 4, vocab_size=SP_VOCAB_SIZE + 16, family="phi3",
                                              sliding_window=2047), VisionShape(64, 128, 3, 4, 56, 14, 64)),
    "llama3-tiny": Shape("llama3-tiny", TextShape(256, 512, 2, 4, 2, vocab_size=1024, max_position_embeddings=8192,
                                                  family="llama3", rope_theta=500000.0),
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


# Phi-3's added tokens from the end of the SentencePiece pieces (Phi-3-mini: from 32000), and whether its
# tokenizer strips the whitespace after each; then <image> (tests/checkpoints.py has the same table)
PHI3_ADDED = (
    ("<|endoftext|>", False), ("<|assistant|>", True), ("<|placeholder1|>", True), ("<|placeholder2|>", True),
    ("<|placeholder3|>", True), ("<|placeholder4|>", True), ("<|system|>", True), ("<|end|>", True),
    ("<|placeholder5|>", True), ("<|placeholder6|>", True), ("<|user|>", True),
)
PHI3_PROCESSOR_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' }}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<image>\n' }}{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{{ '<|end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}"
    "{% endif %}"
)
# Llama 3's pre-tokenizer split, as its tokenizer.json spells it
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
BPE_VOCAB_SIZE = 640  # trained byte-level pieces (256 bytes + merges)
LLAMA3_SPECIAL = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  "<image>", "<pad>")
LLAMA3_IDS = {t: BPE_VOCAB_SIZE + i for i, t in enumerate(LLAMA3_SPECIAL)}
# llava-hf/llama3-llava-next-8b-hf's processor chat template (images first, then text)
LLAMA3_PROCESSOR_TEMPLATE = (
    "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + '<|eot_id|>' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)


def _byte_level_bpe(split: str, specials: tuple[str, ...], ids: dict[str, int], *, nfc: bool = False,
                    ignore_merges: bool = True) -> Any:
    """A tokenizers.Tokenizer: (NFC, then) ``split``, then ByteLevel, ``BPE_VOCAB_SIZE`` pieces trained on
    `_training_lines`, then ``specials`` at ``ids``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB_SIZE, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(_training_lines(), trainer)
    if tok.get_vocab_size() != BPE_VOCAB_SIZE:
        raise RuntimeError(f"trained {tok.get_vocab_size()} byte-level pieces, not {BPE_VOCAB_SIZE}")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    assert all(tok.token_to_id(t) == i for t, i in ids.items())
    return tok


def train_byte_level_bpe(root: Path) -> Path:
    """A Llama-3-style byte-level BPE tokenizer.json (Llama 3's split, then ByteLevel; BOS added by the
    post-processor) with ``BPE_VOCAB_SIZE`` trained pieces and ``LLAMA3_SPECIAL`` after them."""
    from tokenizers import processors

    path = root / "tokenizer.json"
    if path.exists():
        return path
    root.mkdir(parents=True, exist_ok=True)
    tok = _byte_level_bpe(LLAMA3_SPLIT, LLAMA3_SPECIAL, LLAMA3_IDS)
    bos = LLAMA3_SPECIAL[0]
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1",
                                      special_tokens=[(bos, LLAMA3_IDS[bos])]),
    ])
    tok.save(str(path))
    return path


# Qwen2's pre-tokenizer split (digits one at a time), its special tokens, then <image>, after the trained pieces
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>")
QWEN2_IDS = {t: BPE_VOCAB_SIZE + i for i, t in enumerate(QWEN2_SPECIAL)}
# Qwen2-Instruct's tokenizer template (ChatML with a default system prompt)
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# llava-hf's llava-onevision-qwen2 / llava-interleave-qwen processor template (images, videos, then the text)
QWEN2_PROCESSOR_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_qwen2_bpe(root: Path) -> Path:
    """A Qwen2-style byte-level BPE tokenizer.json (NFC, Qwen2's split then ByteLevel, merges always applied,
    no BOS) with ``BPE_VOCAB_SIZE`` trained pieces and ``QWEN2_SPECIAL`` after them."""
    from tokenizers import processors

    path = root / "tokenizer.json"
    if path.exists():
        return path
    root.mkdir(parents=True, exist_ok=True)
    tok = _byte_level_bpe(QWEN2_SPLIT, QWEN2_SPECIAL, QWEN2_IDS, nfc=True, ignore_merges=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.save(str(path))
    return path


def end_of_turn_ids(shape: Shape) -> list[int]:
    """The ids a chat with ``shape``'s LLM ends on (generation_config's eos_token_id)."""
    if shape.text.family == "phi3":
        added = {t: SP_VOCAB_SIZE + i for i, (t, _) in enumerate(PHI3_ADDED)}
        return [added["<|endoftext|>"], added["<|assistant|>"], added["<|end|>"]]
    if shape.text.family == "llama3":
        return [LLAMA3_IDS["<|end_of_text|>"], LLAMA3_IDS["<|eot_id|>"]]
    if shape.text.family == "qwen2":
        return [QWEN2_IDS["<|im_end|>"], QWEN2_IDS["<|endoftext|>"]]
    return [2]


# ---------------------------------------------------------------- tensors


def _vision_tensors(v: VisionShape) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """(name, torch shape, init kind) of CLIPVisionModel's (or SiglipVisionModel's, without its pooling
    head: vision_use_head false, as llava-hf's Qwen2 LLaVAs) vision_model, llava-hf prefix."""
    p = "vision_tower.vision_model."
    siglip = v.tower == "siglip"
    n_pos = (v.image_size // v.patch_size) ** 2 + (0 if siglip else 1)
    if not siglip:
        yield p + "embeddings.class_embedding", (v.hidden_size,), "unit"
    yield p + "embeddings.patch_embedding.weight", (v.hidden_size, 3, v.patch_size, v.patch_size), "linear"
    if siglip:
        yield p + "embeddings.patch_embedding.bias", (v.hidden_size,), "bias"
    yield p + "embeddings.position_embedding.weight", (n_pos, v.hidden_size), "embed"
    if not siglip:
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
        if t.family == "phi3":  # Phi3ForCausalLM: [q; k; v] and [gate; up] rows fused
            yield q + "self_attn.qkv_proj.weight", (t.hidden_size + 2 * kv, t.hidden_size), "linear"
            yield q + "self_attn.o_proj.weight", (t.hidden_size, t.hidden_size), "linear"
            yield q + "post_attention_layernorm.weight", (t.hidden_size,), "ones"
            yield q + "mlp.gate_up_proj.weight", (2 * t.intermediate_size, t.hidden_size), "linear"
            yield q + "mlp.down_proj.weight", (t.hidden_size, t.intermediate_size), "linear"
            continue
        yield q + "self_attn.q_proj.weight", (t.hidden_size, t.hidden_size), "linear"
        yield q + "self_attn.k_proj.weight", (kv, t.hidden_size), "linear"
        yield q + "self_attn.v_proj.weight", (kv, t.hidden_size), "linear"
        if t.family == "qwen2":  # Qwen2's q/k/v biases
            yield q + "self_attn.q_proj.bias", (t.hidden_size,), "bias"
            yield q + "self_attn.k_proj.bias", (kv,), "bias"
            yield q + "self_attn.v_proj.bias", (kv,), "bias"
        yield q + "self_attn.o_proj.weight", (t.hidden_size, t.hidden_size), "linear"
        yield q + "post_attention_layernorm.weight", (t.hidden_size,), "ones"
        yield q + "mlp.gate_proj.weight", (t.intermediate_size, t.hidden_size), "linear"
        yield q + "mlp.up_proj.weight", (t.intermediate_size, t.hidden_size), "linear"
        yield q + "mlp.down_proj.weight", (t.hidden_size, t.intermediate_size), "linear"
    yield p + "norm.weight", (t.hidden_size,), "ones"
    if not t.tie_word_embeddings:
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
                  first: int, total: int, zero_rows: dict[str, list[int]] | None = None) -> dict[str, str]:
    """Write ``specs`` as shards ``stem-{first..}-of-{total}``, the ``zero_rows`` of the tensors named
    there set to zero; returns the weight map."""
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
        if zero_rows and name in zero_rows:
            shard[name][zero_rows[name]] = 0
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
        "text_config": _text_config(shape),
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
    if v.tower == "siglip":
        config["vision_config"] = {
            "model_type": "siglip_vision_model", "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_hidden_layers,
            "num_attention_heads": v.num_attention_heads, "image_size": v.image_size, "patch_size": v.patch_size,
            "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "num_channels": 3, "vision_use_head": False,
        }
    if t.family == "qwen2":  # llava-hf's Qwen2 LLaVAs: "full" features of the last layer, the output tied
        config.update(vision_feature_layer=-1, vision_feature_select_strategy="full",
                      tie_word_embeddings=t.tie_word_embeddings)
    if shape.layout == "onevision":
        from llava_gguf.packing_onevision import ONEVISION_PINPOINTS

        config.update(architectures=["LlavaOnevisionForConditionalGeneration"], model_type="llava_onevision",
                      vision_aspect_ratio="anyres_max_9", image_grid_pinpoints=[list(p) for p in ONEVISION_PINPOINTS])
        config.pop("image_seq_length")
    return config


def _text_config(shape: Shape) -> dict[str, Any]:
    t = shape.text
    bos, eos, pad = _special_ids(shape)
    config: dict[str, Any] = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
        "vocab_size": t.vocab_size, "max_position_embeddings": t.max_position_embeddings,
        "rms_norm_eps": 1e-5, "rope_theta": t.rope_theta, "rope_scaling": None, "hidden_act": "silu",
        "tie_word_embeddings": False, "bos_token_id": bos, "eos_token_id": eos,
        "pad_token_id": pad, "torch_dtype": "float16",
    }
    if t.family == "qwen2":  # Qwen2Config (Qwen2-0.5B): no BOS, an unused sliding window
        config.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], rms_norm_eps=1e-6, bos_token_id=None,
                      tie_word_embeddings=t.tie_word_embeddings, use_sliding_window=False, sliding_window=4096,
                      max_window_layers=t.num_hidden_layers, attention_dropout=0.0)
    if t.family == "phi3":  # Phi3Config, transformers-4 spelling (xtuner/llava-phi-3-mini-hf)
        config.update(model_type="phi3", architectures=["Phi3ForCausalLM"], sliding_window=t.sliding_window,
                      original_max_position_embeddings=t.max_position_embeddings, embd_pdrop=0.0,
                      resid_pdrop=0.0, attention_dropout=0.0)
    return config


def _special_ids(shape: Shape) -> tuple[int, int, int]:
    """BOS, EOS and padding ids of ``shape``'s tokenizer."""
    if shape.text.family == "phi3":
        endoftext = SP_VOCAB_SIZE  # <|endoftext|>, Phi-3's EOS and padding
        return 1, endoftext, endoftext
    if shape.text.family == "llama3":
        return LLAMA3_IDS["<|begin_of_text|>"], LLAMA3_IDS["<|end_of_text|>"], LLAMA3_IDS["<pad>"]
    if shape.text.family == "qwen2":  # generation_config's BOS is <|endoftext|>; the tokenizer adds none
        endoftext = QWEN2_IDS["<|endoftext|>"]
        return endoftext, endoftext, endoftext
    return 1, 2, shape.image_token_id + 1


def _preprocessor_config(shape: Shape, version: str) -> dict[str, Any]:
    s = shape.vision.image_size
    if shape.layout == "onevision":  # llava-hf/llava-onevision-qwen2-*-ov-hf
        from llava_gguf.packing_onevision import ONEVISION_PINPOINTS

        return {"image_processor_type": "LlavaOnevisionImageProcessor", "processor_class": "LlavaOnevisionProcessor",
                "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
                "image_grid_pinpoints": [list(p) for p in ONEVISION_PINPOINTS], "image_mean": [0.5] * 3,
                "image_std": [0.5] * 3, "resample": 3, "rescale_factor": 1 / 255, "size": {"height": s, "width": s}}
    if shape.vision.tower == "siglip":  # SiglipImageProcessor, as llava-interleave ships it
        return {"do_convert_rgb": None, "do_normalize": True, "do_rescale": True, "do_resize": True,
                "image_mean": [0.5] * 3, "image_processor_type": "SiglipImageProcessor", "image_std": [0.5] * 3,
                "processor_class": "LlavaProcessor", "resample": 3, "rescale_factor": 1 / 255,
                "size": {"height": s, "width": s}}
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


def _added(content: str, rstrip: bool = False) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": rstrip,
            "single_word": False, "special": True}


def _write_phi3_tokenizer(dest: Path, sp_model: Path) -> None:
    """tokenizer.model with Phi-3's added tokens, then <image>, in tokenizer_config.json (Phi-3-mini's form)."""
    (dest / "tokenizer.model").write_bytes(sp_model.read_bytes())
    decoder = {str(i): _added(t, rstrip=i == 2) for i, t in enumerate(["<unk>", "<s>", "</s>"])}
    for i, (content, rstrip) in enumerate(PHI3_ADDED):
        decoder[str(SP_VOCAB_SIZE + i)] = _added(content, rstrip)
    decoder[str(SP_VOCAB_SIZE + len(PHI3_ADDED))] = _added("<image>")
    _write_json(dest / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder, "bos_token": "<s>",
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>", "legacy": False,
        "model_max_length": 4096, "tokenizer_class": "LlamaTokenizer", "padding_side": "left",
        "processor_class": "LlavaProcessor",
    })
    _write_json(dest / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "<|endoftext|>",
                                                   "pad_token": "<|endoftext|>", "unk_token": "<unk>"})
    _write_json(dest / "chat_template.json", {"chat_template": PHI3_PROCESSOR_TEMPLATE})


def _write_llama3_tokenizer(dest: Path, tokenizer_json: Path) -> None:
    """Llama 3's tokenizer.json (no tokenizer.model) and tokenizer_config.json."""
    (dest / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    decoder = {str(i): _added(t) for t, i in LLAMA3_IDS.items()}
    _write_json(dest / "tokenizer_config.json", {
        "added_tokens_decoder": decoder, "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
        "pad_token": "<pad>", "clean_up_tokenization_spaces": True, "model_max_length": 8192,
        "padding_side": "left", "processor_class": "LlavaProcessor", "tokenizer_class": "PreTrainedTokenizerFast",
        "model_input_names": ["input_ids", "attention_mask"],
    })
    _write_json(dest / "special_tokens_map.json", {"bos_token": "<|begin_of_text|>",
                                                   "eos_token": "<|end_of_text|>", "pad_token": "<pad>"})
    _write_json(dest / "chat_template.json", {"chat_template": LLAMA3_PROCESSOR_TEMPLATE})


def _write_qwen2_tokenizer(dest: Path, tokenizer_json: Path, shape: Shape) -> None:
    """tokenizer.json, tokenizer_config.json (Qwen2-Instruct's: no BOS, ``<|im_end|>`` ends), the processor's
    chat template and processor_config.json, as llava-hf's Qwen2 LLaVAs ship them."""
    (dest / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    decoder = {str(i): _added(t) for t, i in QWEN2_IDS.items()}
    onevision = shape.layout == "onevision"
    processor = "LlavaOnevisionProcessor" if onevision else "LlavaProcessor"
    _write_json(dest / "tokenizer_config.json", {
        "add_prefix_space": False, "added_tokens_decoder": decoder,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": None,
        "chat_template": QWEN2_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>",
        "errors": "replace", "model_max_length": 32768, "pad_token": "<|endoftext|>", "padding_side": "left",
        "processor_class": processor, "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    })
    _write_json(dest / "special_tokens_map.json", {"additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
                                                   "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    _write_json(dest / "chat_template.json", {"chat_template": QWEN2_PROCESSOR_TEMPLATE})
    v = shape.vision
    if onevision:
        _write_json(dest / "processor_config.json", {
            "image_token": "<image>", "num_image_tokens": (v.image_size // v.patch_size) ** 2,
            "processor_class": processor, "video_token": "<video>", "vision_aspect_ratio": "anyres_max_9",
            "vision_feature_select_strategy": "full"})
    else:
        _write_json(dest / "processor_config.json", {
            "image_token": "<image>", "num_additional_image_tokens": 0, "patch_size": v.patch_size,
            "processor_class": processor, "vision_feature_select_strategy": "full"})


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


def _shape_record(shape: Shape) -> dict[str, Any]:
    """``shape`` as recorded beside its checkpoints; a Llama's record leaves out the family fields at their
    defaults, so checkpoints written before those fields existed are reused."""
    record = asdict(shape)
    if shape.text.family == "llama":
        defaults = TextShape(1, 1, 1, 1, 1)
        for key in ("family", "rope_theta", "sliding_window"):
            if record["text"][key] == getattr(defaults, key):
                del record["text"][key]
    if not shape.text.tie_word_embeddings:  # the field came later: earlier records lack it
        del record["text"]["tie_word_embeddings"]
    if shape.vision.tower == "clip":
        del record["vision"]["tower"]
    if shape.layout == "llava":
        del record["layout"]
    return record


def build_checkpoints(root: Path, shape: Shape, seed: int = 0, versions: tuple[str, ...] | None = None) -> Checkpoints:
    """Write (or reuse) the LLaVA 1.5 and 1.6 checkpoints of ``shape`` under ``root`` (``versions``:
    those of them to write, by default ``shape.versions``; a 1.6 checkpoint needs the 1.5 one)."""
    versions = versions or shape.versions
    first = {"onevision": "llava-onevision"}.get(shape.layout, "llava-1.5")  # the 1.5 slot: the one-layout checkpoint
    llava15, llava16 = root / f"{first}-{shape.name}-hf", root / f"llava-1.6-{shape.name}-hf"
    done = root / f"{shape.name}.json"
    record = {"shape": _shape_record(shape), "versions": list(versions)}
    found = json.loads(done.read_text()) if done.exists() else {}
    if found.get("shape") != record["shape"] or not set(versions) <= set(found.get("versions", ["1.5", "1.6"])):
        _build(root, shape, llava15, llava16, seed, versions)
        _write_json(done, record)
    specs = _specs(shape)
    sizes = {name: 2 * int(np.prod(s)) for name, s, _ in specs}
    largest = max(sizes, key=lambda k: sizes[k])
    return Checkpoints(llava15, llava16, sum(sizes.values()), sizes[largest], largest)


def _specs(shape: Shape) -> list[tuple[str, tuple[int, ...], str]]:
    specs = [*_vision_tensors(shape.vision), *_projector_tensors(shape.vision, shape.text), *_text_tensors(shape.text)]
    if shape.layout == "onevision":
        specs.append(("image_newline", (shape.text.hidden_size,), "unit"))
    return specs


def _build(root: Path, shape: Shape, llava15: Path, llava16: Path, seed: int,
           versions: tuple[str, ...] = ("1.5", "1.6")) -> None:
    import shutil

    dirs = {"1.5": llava15, "1.6": llava16}
    for d in dirs.values():
        if d.exists():
            shutil.rmtree(d)
    for v in versions:
        dirs[v].mkdir(parents=True)
    sp_model = train_tokenizer(root / "sentencepiece")
    draws = _Draws(seed)
    specs = _specs(shape)
    n = _n_shards(specs)
    # a random model's greedy answer must not end early: the end-of-turn ids' logits are 0, below the maximum
    # (a tied output: the embedding's rows, which zeroes those tokens' input embedding too; only speed counts)
    out = "language_model.model.embed_tokens.weight" if shape.text.tie_word_embeddings else "language_model.lm_head.weight"
    zero_rows = {out: end_of_turn_ids(shape)} if shape.text.family != "llama" else None
    weight_map = _write_shards(llava15, specs, draws, "model", 1, n, zero_rows)
    total = sum(2 * int(np.prod(s)) for _, s, _ in specs)
    _write_json(llava15 / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    if "1.6" not in versions:
        _write_files(shape, "1.5", llava15, sp_model, root)
        return
    # 1.6: the same shards (hard links) plus one holding image_newline
    for name in sorted(set(weight_map.values())):
        os.link(llava15 / name, llava16 / f"{name.rsplit('-of-', 1)[0]}-of-{n + 1:05d}.safetensors")
    map16 = {k: f"{v.rsplit('-of-', 1)[0]}-of-{n + 1:05d}.safetensors" for k, v in weight_map.items()}
    newline = [("image_newline", (shape.text.hidden_size,), "unit")]
    map16.update(_write_shards(llava16, newline, draws, "model", n + 1, n + 1))
    _write_json(llava16 / "model.safetensors.index.json",
                {"metadata": {"total_size": total + 2 * shape.text.hidden_size}, "weight_map": map16})
    for version, dest in (("1.5", llava15), ("1.6", llava16)):
        _write_files(shape, version, dest, sp_model, root)


def _write_files(shape: Shape, version: str, dest: Path, sp_model: Path, root: Path) -> None:
    """config.json, preprocessor_config.json, generation_config.json and the tokenizer."""
    _write_json(dest / "config.json", _llava_config(shape, version))
    _write_json(dest / "preprocessor_config.json", _preprocessor_config(shape, version))
    bos, eos, pad = _special_ids(shape)
    ends = end_of_turn_ids(shape)
    _write_json(dest / "generation_config.json", {"bos_token_id": bos, "eos_token_id": ends if len(ends) > 1 else eos,
                                                  "pad_token_id": pad})
    if shape.text.family == "phi3":
        _write_phi3_tokenizer(dest, sp_model)
    elif shape.text.family == "llama3":
        _write_llama3_tokenizer(dest, train_byte_level_bpe(root / "byte-level-bpe"))
    elif shape.text.family == "qwen2":
        _write_qwen2_tokenizer(dest, train_qwen2_bpe(root / "qwen2-bpe"), shape)
    else:
        _write_tokenizer(dest, sp_model, shape.image_token_id)
