"""Text to token ids as the reference tokenizer gives them, also right after a special token.

llama.cpp's SentencePiece tokenizer puts the "▁" space prefix before every stretch of text, also one
that follows a special token such as ``<image>`` or ``</s>``: transformers' *legacy* behaviour.
Non-legacy tokenizers (transformers' ``LlamaTokenizer(legacy=False)``, a ``tokenizer.json`` whose
Metaspace prepends only at the start) give only the start of the string a prefix. The converter
records which one the checkpoint's reference uses (`LlavaKeys.SPACE_AFTER_SPECIAL`); for the
non-legacy ones a second, vocabulary-only handle on the same GGUF, with ``add_space_prefix`` turned
off, tokenizes, and the start of the string gets its prefix here.

Phi-3's tokenizer strips the whitespace after its special tokens (``rstrip`` on its added tokens but
``<unk>``, ``<s>``, ``<|endoftext|>``, and the ``<image>`` token llava-hf adds, which keeps it). llama.cpp
strips after *every* special token (``LLAMA_TOKEN_ATTR_RSTRIP``), ``<image>`` included, and only for files
whose ``general.name`` holds "phi-3" or "phi3", which converters do not always write ("Phi 3 Mini 4k
Instruct"). So here every ``phi3``-architecture file gets the reference's rule, by stripping that
whitespace before llama.cpp tokenizes, and llama.cpp's own rule is kept off by loading such a file under
a ``general.name`` without those words (`name_overrides`).
"""

from __future__ import annotations

import ctypes
import re
import unicodedata
from pathlib import Path

import gguf
import llama_cpp
from llama_cpp import _internals

from llava_gguf.errors import ModelLoadError
from llava_gguf.metadata import LlavaKeys, read_header_keys

ADD_SPACE_PREFIX = "tokenizer.ggml.add_space_prefix"
GENERAL_NAME = gguf.Keys.General.NAME
PHI3_ARCH = "phi3"
# llama.cpp's Phi-3 rule: every special token strips the whitespace after it but these
_PHI3_KEEP_SPACE = frozenset({"<unk>", "<s>", "<|endoftext|>"})
_SPECIAL = (llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
            | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN)


_PHI3_NAMES = re.compile(r"phi-?3", re.IGNORECASE)  # what llama.cpp's rule looks for in general.name


def name_overrides(path: Path) -> list[tuple[bytes, int, object]]:
    """llama.cpp key overrides (key, type, value) that keep its name-triggered Phi-3 whitespace rule off
    for ``path`` (the tokenizer applies the reference's rule instead); none for other files."""
    name = str(read_header_keys(path, {GENERAL_NAME}).get(GENERAL_NAME, ""))
    if not _PHI3_NAMES.search(name):
        return []
    neutral = _PHI3_NAMES.sub(lambda m: m.group(0).replace("3", " 3").replace("- ", " "), name)
    return [(GENERAL_NAME.encode(), llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, neutral.encode()[:127])]


def kv_override_array(entries: list[tuple[bytes, int, object]]) -> ctypes.Array[llama_cpp.llama_model_kv_override]:
    """``entries`` as llama.cpp's override list (the last, empty key ends it); keep it alive while loading."""
    overrides = (llama_cpp.llama_model_kv_override * (len(entries) + 1))()
    for slot, (key, tag, value) in zip(overrides, entries):
        slot.key, slot.tag = key, tag
        field = {llama_cpp.LLAMA_KV_OVERRIDE_TYPE_BOOL: "val_bool", llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR: "val_str"}[tag]
        setattr(slot.value, field, value)
    return overrides


def _flag(metadata: dict[str, str], key: str, default: bool) -> bool:
    value = metadata.get(key)
    return default if value is None else value.strip().lower() in ("true", "1")


