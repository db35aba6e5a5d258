"""The LLM's tokenizer, embedded in its GGUF as llama.cpp's SentencePiece ("llama") vocabulary or its
byte-level BPE ("gpt2") one.

SentencePiece: the base pieces come from ``tokenizer.model`` (its proto, types included) or, when
a checkpoint ships only ``tokenizer.json``, from that file's byte-fallback BPE vocabulary. Byte-level
BPE (Llama 3, Qwen2): the vocabulary and merges of ``tokenizer.json``, and ``tokenizer.ggml.pre`` named by
comparing its split regex with the ones llama.cpp implements. Added tokens (``<image>``, ``<pad>``,
``<|eot_id|>``...) come from ``tokenizer.json``, ``tokenizer_config.json`` and ``added_tokens.json``;
special ids and ``add_bos`` come from gguf-py's `SpecialVocab`, every end-of-generation id from
``generation_config.json`` and the tokenizer. The list is padded to the embedding's row count, as
llama.cpp requires.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2

from llava_gguf.convert.checkpoint import LlavaCheckpoint, TokenizerKind, read_json
from llava_gguf.errors import CheckpointError
from llava_gguf.metadata import Layout, LlavaKeys

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class AddedToken:
    id: int
    content: str
    special: bool
    rstrip: bool = False  # the tokenizer drops whitespace after the token


@dataclass
class Vocabulary:
    tokens: list[bytes]
    scores: list[float]
    types: list[int]
    add_space_prefix: bool
    added: dict[int, AddedToken] = field(default_factory=dict)

    def token_id(self, text: str) -> int | None:
        try:
            return self.tokens.index(text.encode("utf-8"))
        except ValueError:
            return None


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
            added[int(t["id"])] = AddedToken(int(t["id"]), t["content"], bool(t.get("special", False)),
                                             bool(t.get("rstrip", False)))
    config = directory / "tokenizer_config.json"
    if config.is_file():
        for tid, t in (read_json(config).get("added_tokens_decoder") or {}).items():
            added.setdefault(int(tid), AddedToken(int(tid), t["content"], bool(t.get("special", False)),
                                                  bool(t.get("rstrip", False))))
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


# The split regexes of byte-level BPE pre-tokenizers as tokenizer.json spells them, each with the
# ignore_merges llama.cpp applies, to the tokenizer.ggml.pre name llama.cpp reads (src/llama-vocab.cpp,
# llama.cpp b8xxx as vendored by llama-cpp-python 0.3.36: its "original regex from tokenizer.json"
# comments). None: a lone ByteLevel pre-tokenizer with use_regex, whose regex is GPT-2's.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+"
                 r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"
                r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SEED_CODER_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+"
                     r"|\s*[\r\n]+|\s+(?!\S)|\s+")
BPE_PRE_TOKENIZERS: dict[tuple[str | None, bool], str] = {
    (_LLAMA3_SPLIT, True): "llama-bpe",  # Llama 3: digits in groups of 1-3
    (_LLAMA3_SPLIT, False): "smaug-bpe",  # the same split, merges always applied
    (_QWEN2_SPLIT, False): "qwen2",
    (_QWEN35_SPLIT, False): "qwen35",
    (_GPT4O_SPLIT, False): "gpt-4o",
    (_TEKKEN_SPLIT, True): "tekken",
    (_SEED_CODER_SPLIT, False): "seed-coder",
    (None, False): "gpt-2",
}


def bpe_pre_tokenizer(data: dict[str, Any], where: Path) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE tokenizer.json: its split regex (and
    ``ignore_merges``) compared with the pre-tokenizers llama.cpp implements; anything else is refused."""
    steps = data.get("pre_tokenizer") or {}
    steps = steps.get("pretokenizers", []) if steps.get("type") == "Sequence" else [steps]
    split: str | None = None
    byte_level = [s for s in steps if isinstance(s, dict) and s.get("type") == "ByteLevel"]
    splits = [s for s in steps if isinstance(s, dict) and s.get("type") == "Split"]
    others = [s.get("type") if isinstance(s, dict) else s for s in steps if s not in byte_level + splits]
    if len(byte_level) != 1 or len(splits) > 1 or others:
        kinds = [s.get("type") if isinstance(s, dict) else s for s in steps]
        raise CheckpointError(
            f"{where}: byte-level BPE pre-tokenizer {kinds} is not one llama.cpp implements; "
            "expected a ByteLevel step, after at most one Split"
        )
    if byte_level[0].get("add_prefix_space"):
        raise CheckpointError(f"{where}: a ByteLevel pre-tokenizer with add_prefix_space; llama.cpp's BPE adds no prefix space")
    if splits:
        pattern = splits[0].get("pattern") or {}
        split = pattern.get("Regex", pattern.get("String"))
        if splits[0].get("behavior", "Isolated") != "Isolated" or splits[0].get("invert", False):
            raise CheckpointError(f"{where}: a Split pre-tokenizer with behavior {splits[0].get('behavior')!r} "
                                  f"(invert={splits[0].get('invert')}); llama.cpp implements Isolated splits")
        if byte_level[0].get("use_regex", True):
            raise CheckpointError(f"{where}: a Split followed by a ByteLevel with use_regex; llama.cpp splits once")
    elif not byte_level[0].get("use_regex", True):
        raise CheckpointError(f"{where}: a ByteLevel pre-tokenizer without a split regex; llama.cpp needs one")
    ignore_merges = bool((data.get("model") or {}).get("ignore_merges", False))
    name = BPE_PRE_TOKENIZERS.get((split, ignore_merges))
    if name is None:
        raise CheckpointError(
            f"{where}: unknown BPE pre-tokenizer split {split!r} (ignore_merges={ignore_merges}); llama.cpp "
            f"implements {', '.join(sorted(set(BPE_PRE_TOKENIZERS.values())))}, so the converter cannot name it"
        )
    return name


