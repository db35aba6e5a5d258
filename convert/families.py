"""The language models LLaVA checkpoints carry, one small table entry each.

What differs between LLM kinds lives here: transformers' config defaults, the llama.cpp
architecture, the per-layer tensors (Hugging Face names) and how RoPE is laid out. The shared
path (`checkpoint._text_config`, `llm.plan_llm_tensors`, `llm.write_llm`) reads the entry; adding
a kind adds an entry, not a branch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gguf

__all__ = ["LlmFamily", "FAMILIES", "TEXT_DEFAULTS"]

_LLAMA_LAYER = (
    "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.o_proj.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)
# Phi-3 stores q, k, v fused ([q; k; v] rows) and gate, up fused ([gate; up] rows): llama.cpp's phi3
# graph splits them the same way (attn_qkv, and ffn_up through SwiGLU's two halves), so they pass unchanged
_PHI3_LAYER = (
    "input_layernorm.weight", "self_attn.qkv_proj.weight", "self_attn.o_proj.weight",
    "post_attention_layernorm.weight", "mlp.gate_up_proj.weight", "mlp.down_proj.weight",
)
# Qwen2: Llama's layer plus q, k and v projection biases (always present: Qwen2Attention hard-codes them)
_QWEN2_LAYER = (
    *_LLAMA_LAYER, "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",
)


@dataclass(frozen=True)
class LlmFamily:
    """One LLM kind: transformers' ``model_type``, its config defaults and its GGUF form."""

    model_type: str
    arch: gguf.MODEL_ARCH
    defaults: dict[str, Any]  # transformers' config class defaults (LlamaConfig, MistralConfig, Phi3Config, Qwen2Config)
    per_layer: tuple[str, ...]  # tensor suffixes under model.layers.{i}.
    # Hugging Face's rotate-half q/k rows become llama.cpp's interleaved pairs (llama's NORM RoPE);
    # NEOX-RoPE architectures (phi3) rotate halves as Hugging Face does and take the rows unchanged
    permute_qk: bool
    rope_scalings: tuple[str, ...] = ("linear",)  # RoPE scaling kinds llama.cpp's graph runs for it
    # LLaVA's conv_templates were not written for it: the checkpoint's own chat template renders its prompts
    checkpoint_template: bool = False

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


# transformers' defaults for fields a config may leave out; tests/test_config.py checks every
# fixture's parse against transformers.AutoConfig
TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048, vocab_size=32000,
        tie_word_embeddings=False,
    ),
    "mistral": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=4096 * 32,
        vocab_size=32000, tie_word_embeddings=False, sliding_window=4096,
    ),
    "phi3": dict(
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
        rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096, vocab_size=32064,
        tie_word_embeddings=False, original_max_position_embeddings=4096, partial_rotary_factor=1.0,
        sliding_window=None,
    ),
    # Qwen2Config: its sliding window is off unless use_sliding_window says otherwise
    "qwen2": dict(
        hidden_size=4096, intermediate_size=22016, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=32768,
        vocab_size=151936, tie_word_embeddings=False, use_sliding_window=False, sliding_window=4096,
    ),
}

FAMILIES: dict[str, LlmFamily] = {
    "llama": LlmFamily("llama", gguf.MODEL_ARCH.LLAMA, TEXT_DEFAULTS["llama"], _LLAMA_LAYER, permute_qk=True),
    "mistral": LlmFamily("mistral", gguf.MODEL_ARCH.LLAMA, TEXT_DEFAULTS["mistral"], _LLAMA_LAYER, permute_qk=True),
    # longrope (Phi-3 128k): rope_factors_long / rope_factors_short tensors and an attention factor
    "phi3": LlmFamily("phi3", gguf.MODEL_ARCH.PHI3, TEXT_DEFAULTS["phi3"], _PHI3_LAYER, permute_qk=False,
                      rope_scalings=("linear", "longrope"), checkpoint_template=True),
    # llama.cpp's qwen2 graph runs NEOX RoPE (halves rotated, as Hugging Face's): q and k pass unchanged,
    # as convert_hf_to_gguf.py's Qwen2Model writes them
    "qwen2": LlmFamily("qwen2", gguf.MODEL_ARCH.QWEN2, TEXT_DEFAULTS["qwen2"], _QWEN2_LAYER, permute_qk=False,
                       checkpoint_template=True),
}
