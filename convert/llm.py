"""The language model half: a llama-architecture GGUF (Vicuna, Llama 2 and 3, Yi, Mistral), a phi3 one
(Phi-3) or a qwen2 one (Qwen2, with its q/k/v biases), as the LLM's `LlmFamily` entry says."""

from __future__ import annotations

import logging
from pathlib import Path

import gguf
import numpy as np

from llava_gguf.convert.checkpoint import LlavaCheckpoint, TextConfig
from llava_gguf.convert.names import Layout, canonical_name, gguf_name, is_vision
from llava_gguf.convert.tensors import TensorStore
from llava_gguf.convert.vocab import write_vocabulary
from llava_gguf.convert.writer import PlannedTensor, ProgressCallback, write_gguf
from llava_gguf.errors import CheckpointError
from llava_gguf.metadata import FORMAT_VERSION, LlavaKeys

log = logging.getLogger(__name__)
Q = gguf.GGMLQuantizationType
FILE_TYPES = {Q.F32: gguf.LlamaFileType.ALL_F32, Q.F16: gguf.LlamaFileType.MOSTLY_F16, Q.BF16: gguf.LlamaFileType.MOSTLY_BF16}



def permute_rope(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's rotate-half q/k rows to llama.cpp's interleaved RoPE pairs, per head."""
    rows = weights.shape[0]
    # [rows, ...] -> [n_head, 2, rows/n_head/2, ...] -> [n_head, rows/n_head/2, 2, ...] -> [rows, ...]
    return (
        weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _expected_names(text: TextConfig) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not text.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(text.num_hidden_layers):
        names += [f"model.layers.{i}.{suffix}" for suffix in text.family.per_layer]
    return names


def _fused_rows(suffix: str, text: TextConfig) -> int | None:
    """The rows a fused projection must have: [q; k; v] (n_head + 2 n_kv heads) or [gate; up]."""
    if suffix == "self_attn.qkv_proj.weight":
        return (text.num_attention_heads + 2 * text.num_key_value_heads) * text.head_size
    if suffix == "mlp.gate_up_proj.weight":
        return 2 * text.intermediate_size
    return None


def plan_llm_tensors(ckpt: LlavaCheckpoint, store: TensorStore, qtype: Q) -> list[PlannedTensor]:
    text = ckpt.text
    canonical: dict[str, str] = {}
    for name in store.names():
        c = canonical_name(name, ckpt.layout)
        if c is not None and not is_vision(c):
            canonical[c] = name
    missing = [n for n in _expected_names(text) if n not in canonical]
    if missing:
        raise CheckpointError(
            f"{ckpt.path}: {len(missing)} language-model tensor(s) missing, e.g. {missing[0]!r}; "
            "the checkpoint is incomplete or not a supported LLaVA model"
        )
    expected = {"model.embed_tokens.weight": (text.vocab_size, text.hidden_size)}
    planned = []
    for c in _expected_names(text):
        source = canonical[c]
        shape = store.ref(source).shape
        if c in expected and shape[1] != expected[c][1]:
            raise CheckpointError(f"{ckpt.path}: {source} has shape {shape}, expected {expected[c]}")
        rows = _fused_rows(c.split(".", 3)[-1], text)
        if rows is not None and tuple(shape) != (rows, text.hidden_size):
            raise CheckpointError(f"{ckpt.path}: {source} has shape {shape}, expected {(rows, text.hidden_size)}")
        target = Q.F32 if len(shape) == 1 else qtype
        heads: int | None = None
        if text.family.permute_qk and c.endswith("self_attn.q_proj.weight"):
            heads = text.num_attention_heads
        elif text.family.permute_qk and c.endswith("self_attn.k_proj.weight"):
            heads = text.num_key_value_heads

        def produce(source: str = source, heads: int | None = heads, target: Q = target) -> np.ndarray:
            # bf16 into bf16 passes the bits through: no f32 copy of the tensor
            raw = target == Q.BF16 and store.ref(source).dtype == "BF16"
            data = store.load_raw(source) if raw else store.load(source)
            return permute_rope(data, heads) if heads is not None else data

        planned.append(PlannedTensor(gguf_name(c, text.family.arch, text.num_hidden_layers), shape, target, produce))
    return planned + _rope_factor_tensors(text)


def _rope_factor_tensors(text: TextConfig) -> list[PlannedTensor]:
    """longrope's per-frequency divisors, [rotated dims / 2] each: llama.cpp uses the long ones when the
    context is longer than original_max_position_embeddings, as transformers does past that length."""
    if text.rope_scaling_kind != "longrope":
        return []
    assert text.rope_scaling is not None
    planned = []
    for tensor, key in ((gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, "long_factor"),
                        (gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT, "short_factor")):
        factors = np.asarray(text.rope_scaling[key], dtype=np.float32)

        def produce(factors: np.ndarray = factors) -> np.ndarray:
            return factors

        planned.append(PlannedTensor(gguf.TENSOR_NAMES[tensor] + ".weight", factors.shape, Q.F32, produce))
    return planned


def write_llm(
    ckpt: LlavaCheckpoint, store: TensorStore, path: Path, qtype: Q, progress: ProgressCallback | None = None
) -> None:
    """Write the LLM GGUF at ``qtype`` (F32, F16 or BF16) to ``path``."""
    text = ckpt.text
    tensors = plan_llm_tensors(ckpt, store, qtype)
    n_vocab = next(t.shape[0] for t in tensors if t.name == gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight")
    family = text.family
    writer = gguf.GGUFWriter(path, family.arch_name)
    if text.context_length < text.max_position_embeddings:
        log.warning(
            "%s: context limited to the sliding window, %d positions (of %d), where llama.cpp computes what the reference does",
            ckpt.name, text.context_length, text.max_position_embeddings,
        )
    writer.add_context_length(text.context_length)
    writer.add_embedding_length(text.hidden_size)
    writer.add_block_count(text.num_hidden_layers)
    writer.add_feed_forward_length(text.intermediate_size)
    writer.add_head_count(text.num_attention_heads)
    writer.add_head_count_kv(text.num_key_value_heads)
    writer.add_rope_dimension_count(text.rope_dimension_count)
    if text.head_dim is not None and text.head_dim != text.hidden_size // text.num_attention_heads:
        writer.add_key_length(text.head_dim)
        writer.add_value_length(text.head_dim)
    writer.add_layer_norm_rms_eps(text.rms_norm_eps)
    writer.add_rope_freq_base(text.rope_theta)
    if text.original_max_position_embeddings is not None:
        writer.add_rope_scaling_orig_ctx_len(text.original_max_position_embeddings)
    if text.rope_scaling_kind == "linear":
        assert text.rope_scaling is not None
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(text.rope_scaling["factor"]))
    elif text.rope_scaling_kind == "longrope":
        writer.add_rope_scaling_attn_factors(text.longrope_attention_factor)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(FILE_TYPES[qtype])
    vocab = write_vocabulary(writer, ckpt, n_vocab)
    writer.add_name(ckpt.name)
    writer.add_uint32(LlavaKeys.FORMAT_VERSION, FORMAT_VERSION)
    writer.add_string(LlavaKeys.LLAVA_VERSION, ckpt.llava_version)
    writer.add_string(LlavaKeys.LAYOUT, ckpt.layout.value)
    writer.add_string(LlavaKeys.TEMPLATE, ckpt.template.value)
    writer.add_string(LlavaKeys.TOKENIZE_MODE, ckpt.tokenize_mode.value)
    image_token = ckpt.image_token_id if ckpt.image_token_id is not None else vocab.token_id("<image>")
    if ckpt.layout is Layout.LLAVA_HF and image_token is not None:
        writer.add_int32(LlavaKeys.IMAGE_TOKEN_ID, int(image_token))
    write_gguf(writer, tensors, progress)

