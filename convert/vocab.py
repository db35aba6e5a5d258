"""The LLM's tokenizer, embedded in its GGUF as llama.cpp's SentencePiece ("llama") vocabulary.

The base pieces come from ``tokenizer.model`` (through gguf-py's `SentencePieceVocab`) or, when
a checkpoint ships only ``tokenizer.json``, from that file's BPE vocabulary. Added tokens
(``<image>``, ``<pad>``, ...) come from ``tokenizer.json``, ``tokenizer_config.json`` and
``added_tokens.json``; special ids, ``add_bos`` and any chat template come from gguf-py's
`SpecialVocab`. The list is padded to the embedding's row count, as llama.cpp requires.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import gguf

from llava_gguf.convert.checkpoint import read_json
from llava_gguf.errors import CheckpointError

_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


@dataclass
class Vocabulary:
    tokens: list[bytes]
    scores: list[float]
    types: list[int]
    add_space_prefix: bool

    def token_id(self, text: str) -> int | None:
        try:
            return self.tokens.index(text.encode("utf-8"))
        except ValueError:
            return None


@dataclass(frozen=True)
class AddedToken:
    id: int
    content: str
    special: bool


def _added_tokens(directory: Path) -> dict[int, AddedToken]:
    added: dict[int, AddedToken] = {}
    tokenizer_json = directory / "tokenizer.json"
    if tokenizer_json.is_file():
        for t in read_json(tokenizer_json).get("added_tokens", []):
            added[int(t["id"])] = AddedToken(int(t["id"]), t["content"], bool(t.get("special", False)))
    config = directory / "tokenizer_config.json"
    if config.is_file():
        for tid, t in (read_json(config).get("added_tokens_decoder") or {}).items():
            added.setdefault(int(tid), AddedToken(int(tid), t["content"], bool(t.get("special", False))))
    added_json = directory / "added_tokens.json"
    if added_json.is_file():
        for content, tid in read_json(added_json).items():
            added.setdefault(int(tid), AddedToken(int(tid), content, True))
    return added


def _from_sentencepiece(directory: Path) -> Vocabulary:
    vocab = gguf.vocab.SentencePieceVocab(directory)
    tokens, scores, types = [], [], []
    for text, score, toktype in vocab.sentencepiece_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(int(toktype))
    # A model trained with add_dummy_prefix puts "▁" before the first word.
    first = vocab.sentencepiece_tokenizer.EncodeAsPieces("a")
    return Vocabulary(tokens, scores, types, add_space_prefix=bool(first) and first[0].startswith("\u2581"))


def _from_tokenizer_json(directory: Path) -> Vocabulary:
    data = read_json(directory / "tokenizer.json")
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback", False):
        raise CheckpointError(
            f"{directory}: tokenizer.json is not a SentencePiece-style (byte-fallback BPE) Llama tokenizer, "
            "and there is no tokenizer.model"
        )
    pieces: dict[str, int] = model["vocab"]
    n = max(pieces.values()) + 1
    tokens = [f"[PAD{i}]".encode() for i in range(n)]
    scores = [0.0] * n
    types = [int(gguf.TokenType.UNUSED)] * n
    unk = model.get("unk_token")
    for piece, tid in pieces.items():
        tokens[tid] = piece.encode("utf-8")
        if _BYTE_PIECE.match(piece):
            types[tid] = int(gguf.TokenType.BYTE)
        elif piece == unk:
            types[tid] = int(gguf.TokenType.UNKNOWN)
        else:
            types[tid] = int(gguf.TokenType.NORMAL)
            scores[tid] = -float(tid)  # SentencePiece BPE ranks pieces by id: earlier merges score higher
    text = json.dumps(data.get("normalizer")) + json.dumps(data.get("pre_tokenizer"))
    add_prefix = '"prepend": "\\u2581"' in text or '"prepend_scheme": "first"' in text or '"prepend_scheme": "always"' in text
    return Vocabulary(tokens, scores, types, add_space_prefix=add_prefix)


def read_vocabulary(directory: Path, n_vocab: int) -> Vocabulary:
    """The token list of a checkpoint's tokenizer, padded to ``n_vocab`` (the embedding rows)."""
    if (directory / "tokenizer.model").is_file():
        vocab = _from_sentencepiece(directory)
    elif (directory / "tokenizer.json").is_file():
        vocab = _from_tokenizer_json(directory)
    else:
        raise CheckpointError(f"{directory}: no tokenizer (tokenizer.model or tokenizer.json) found")
    for token in sorted(_added_tokens(directory).values(), key=lambda t: t.id):
        while len(vocab.tokens) <= token.id:
            vocab.tokens.append(f"[PAD{len(vocab.tokens)}]".encode())
            vocab.scores.append(-1000.0)
            vocab.types.append(int(gguf.TokenType.UNUSED))
        base_type = vocab.types[token.id]
        if base_type in (int(gguf.TokenType.NORMAL), int(gguf.TokenType.UNUSED)) or token.id >= n_vocab:
            vocab.tokens[token.id] = token.content.encode("utf-8")
            vocab.scores[token.id] = -1000.0
            vocab.types[token.id] = int(gguf.TokenType.CONTROL if token.special else gguf.TokenType.USER_DEFINED)
    if len(vocab.tokens) > n_vocab:
        raise CheckpointError(
            f"{directory}: the tokenizer has {len(vocab.tokens)} tokens but the embedding has {n_vocab} rows"
        )
    for i in range(len(vocab.tokens), n_vocab):
        vocab.tokens.append(f"[PAD{i}]".encode())
        vocab.scores.append(-1000.0)
        vocab.types.append(int(gguf.TokenType.UNUSED))
    return vocab


def write_vocabulary(writer: gguf.GGUFWriter, directory: Path, n_vocab: int) -> Vocabulary:
    vocab = read_vocabulary(directory, n_vocab)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_add_space_prefix(vocab.add_space_prefix)
    special = gguf.SpecialVocab(directory, n_vocab=n_vocab)
    special.add_to_gguf(writer, quiet=True)
    return vocab