def _from_byte_level_bpe(directory: Path) -> Vocabulary:
    """A byte-level BPE vocabulary as llama.cpp's "gpt2" model holds it: the pieces as tokenizer.json
    spells them (bytes mapped to printable characters, "Ġ" for a space)."""
    data = read_json(directory / "tokenizer.json")
    pieces: dict[str, int] = (data.get("model") or {})["vocab"]
    n = max(pieces.values()) + 1
    tokens = [f"[PAD{i}]".encode() for i in range(n)]
    types = [int(gguf.TokenType.UNUSED)] * n
    for piece, tid in pieces.items():
        tokens[tid] = piece.encode("utf-8")
        types[tid] = int(gguf.TokenType.NORMAL)
    return Vocabulary(tokens, [0.0] * n, types, add_space_prefix=False)


def bpe_merges(directory: Path) -> list[str]:
    """tokenizer.json's merges as llama.cpp reads them: "left right" strings."""
    merges = (read_json(directory / "tokenizer.json").get("model") or {}).get("merges") or []
    out = []
    for m in merges:
        pair = m.split(" ") if isinstance(m, str) else list(m)
        if len(pair) != 2 or any(" " in part for part in pair):
            raise CheckpointError(f"{directory}/tokenizer.json: merge {m!r} is not two space-free pieces")
        out.append(" ".join(pair))
    if not out:
        raise CheckpointError(f"{directory}/tokenizer.json: a BPE tokenizer without merges")
    return out


def read_vocabulary(directory: Path, n_vocab: int, kind: TokenizerKind = TokenizerKind.SPM) -> Vocabulary:
    """The token list of a checkpoint's tokenizer, padded to ``n_vocab`` (the embedding rows)."""
    if kind is TokenizerKind.BPE:
        vocab = _from_byte_level_bpe(directory)
    elif (directory / "tokenizer.model").is_file():
        vocab = _from_sentencepiece(directory)
    elif (directory / "tokenizer.json").is_file():
        vocab = _from_tokenizer_json(directory)
    else:
        raise CheckpointError(f"{directory}: no tokenizer (tokenizer.model or tokenizer.json) found")
    vocab.added = _added_tokens(directory)
    for token in sorted(vocab.added.values(), key=lambda t: t.id):
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


