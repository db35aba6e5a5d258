"""A checkpoint's own chat template (``tokenizer.chat_template``), rendered exactly as transformers renders it.

transformers (``utils/chat_template_utils.py``) compiles the template in jinja2's
``ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`` with the ``loopcontrols`` extension, a
``{% generation %}`` block (it only marks assistant text), its own ``tojson`` filter, and the globals
``raise_exception``, ``strftime_now``, ``dict`` and ``namespace``; the processor renders with the tokenizer's
named special tokens (``bos_token``, ``eos_token``...) and ``add_generation_prompt=True``. The same here.

Messages go in the form the template reads: multimodal templates (llava-hf's, which loop over
``message['content']``) get transformers' content parts (``{"type": "image"}``, ``{"type": "text", ...}``);
text-only ones (Llama-3 instruct's, Phi-3's) get the text with LLaVA's ``<image>`` placeholder lines, as users of
those checkpoints pass it. Either way the rendered prompt holds one ``<image>`` per image where the template
puts it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llava_gguf.errors import PromptError
from llava_gguf.llm.templates import IMAGE_PLACEHOLDER, Message, Role

ContentPart = dict[str, str]


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: transformers tracks assistant text with it; it renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


class _TemplateDict:
    """``dict(...)`` in a template, without attribute access to the type itself (transformers' TemplateDict)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """jinja2's namespace, refusing underscore-prefixed names (transformers' TemplateNamespace)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (jinja2's own signature trick)
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot store underscore-prefixed names ({name!r})")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers' filter: jinja2's own escapes HTML characters
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:  # noqa: A002 (the name templates call it with)
    return datetime.now().strftime(format)


@lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    """The template as transformers compiles it; a syntax error is a `PromptError` in one line."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_Namespace)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise PromptError(f"the chat template does not compile (line {e.lineno}: {e.message})") from e


@lru_cache(maxsize=8)
def reads_content_parts(source: str) -> bool:
    """Whether the template loops over a message's content (transformers' multimodal form: a list of parts)
    rather than printing it as a string. Found in the template's syntax tree: a ``for`` over ``...content``
    (possibly through filters such as ``selectattr``), or over a name set from it."""
    try:
        tree = ImmutableSandboxedEnvironment(extensions=[_Generation, jinja2.ext.loopcontrols]).parse(source)
    except jinja2.TemplateSyntaxError:
        return False
    content_names = {node.target.name for node in tree.find_all(jinja2.nodes.Assign)
                     if isinstance(node.target, jinja2.nodes.Name) and _is_content(node.node)}
    return any(_is_content(node.iter, content_names) for node in tree.find_all(jinja2.nodes.For))


def _is_content(node: jinja2.nodes.Node, names: frozenset[str] | set[str] = frozenset()) -> bool:
    while isinstance(node, (jinja2.nodes.Filter, jinja2.nodes.Test)) and node.node is not None:
        node = node.node
    if isinstance(node, jinja2.nodes.Getitem):
        return isinstance(node.arg, jinja2.nodes.Const) and node.arg.value == "content"
    if isinstance(node, jinja2.nodes.Getattr):
        return node.attr == "content"
    return isinstance(node, jinja2.nodes.Name) and node.name in names


def content_parts(text: str) -> list[ContentPart]:
    """A message's text with ``<image>`` placeholders as transformers' content parts: the leading
    placeholder lines LLaVA puts before the question (`templates.user_text`) become image parts, in order;
    placeholders elsewhere split the text where they stand."""
    parts: list[ContentPart] = []
    line = IMAGE_PLACEHOLDER + "\n"
    while text.startswith(line):
        parts.append({"type": "image"})
        text = text[len(line):]
    chunks = text.split(IMAGE_PLACEHOLDER)
    for i, chunk in enumerate(chunks):
        if i:
            parts.append({"type": "image"})
        if chunk or (i == 0 and len(chunks) == 1):
            parts.append({"type": "text", "text": chunk})
    return parts


def chat_messages(messages: list[Message], system: str | None, multimodal: bool) -> list[dict[str, Any]]:
    """The conversation as transformers' message dicts (a system message first when one is given)."""
    out: list[dict[str, Any]] = []
    if system:
        out.append({"role": "system", "content": [{"type": "text", "text": system}] if multimodal else system})
    for message in messages:
        if multimodal:
            content: Any = (content_parts(message.text) if message.role is Role.USER
                            else [{"type": "text", "text": message.text}])
        else:
            content = message.text
        out.append({"role": message.role.value, "content": content})
    return out


def render_chat_template(source: str, messages: list[Message], system: str | None,
                         special_tokens: Mapping[str, str]) -> str:
    """The prompt for ``messages`` as transformers' ``apply_chat_template(..., add_generation_prompt=True)``
    renders it; ``special_tokens``: the tokenizer's named ones (``bos_token``, ``eos_token``...)."""
    template = compile_template(source)
    chat = chat_messages(messages, system, reads_content_parts(source))
    try:
        return template.render(messages=chat, tools=None, documents=None, add_generation_prompt=True,
                               **dict(special_tokens))
    except jinja2.TemplateError as e:
        raise PromptError(f"the chat template refused the conversation: {e}") from e
