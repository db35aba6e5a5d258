"""The LLM's tokenizer, embedded in its GGUF as llama.cpp's SentencePiece ("llama") vocabulary.

The base pieces come from ``tokenizer.model`` (its proto, types included) or, when
a checkpoint ships only ``tokenizer.json``, from that file's BPE vocabulary. Added tokens
(``<image>``, ``<pad>``, ...) come from ``tokenizer.json``, ``tokenizer_config.json`` and
``added_tokens.json``; special ids, ``add_bos`` and any chat template come from gguf-py's
`SpecialVocab`. The list is padded to the embedding's row count, as llama.cpp requires.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import gguf
from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2

from llava_gguf.convert.checkpoint import read_json
from llava_gguf.errors import CheckpointError
from llava_gguf.metadata import Layout, LlavaKeys

_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
_SPM_MODEL_TYPES = (1, 2)  # TrainerSpec.ModelType UNIGRAM, BPE
# ModelProto.SentencePiece.Type -> llama.cpp's token type
_SPM_PIECE_TYPES = {
    1: gguf.TokenType.NORMAL,
    2: gguf.TokenType.UNKNOWN,
    3: gguf.TokenType.CONTROL,
    4: gguf.TokenType.USER_DEFINED,
    5: gguf.TokenType.UNUSED,
    6: gguf.TokenType.BYTE,
}


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


def _special_contents(directory: Path) -> set[str]:
    """The token texts ``special_tokens_map.json`` names (bos, eos, additional special tokens...)."""
    path = directory / "special_tokens_map.json"
    if not path.is_file():
        return set()
    found: set[str] = set()
    for value in read_json(path).values():
        for item in value if isinstance(value, list) else [value]:
            content = item.get("content") if isinstance(item, dict) else item
            if isinstance(content, str):
                found.add(content)
    return found


def _added_tokens(directory: Path) -> dict[int, AddedToken]:
    """Added tokens by id, from tokenizer.json, tokenizer_config.json and added_tokens.json (that order wins)."""
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
        # transformers adds these as plain (non-special) tokens unless special_tokens_map names them
        special = _special_contents(directory)
        for content, tid in read_json(added_json).items():
            added.setdefault(int(tid), AddedToken(int(tid), content, content in special))
    return added


def _from_sentencepiece(directory: Path) -> Vocabulary:
    """Pieces, scores and types straight from the ``tokenizer.model`` proto, so user-defined pieces
    (which SentencePieceProcessor cannot tell from normal ones) keep their type."""
    path = directory / "tokenizer.model"
    try:
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(path.read_bytes())
    except DecodeError as e:
        raise CheckpointError(f"{path}: not a SentencePiece model ({e})") from e
    if not proto.pieces:
        raise CheckpointError(f"{path}: a SentencePiece model without pieces")
    if proto.trainer_spec.model_type not in _SPM_MODEL_TYPES:
        raise CheckpointError(
            f"{path}: SentencePiece model type {proto.trainer_spec.model_type} is not BPE or unigram; "
            "llama.cpp cannot run it"
        )
    tokens = [p.piece.encode("utf-8") for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [int(_SPM_PIECE_TYPES[p.type]) for p in proto.pieces]
    return Vocabulary(tokens, scores, types, add_space_prefix=bool(proto.normalizer_spec.add_dummy_prefix))


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
    prepends, schemes = _prefix_steps(data)
    return Vocabulary(tokens, scores, types, add_space_prefix=prepends or bool({"first", "always"} & set(schemes)))


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


def _walk(node: object, kind: str) -> list[dict]:
    """Every normalizer / pre-tokenizer of type ``kind`` in a tokenizer.json pipeline (Sequences unrolled)."""
    if not isinstance(node, dict):
        return []
    found = [node] if node.get("type") == kind else []
    for child in node.get("normalizers", []) + node.get("pretokenizers", []):
        found += _walk(child, kind)
    return found


def _prefix_steps(data: dict) -> tuple[bool, list[str]]:
    """How a tokenizer.json pipeline adds the "▁" prefix: (a Prepend "▁" normalizer, the Metaspace
    pre-tokenizers' prepend schemes)."""
    prepends = any(n.get("prepend") == "\u2581" for n in _walk(data.get("normalizer"), "Prepend"))
    schemes = [m.get("prepend_scheme", "always" if m.get("add_prefix_space") else "never")
               for m in _walk(data.get("pre_tokenizer"), "Metaspace")]
    return prepends, schemes


def space_after_special(directory: Path, layout: Layout) -> bool:
    """Whether the checkpoint's reference tokenizer puts "▁" before text that follows a special token
    (transformers' legacy behaviour, and llama.cpp's), or only at the start of the string."""
    config_path = directory / "tokenizer_config.json"
    legacy = read_json(config_path).get("legacy") if config_path.is_file() else None
    if layout is Layout.ORIGINAL:
        # LLaVA's code loads the slow LlamaTokenizer, which transformers 4 treats as legacy unless told not to
        return True if legacy is None else bool(legacy)
    tokenizer_json = directory / "tokenizer.json"
    if tokenizer_json.is_file():  # transformers runs this file's pipeline
        prepends, schemes = _prefix_steps(read_json(tokenizer_json))
        # a Prepend normalizer runs on each stretch of text between added tokens
        return prepends or "always" in schemes
    # tokenizer.model alone: transformers 5's LlamaTokenizer, non-legacy unless the config says legacy
    return bool(legacy)


def write_vocabulary(writer: gguf.GGUFWriter, directory: Path, n_vocab: int, layout: Layout) -> Vocabulary:
    vocab = read_vocabulary(directory, n_vocab)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_add_space_prefix(vocab.add_space_prefix)
    writer.add_bool(LlavaKeys.SPACE_AFTER_SPECIAL, space_after_special(directory, layout))
    special = gguf.SpecialVocab(directory, n_vocab=n_vocab)
    special.add_to_gguf(writer, quiet=True)
    return vocab
