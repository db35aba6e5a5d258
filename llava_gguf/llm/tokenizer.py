"""Text to token ids as the reference tokenizer gives them, also right after a special token.

llama.cpp's SentencePiece tokenizer puts the "▁" space prefix before every stretch of text, also one
that follows a special token such as ``<image>`` or ``</s>``: transformers' *legacy* behaviour.
Non-legacy tokenizers (transformers' ``LlamaTokenizer(legacy=False)``, a ``tokenizer.json`` whose
Metaspace prepends only at the start) give only the start of the string a prefix. The converter
records which one the checkpoint's reference uses (`LlavaKeys.SPACE_AFTER_SPECIAL`); for the
non-legacy ones a second, vocabulary-only handle on the same GGUF, with ``add_space_prefix`` turned
off, tokenizes, and the start of the string gets its prefix here.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import llama_cpp
from llama_cpp import _internals

from llava_gguf.errors import ModelLoadError
from llava_gguf.metadata import LlavaKeys

ADD_SPACE_PREFIX = "tokenizer.ggml.add_space_prefix"


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

    def tokenize(self, text: str, *, add_bos: bool, special: bool = True) -> list[int]:
        bos = [self.model.token_bos()] if add_bos else []
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
            overrides = (llama_cpp.llama_model_kv_override * 2)()  # the last, empty key ends the list
            overrides[0].key = ADD_SPACE_PREFIX.encode()
            overrides[0].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_BOOL
            overrides[0].value.val_bool = False
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
