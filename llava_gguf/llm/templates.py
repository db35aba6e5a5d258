"""The conversation templates LLaVA models were trained with (LLaVA's ``conv_templates``, the chat
template of llava-hf's LLaVA 1.5 repos, and xtuner's ``PROMPT_TEMPLATE.llama3_chat`` / ``phi3_chat`` of its
LLaVA-Llama-3 and LLaVA-Phi-3). A checkpoint's own jinja template (``Template.CHECKPOINT``) is rendered by
`chat_template.render_chat_template`.

A conversation is a list of `Message`s whose text holds one ``<image>`` placeholder per image.
`render` gives the prompt text up to the point where the assistant speaks next.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

IMAGE_PLACEHOLDER = "<image>"


class Template(str, enum.Enum):
    VICUNA_V1 = "vicuna_v1"  # conv_vicuna_v1: what LLaVA 1.5 / 1.6 Vicuna were trained (--version v1) and evaluated with
    LLAVA_V1 = "llava_v1"  # conv_llava_v1: the original CLI's choice; vicuna_v1's format, "human" in its system prompt
    LLAVA_LLAMA_2 = "llava_llama_2"
    MISTRAL_INSTRUCT = "mistral_instruct"  # LLaVA 1.6 Mistral
    CHATML_DIRECT = "chatml_direct"  # LLaVA 1.6 34B (Yi)
    PLAIN = "plain"
    LLAVA_HF = "llava_hf"  # llava-hf/llava-1.5-*-hf's chat template: "USER: <image>\n... ASSISTANT:"
    CHECKPOINT = "checkpoint"  # the checkpoint's own chat template (tokenizer.chat_template), rendered as transformers does
    LLAMA3 = "llama3"  # xtuner's llava-llama-3: <|start_header_id|>user<|end_header_id|>\n\n...<|eot_id|>
    PHI3 = "phi3"  # xtuner's llava-phi-3: <|user|>\n...<|end|>\n<|assistant|>\n


class Role(str, enum.Enum):
    USER = "user"
    ASSISTANT = "assistant"


@dataclass(frozen=True)
class Message:
    role: Role
    text: str


DEFAULT_SYSTEM: dict[Template, str] = {
    Template.VICUNA_V1: (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    ),
    Template.LLAVA_V1: (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions."
    ),
    Template.LLAVA_LLAMA_2: (
        "You are a helpful language and vision assistant. You are able to understand the visual content "
        "that the user provides, and assist the user with a variety of tasks using natural language."
    ),
    Template.MISTRAL_INSTRUCT: "",
    Template.CHATML_DIRECT: "Answer the questions.",
    Template.PLAIN: "",
    Template.LLAVA_HF: "",
    Template.CHECKPOINT: "",  # the template's own default, if it has one
    Template.LLAMA3: "",  # xtuner's chat: no system message unless one is given
    Template.PHI3: "",
}


def user_text(question: str, n_images: int) -> str:
    """A user message as LLaVA builds it: one placeholder line per image, then the question."""
    if IMAGE_PLACEHOLDER in question:
        return question
    return f"{IMAGE_PLACEHOLDER}\n" * n_images + question


def render(template: Template, messages: list[Message], system: str | None = None) -> str:
    """The prompt for ``messages`` (alternating user/assistant, starting with user), ending where
    the assistant's next answer begins."""
    system = DEFAULT_SYSTEM[template] if system is None else system
    for i, m in enumerate(messages):
        expected = Role.USER if i % 2 == 0 else Role.ASSISTANT
        if m.role is not expected:
            raise ValueError(f"message {i} should be from {expected.value}, got {m.role.value}")
    texts = [m.text for m in messages]
    if template in (Template.VICUNA_V1, Template.LLAVA_V1):
        # SeparatorStyle.TWO, sep=" ", sep2="</s>"
        out = system + " "
        for i, text in enumerate(texts):
            role = "USER" if i % 2 == 0 else "ASSISTANT"
            out += f"{role}: {text}" + (" " if i % 2 == 0 else "</s>")
        return out + "ASSISTANT:"
    if template in (Template.LLAVA_LLAMA_2, Template.MISTRAL_INSTRUCT):
        # SeparatorStyle.LLAMA_2: sep="<s>" (llama_2) or "" (mistral), sep2="</s>"
        sep = "<s>" if template is Template.LLAVA_LLAMA_2 else ""
        out = ""
        for i, text in enumerate(texts):
            if i == 0 and system:
                text = f"<<SYS>>\n{system}\n<</SYS>>\n\n" + text
            if i % 2 == 0:
                out += sep + f"[INST] {text} [/INST]"
            else:
                out += f" {text} </s>"
        return out[len(sep) :] if sep and out.startswith(sep) else out
    if template is Template.CHATML_DIRECT:
        # SeparatorStyle.MPT, sep="<|im_end|>"
        out = f"<|im_start|>system\n{system}<|im_end|>"
        for i, text in enumerate(texts):
            role = "user" if i % 2 == 0 else "assistant"
            out += f"<|im_start|>{role}\n{text}<|im_end|>"
        return out + "<|im_start|>assistant\n"
    if template is Template.PLAIN:
        # SeparatorStyle.PLAIN, sep="\n": the user's text and the answers, nothing else
        return system + "".join(text + "\n" for text in texts)
    if template is Template.LLAVA_HF:
        out = system
        for i, text in enumerate(texts):
            role = "USER" if i % 2 == 0 else "ASSISTANT"
            out += f"{role}: {text} "
        return out + "ASSISTANT:"
    if template is Template.LLAMA3:
        # xtuner's llama3_chat: SYSTEM, INSTRUCTION per user turn, SUFFIX "<|eot_id|>" after each answer, SEP ""
        out = f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>" if system else ""
        for i, text in enumerate(texts):
            if i % 2 == 0:
                out += (f"<|start_header_id|>user<|end_header_id|>\n\n{text}<|eot_id|>"
                        "<|start_header_id|>assistant<|end_header_id|>\n\n")
            else:
                out += f"{text}<|eot_id|>"
        return out
    if template is Template.PHI3:
        # xtuner's phi3_chat: SYSTEM, INSTRUCTION per user turn, SUFFIX "<|end|>" and SEP "\n" after each answer
        out = f"<|system|>\n{system}<|end|>\n" if system else ""
        for i, text in enumerate(texts):
            out += f"<|user|>\n{text}<|end|>\n<|assistant|>\n" if i % 2 == 0 else f"{text}<|end|>\n"
        return out
    if template is Template.CHECKPOINT:
        raise ValueError("the checkpoint's template is rendered from its text (chat_template.render_chat_template)")
    raise ValueError(f"unknown template {template!r}")