def unicode_normalization(data: dict) -> str | None:
    """The Unicode normalization form a tokenizer.json's normalizer applies (NFC, NFD, NFKC, NFKD), if any."""
    forms = [form for form in ("NFC", "NFD", "NFKC", "NFKD") if _walk(data.get("normalizer"), form)]
    if len(forms) > 1:
        raise CheckpointError(f"tokenizer.json normalizes to {' and '.join(forms)} at once, which llava-gguf cannot follow")
    return forms[0] if forms else None


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


# turn-end tokens: the single one among the end ids becomes tokenizer.ggml.eot_token_id
EOT_TOKENS = ("<|eot_id|>", "<|end|>", "<|im_end|>", "<end_of_turn>")
def end_token_ids(directory: Path, vocab: Vocabulary, tokenizer_eos: int | None) -> list[int]:
    """Every id that ends an answer: generation_config.json's ``eos_token_id`` (an int or a list),
    then the tokenizer's eos."""
    ids: list[int] = []
    path = directory / "generation_config.json"
    value = read_json(path).get("eos_token_id") if path.is_file() else None
    for tid in [*(value if isinstance(value, list) else [value]), tokenizer_eos]:
        if isinstance(tid, int) and tid not in ids:
            if not 0 <= tid < len(vocab.tokens):
                raise CheckpointError(f"{path}: eos_token_id {tid} is outside the vocabulary ({len(vocab.tokens)} tokens)")
            ids.append(tid)
    return ids


def write_vocabulary(writer: gguf.GGUFWriter, ckpt: LlavaCheckpoint, n_vocab: int) -> Vocabulary:
    """The tokenizer keys: vocabulary, special ids, add_bos, the chat template and the end ids."""
    directory, layout = ckpt.path, ckpt.layout
    vocab = read_vocabulary(directory, n_vocab, ckpt.tokenizer_kind)
    writer.add_tokenizer_model(ckpt.tokenizer_kind.value)
    if ckpt.tokenizer_kind is TokenizerKind.BPE:
        writer.add_tokenizer_pre(bpe_pre_tokenizer(read_json(directory / "tokenizer.json"), directory))
        writer.add_token_list(vocab.tokens)
        writer.add_token_types(vocab.types)
        writer.add_token_merges(bpe_merges(directory))
        form = unicode_normalization(read_json(directory / "tokenizer.json"))
        if form is not None:  # Qwen2's NFC: the runtime normalizes before llama.cpp tokenizes
            writer.add_string(LlavaKeys.UNICODE_NORMALIZATION, form)
    else:
        writer.add_tokenizer_pre("default")
        writer.add_token_list(vocab.tokens)
        writer.add_token_scores(vocab.scores)
        writer.add_token_types(vocab.types)
        writer.add_add_space_prefix(vocab.add_space_prefix)
        writer.add_bool(LlavaKeys.SPACE_AFTER_SPECIAL, space_after_special(directory, layout))
    special = gguf.SpecialVocab(directory, n_vocab=n_vocab)
    special.chat_template = ckpt.chat_template  # the processor's first, as transformers reads it
    ends = end_token_ids(directory, vocab, special.special_token_ids.get("eos"))
    turn_ends = [i for i in ends if vocab.tokens[i].decode("utf-8", "replace") in EOT_TOKENS]
    if "eot" not in special.special_token_ids and len(turn_ends) == 1:
        special.special_token_ids["eot"] = turn_ends[0]
    special.add_to_gguf(writer, quiet=True)
    if ends:
        writer.add_array(LlavaKeys.EOS_TOKEN_IDS, ends)
    return vocab