class Tokenizer:
    """Tokenizes with the GGUF's vocabulary the way the checkpoint's reference tokenizer does."""

    def __init__(self, path: Path, model: _internals.LlamaModel) -> None:
        self.path = path
        self.model = model
        metadata = model.metadata()
        self.add_space_prefix = _flag(metadata, ADD_SPACE_PREFIX, True)
        # files without the key (older ones, other converters') keep llama.cpp's behaviour
        self.space_after_special = _flag(metadata, LlavaKeys.SPACE_AFTER_SPECIAL, True)
        self._plain: _internals.LlamaModel | None = None
        self._overrides: ctypes.Array[llama_cpp.llama_model_kv_override] | None = None
        # the reference's normalizer (Qwen2's NFC): llama.cpp applies none, so the text is normalized here
        self.normalization = metadata.get(LlavaKeys.UNICODE_NORMALIZATION) or None
        image_token = metadata.get(LlavaKeys.IMAGE_TOKEN_ID)
        self._image_token = int(image_token) if image_token is not None else None
        self._rstrip = self._phi3_rstrip() if metadata.get("general.architecture") == PHI3_ARCH else None

    def _phi3_rstrip(self) -> re.Pattern[str] | None:
        """The special tokens (as text) followed by the whitespace Phi-3's tokenizer strips."""
        texts = set()
        for token in range(self.model.n_vocab()):
            if token != self._image_token and llama_cpp.llama_vocab_get_attr(self.model.vocab, token) & _SPECIAL:
                text = self.token_bytes(token).decode("utf-8", errors="replace")
                if text and text not in _PHI3_KEEP_SPACE:
                    texts.add(text)
        if not texts:
            return None
        # longest first, so that a token that prefixes another never wins; C's isspace
        alternatives = "|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True))
        return re.compile(f"({alternatives})[ \t\n\v\f\r]+")

    def tokenize(self, text: str, *, add_bos: bool, special: bool = True) -> list[int]:
        bos = [self.model.token_bos()] if add_bos else []
        if self.normalization is not None:
            text = unicodedata.normalize(self.normalization, text)  # type: ignore[arg-type]
        if special and self._rstrip is not None:
            text = self._rstrip.sub(r"\1", text)
        if not text:
            return bos
        if not special or self.space_after_special or not self.add_space_prefix:
            return self.model.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)
        plain = self._plain_vocab()
        ids = plain.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if not self._starts_with_special(ids, text):
            ids = plain.tokenize((" " + text).encode("utf-8"), add_bos=False, special=True)
        return bos + ids

    def _starts_with_special(self, ids: list[int], text: str) -> bool:
        """Whether the text opens with a special (control) token, which takes no prefix before it;
        a non-special added token (user-defined) still gets a lone "▁" before it, as in the reference."""
        if not ids or not llama_cpp.llama_vocab_get_attr(self.model.vocab, ids[0]) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL:
            return False
        return text.encode("utf-8").startswith(self.token_bytes(ids[0]))

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for (special tokens rendered as text)."""
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.model.vocab, token, buf, len(buf), 0, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.model.vocab, token, buf, len(buf), 0, True)
        return buf.raw[:n]

    def _plain_vocab(self) -> _internals.LlamaModel:
        """The same vocabulary with ``add_space_prefix`` off (loaded once, vocabulary only)."""
        if self._plain is None:
            params = llama_cpp.llama_model_default_params()
            params.vocab_only = True
            overrides = kv_override_array([(ADD_SPACE_PREFIX.encode(), llama_cpp.LLAMA_KV_OVERRIDE_TYPE_BOOL, False),
                                           *name_overrides(self.path)])
            params.kv_overrides = overrides
            self._overrides = overrides  # llama.cpp reads it while loading: keep it alive
            try:
                self._plain = _internals.LlamaModel(path_model=str(self.path), params=params, verbose=False)
            except (ValueError, RuntimeError) as e:
                raise ModelLoadError(f"{self.path}: llama.cpp could not load the vocabulary ({e})") from e
        return self._plain

    def close(self) -> None:
        if self._plain is not None:
            self._plain.close()
            self._plain = None
