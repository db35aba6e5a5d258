"""The conversation template of an LLM GGUF that does not name one (files made by other tools).

llama.cpp's legacy LLaVA tools write a plain llama GGUF: no ``<image>`` token, usually no chat
template, a ``general.name`` such as "LLaMA v2". The original LLaVA code picks its template from the
model's name (``llama-2`` -> llava_llama_2, ``mistral`` -> mistral_instruct, ``v1.6-34b`` ->
chatml_direct, else the Vicuna one); here the same choice is made from what the file says, strongest
evidence first: a template text (ollama's, or the GGUF's own chat template), the architecture (phi3), the
vocabulary (Llama-3's ``<|start_header_id|>``, Phi-3's ``<|user|>``, Yi's ``<|im_start|>``), the name, then the
shape (Mistral 7B v0.2's grouped-query attention with RoPE base 1e6). Vicuna is what remains: LLaVA 1.5 and 1.6
Vicuna share Llama 2's vocabulary and shape, and BakLLaVA (Mistral 7B v0.1 with LLaVA 1.5's recipe) was trained
with LLaVA's ``v1`` conversation, which ollama's ``bakllava`` template writes too (``USER: ... ASSISTANT:``).
xtuner's LLaVA-Llama-3 and LLaVA-Phi-3 (``llava-llama3``, ``llava-phi3`` in ollama) use xtuner's
``llama3_chat`` and ``phi3_chat``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import gguf

from llava_gguf.llm.templates import Template

IM_START = "<|im_start|>"
START_HEADER = "<|start_header_id|>"  # Llama-3's chat format
PHI3_USER = "<|user|>"  # Phi-3's chat format
PHI3_ARCH = "phi3"
# (marker in a template text, template), the first match wins
_TEXT_MARKERS: tuple[tuple[str, Template], ...] = (
    (START_HEADER, Template.LLAMA3),
    (PHI3_USER, Template.PHI3),
    (IM_START, Template.CHATML_DIRECT),
    ("<<SYS>>", Template.LLAVA_LLAMA_2),
    ("[INST]", Template.MISTRAL_INSTRUCT),
    ("USER:", Template.VICUNA_V1),
    ("ASSISTANT:", Template.VICUNA_V1),
)
MISTRAL_ROPE_BASE = 1e6


@dataclass(frozen=True)
class TemplateGuess:
    template: Template
    reason: str  # what it was guessed from, in words


def guess_template(
    metadata: Mapping[str, Any], has_token: Callable[[str], bool], template_hint: str | None = None
) -> TemplateGuess:
    """The template the original LLaVA code would use for this LLM.

    ``metadata``: the GGUF's key-values; ``has_token(text)``: whether the vocabulary holds ``text``
    as one token; ``template_hint``: a template text from where the file came from (ollama's).
    """
    for source, text in (("ollama's template", template_hint),
                         ("the GGUF's chat template", metadata.get(gguf.Keys.Tokenizer.CHAT_TEMPLATE))):
        if text:
            for marker, template in _TEXT_MARKERS:
                if marker in str(text):
                    return TemplateGuess(template, f"{marker} in {source}")
    arch = str(metadata.get(gguf.Keys.General.ARCHITECTURE) or "llama")
    if arch == PHI3_ARCH:
        return TemplateGuess(Template.PHI3, "a phi3 LLM (xtuner's LLaVA-Phi-3)")
    for token, template, who in ((START_HEADER, Template.LLAMA3, "Llama-3, xtuner's LLaVA-Llama-3"),
                                 (PHI3_USER, Template.PHI3, "Phi-3, xtuner's LLaVA-Phi-3")):
        if has_token(token):
            return TemplateGuess(template, f"{token} in the vocabulary ({who})")
    if has_token(IM_START):
        return TemplateGuess(Template.CHATML_DIRECT, f"{IM_START} in the vocabulary (Yi-34B, LLaVA 1.6 34B)")
    name = " ".join(str(metadata.get(key) or "") for key in (
        gguf.Keys.General.NAME, gguf.Keys.General.BASENAME, gguf.Keys.General.FINETUNE)).lower()
    if "bakllava" in name:
        return TemplateGuess(Template.VICUNA_V1, "BakLLaVA by the model's name (LLaVA's v1 conversation)")
    if "mistral" in name:
        return TemplateGuess(Template.MISTRAL_INSTRUCT, "'mistral' in the model's name")
    if "llava-llama-2" in name or ("llama-2" in name and "chat" in name):
        return TemplateGuess(Template.LLAVA_LLAMA_2, "a Llama-2-chat LLaVA by the model's name")
    heads = _number(metadata.get(gguf.Keys.Attention.HEAD_COUNT.format(arch=arch)))
    kv_heads = _number(metadata.get(gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=arch)))
    rope_base = _number(metadata.get(gguf.Keys.Rope.FREQ_BASE.format(arch=arch))) or 10000.0
    if heads and kv_heads and kv_heads < heads and rope_base >= MISTRAL_ROPE_BASE:
        return TemplateGuess(Template.MISTRAL_INSTRUCT,
                             f"grouped-query attention with RoPE base {rope_base:,.0f} (Mistral 7B v0.2's shape)")
    return TemplateGuess(Template.VICUNA_V1, "a Llama-2-shaped LLM with no chat template (LLaVA's Vicuna)")


def _number(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
