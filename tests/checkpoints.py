"""Tiny random LLaVA 1.5 / 1.6 checkpoints, built at test time.

Every checkpoint comes with its reference: a float32 transformers model holding
exactly the weights written to disk, the transformers tokenizer and the Pillow
image processor configured like the checkpoint. Two layouts are written:

- ``llava-hf``: the llava-hf Hub repos (``LlavaForConditionalGeneration`` /
  ``LlavaNextForConditionalGeneration``), with the transformers-4 key spelling
  (``spelling=4``, what the Hub repos hold) or the transformers-5 one (``spelling=5``).
- ``original``: the liuhaotian repos (``LlavaLlamaForCausalLM`` /
  ``LlavaMistralForCausalLM``) plus a separate CLIP repo named by ``mm_vision_tower``.

Nothing is downloaded: the SentencePiece tokenizer is trained on generated text.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch
from safetensors.torch import save_file
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from transformers import (
    AddedToken,
    AutoTokenizer,
    BatchEncoding,
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
)
from transformers.tokenization_utils_tokenizers import TokenizersBackend

SP_VOCAB_SIZE = 480
USER_DEFINED_IMAGE_ID = 3  # <image> as the first user_defined_symbols piece, after <unk> <s> </s>
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
IMAGE_SIZE = 56
PATCH_SIZE = 14
# LLaVA 1.6 pinpoints are multiples of the 336 px tile; these are the same multiples of 56 px.
GRID_PINPOINTS = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
LAYOUTS = ("llava-hf", "original")
VERSIONS = ("1.5", "1.6")
LLMS = ("llama", "mistral")
# both: tokenizer.model + tokenizer.json; json / model: one of them; model-user-defined: a tokenizer.model
# whose own pieces include <image> (a user_defined_symbols piece), nothing else names it;
# added-tokens-json: tokenizer.model + added_tokens.json (no added_tokens_decoder, no tokenizer.json)
TOKENIZER_FILES = ("both", "json", "model", "model-user-defined", "added-tokens-json")


@dataclass
class TinyCheckpoint:
    path: Path  # the checkpoint directory given to the converter
    clip_path: Path | None  # separate CLIP repo dir named by mm_vision_tower (original layout only)
    layout: str  # "llava-hf" | "original"
    llava_version: str  # "1.5" | "1.6"
    llm: str  # "llama" | "mistral"
    model: torch.nn.Module  # transformers reference, float32, eval()
    tokenizer: Any  # the transformers tokenizer the reference uses
    sp_model_path: Path  # the trained sentencepiece .model
    image_processor: Any  # Pillow reference processor configured like the checkpoint
    image_token_id: int | None  # llava-hf: id of "<image>"; original: None (it uses -200 placeholders)

    @property
    def placeholder_id(self) -> int:
        """Id to put where the image goes when calling the reference ``model``.

        llava-hf: the ``<image>`` token. original: the reference model has no such
        token, so its ``image_token_id`` is ``<unk>`` (0), which byte-fallback
        tokenization never produces; replace each -200 with it.
        """
        return int(self.model.config.image_token_id)


# ---------------------------------------------------------------- tokenizer

_WORDS = [
    "the", "a", "an", "image", "picture", "photo", "cat", "dog", "shows", "what", "is", "in",
    "this", "of", "and", "with", "on", "describe", "color", "red", "blue", "green", "USER",
    "ASSISTANT", "Question", "Answer", "café", "naïve", "résumé", "über", "Москва", "日本語",
    "東京", "😀", "🚀", "👍", "—", "…",
]
_SYLLABLES = [
    "ka", "to", "ri", "men", "sa", "lo", "ver", "the", "an", "in", "ing", "er", "ed", "st", "pl",
    "qu", "ch", "sh", "ou", "ea", "ai", "or", "ly", "ion", "ent", "al", "re", "de", "un", "co",
]
_PUNCTUATION = [",", ".", "!", "?", ":", ";", "(", ")", '"', "'", "-", "<", ">", "/"]


def training_text(n_lines: int = 3000, seed: int = 0) -> list[str]:
    """Deterministic English-like lines: words, numbers, punctuation, Unicode, whitespace runs."""
    rng = random.Random(seed)
    words = list(_WORDS)
    for _ in range(300):
        words.append("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))))
    lines = []
    for _ in range(n_lines):
        parts = []
        for _ in range(rng.randint(3, 14)):
            r = rng.random()
            if r < 0.1:
                parts.append(str(rng.randint(0, 99999)))
            elif r < 0.18:
                parts.append(rng.choice(_PUNCTUATION))
            else:
                word = rng.choice(words)
                parts.append(word.capitalize() if rng.random() < 0.15 else word)
        sep = rng.choice([" "] * 8 + ["  ", "\t", "\n"])
        lines.append(sep.join(parts))
    return lines


def train_tokenizer(root: Path, user_defined: tuple[str, ...] = ()) -> Path:
    """Train a LLaMA-style SentencePiece BPE model under ``root``; returns the .model path.
    ``user_defined`` pieces come right after the three control pieces (ids 3, 4, ...)."""
    root.mkdir(parents=True, exist_ok=True)
    prefix = root / ("tokenizer" if not user_defined else "tokenizer-user-defined")
    model_path = prefix.with_suffix(".model")
    if model_path.exists():
        return model_path
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_text()),
        model_prefix=str(prefix),
        model_type="bpe",
        vocab_size=SP_VOCAB_SIZE,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
        user_defined_symbols=list(user_defined),
    )
    return model_path


def reference_tokenizer(sp_model_path: Path, *, with_image_token: bool) -> TokenizersBackend:
    """The transformers tokenizer that gives sentencepiece's ids (with BOS).

    transformers 5 has no slow tokenizer: ``LlamaTokenizer`` is tokenizers-backed and
    rebuilds a Metaspace pre-tokenizer that drops a space on leading-whitespace input.
    The generic ``TokenizersBackend`` built from the .model proto matches sentencepiece.
    """
    tmp = sp_model_path.parent / "_reference_tokenizer"
    tmp.mkdir(exist_ok=True)
    shutil.copyfile(sp_model_path, tmp / "tokenizer.model")
    tok = TokenizersBackend.from_pretrained(str(tmp), add_bos_token=True, add_eos_token=False)
    if with_image_token:
        tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
        tok.add_special_tokens({"pad_token": AddedToken(PAD_TOKEN, special=True, normalized=False)})
        assert tok.convert_tokens_to_ids([IMAGE_TOKEN, PAD_TOKEN]) == [SP_VOCAB_SIZE, SP_VOCAB_SIZE + 1]
    return tok


class SlowLlamaTokenizer:
    """transformers 4's sentencepiece ``LlamaTokenizer`` (what the original LLaVA code loads with
    ``use_fast=False``), which transformers 5 no longer has: its ``tokenize`` / ``_tokenize`` for
    ``legacy`` True and False, with the added tokens split out first as ``PreTrainedTokenizer`` does."""

    def __init__(self, sp_model_path: Path, *, legacy: bool, added: dict[str, int] | None = None) -> None:
        proto = sp_pb2.ModelProto()
        proto.ParseFromString(sp_model_path.read_bytes())
        if not legacy:
            proto.normalizer_spec.add_dummy_prefix = False  # LlamaTokenizer.get_spm_processor
        self.sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.legacy = legacy
        self.bos_token_id = 1
        self.added = {"<unk>": 0, "<s>": 1, "</s>": 2, **(added or {})}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in sorted(self.added, key=len, reverse=True)) + ")")
        self.unk_token_length = len(self.sp.encode("<unk>", out_type=str))

    def tokenize(self, text: str) -> list[str]:
        if self.legacy or not text:
            return self._tokenize_with_added(text)
        tokens = self._tokenize_with_added("\u2581" + text.replace("\u2581", " "))
        if len(tokens) > 1 and tokens[0] == "\u2581" and tokens[1] in self.added:
            tokens = tokens[1:]
        return tokens

    def _tokenize_with_added(self, text: str) -> list[str]:
        out: list[str] = []
        for part in self._split.split(text):
            if part in self.added:
                out.append(part)
            elif part:
                out += self._tokenize(part)
        return out

    def _tokenize(self, text: str) -> list[str]:
        tokens = self.sp.encode(text, out_type=str)
        if self.legacy or not text.startswith(("\u2581", " ")):
            return tokens
        tokens = self.sp.encode("<unk>" + text, out_type=str)
        return tokens[self.unk_token_length:] if len(tokens) >= self.unk_token_length else tokens

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]:
        return [self.added[t] if t in self.added else self.sp.piece_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        inverse = {v: k for k, v in self.added.items()}
        return [inverse.get(i) or self.sp.id_to_piece(i) for i in ids]

    def get_vocab(self) -> dict[str, int]:
        return {**{self.sp.id_to_piece(i): i for i in range(self.sp.get_piece_size())}, **self.added}

    def __call__(self, text: str, add_special_tokens: bool = True) -> BatchEncoding:
        ids = self.convert_tokens_to_ids(self.tokenize(text))
        return BatchEncoding({"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids})


def _added_token(content: str) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}


def llama_tokenizer_json(tokenizer: TokenizersBackend) -> dict[str, Any]:
    """tokenizer.json in the form the Hub LLaMA repos hold (transformers-4 LlamaConverter)."""
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    data["model"]["merges"] = merges
    data["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
    ]}
    data["pre_tokenizer"] = None
    data["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0},
    ]}
    return data


def write_tokenizer_files(
    dest: Path, tokenizer: TokenizersBackend, sp_model_path: Path, *, files: str, llava_hf: bool,
    model_max_length: int,
) -> None:
    if files not in TOKENIZER_FILES:
        raise ValueError(f"tokenizer_files must be one of {TOKENIZER_FILES}, got {files!r}")
    if files != "json":
        shutil.copyfile(sp_model_path, dest / "tokenizer.model")
    if files in ("both", "json"):
        _write_json(dest / "tokenizer.json", llama_tokenizer_json(tokenizer))
    decoder = {str(i): _added_token(t) for i, t in enumerate(["<unk>", "<s>", "</s>"])}
    # added-tokens-json: only added_tokens.json names <pad> (transformers 5 would add a mapped pad token itself)
    has_pad = llava_hf and files not in ("model-user-defined", "added-tokens-json")
    if llava_hf and files == "added-tokens-json":
        _write_json(dest / "added_tokens.json", {IMAGE_TOKEN: SP_VOCAB_SIZE, PAD_TOKEN: SP_VOCAB_SIZE + 1})
    elif llava_hf and files != "model-user-defined":
        decoder[str(SP_VOCAB_SIZE)] = _added_token(IMAGE_TOKEN)
        decoder[str(SP_VOCAB_SIZE + 1)] = _added_token(PAD_TOKEN)
    config: dict[str, Any] = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": False,
        "model_max_length": model_max_length,
        "pad_token": PAD_TOKEN if has_pad else None,
        "padding_side": "left" if llava_hf else "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
    }
    if llava_hf:
        config["processor_class"] = "LlavaProcessor"
    _write_json(dest / "tokenizer_config.json", config)
    _write_json(dest / "special_tokens_map.json", {
        "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": PAD_TOKEN if has_pad else "<unk>", "unk_token": "<unk>",
    })


# ---------------------------------------------------------------- models


def vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=64, layer_norm_eps=1e-5,
        hidden_act="quick_gelu",
    )


def text_config(llm: str, vocab_size: int, pad_token_id: int | None,
                rope_theta: float | None = None) -> LlamaConfig | MistralConfig:
    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=pad_token_id,
    )
    if llm == "llama":
        return LlamaConfig(num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=rope_theta or 10000.0, **common)
    if llm == "mistral":
        return MistralConfig(num_key_value_heads=1, rms_norm_eps=1e-6, rope_theta=rope_theta or 1e6,
                             sliding_window=None, **common)
    raise ValueError(f"llm must be one of {LLMS}, got {llm!r}")


def build_reference(llava_version: str, llm: str, *, vocab_size: int, image_token_id: int,
                    pad_token_id: int | None, rope_theta: float | None = None) -> torch.nn.Module:
    text = text_config(llm, vocab_size, pad_token_id, rope_theta)
    common = dict(
        vision_config=vision_config(), text_config=text, image_token_index=image_token_id,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", tie_word_embeddings=False,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
    )
    if llava_version == "1.5":
        model = LlavaForConditionalGeneration(LlavaConfig(**common))
    elif llava_version == "1.6":
        model = LlavaNextForConditionalGeneration(
            LlavaNextConfig(image_grid_pinpoints=GRID_PINPOINTS, **common))
    else:
        raise ValueError(f"llava_version must be one of {VERSIONS}, got {llava_version!r}")
    return model.float().eval()


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Redraw every parameter so logits are well separated (default init gives near-ties)."""
    gen = torch.Generator().manual_seed(seed)

    def normal(p: torch.Tensor, mean: float, std: float) -> None:
        p.copy_(torch.randn(p.shape, generator=gen) * std + mean)

    for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        leaf = name.rsplit(".", 1)[-1]
        if "norm" in name.lower() and leaf in ("weight", "bias"):
            # LayerNorm / RMSNorm (CLIP spells pre_layrnorm)
            normal(p, 1.0 if leaf == "weight" else 0.0, 0.1 if leaf == "weight" else 0.05)
        elif leaf in ("class_embedding", "image_newline"):
            normal(p, 0.0, 1.0)
        elif "position_embedding" in name:
            normal(p, 0.0, 0.5)
        elif "embed_tokens" in name or "token_embedding" in name:
            normal(p, 0.0, 1.0)
        elif leaf == "logit_scale":
            p.fill_(2.6592)
        elif p.ndim == 1:
            normal(p, 0.0, 0.02)
        else:
            # Linear [out, in] / Conv2d [out, in, kh, kw]: std = gain / sqrt(fan_in)
            fan_in = p[0].numel()
            gain = 4.0 if "lm_head" in name else 1.3
            normal(p, 0.0, gain / fan_in**0.5)


@torch.no_grad()
def round_trip_(module: torch.nn.Module, dtype: torch.dtype) -> None:
    for p in module.parameters():
        p.copy_(p.to(dtype).to(torch.float32))


Q8_0_BLOCK = 32


@torch.no_grad()
def q8_0_exact_(weight: torch.Tensor) -> None:
    """Round a [out, in] weight to values ggml's Q8_0 stores losslessly: per block of 32, an f16
    scale d times integers in [-127, 127], the block's largest magnitude exactly 127 d (so
    quantizing finds the same d and the same integers)."""
    blocks = weight.reshape(-1, Q8_0_BLOCK)  # [out * in / 32, 32]
    amax = blocks.abs().amax(dim=1, keepdim=True)  # [n, 1]
    d = (amax / 127).to(torch.float16).to(torch.float32)
    q = torch.where(d > 0, torch.round(blocks / torch.where(d > 0, d, 1)), 0).clamp(-127, 127)
    blocks.copy_(q * d)


def make_exact_(model: torch.nn.Module, exact_in: str) -> None:
    """Give every weight a value the legacy mmproj files store losslessly: "f16" (what their f16 and
    f32 files hold: the patch and projector weights are always f16) or "q8_0" (their blocks' and the
    projector's matrices Q8_0, the rest f16), so the reference and the files hold the same weights."""
    round_trip_(model, torch.float16)
    if exact_in == "q8_0":
        for name, p in model.named_parameters():
            vision = ("vision_tower" in name and ".layers." in name) or "multi_modal_projector" in name
            if vision and p.ndim == 2 and p.shape[1] % Q8_0_BLOCK == 0:
                q8_0_exact_(p)
    elif exact_in != "f16":
        raise ValueError(f"exact_in must be 'f16' or 'q8_0', got {exact_in!r}")


def _tower_key(key: str) -> str:
    """In-memory CLIP vision tower key -> its ``vision_model.*`` name in CLIP checkpoints."""
    return key if key.startswith("vision_model.") else f"vision_model.{key}"


def split_state_dict(model: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Reference state dict grouped as llm / lm_head / tower / projector / newline, short keys."""
    groups: dict[str, dict[str, torch.Tensor]] = {
        "llm": {}, "lm_head": {}, "tower": {}, "projector": {}, "newline": {}}
    prefixes = [("model.language_model.", "llm"), ("model.vision_tower.", "tower"),
                ("model.multi_modal_projector.", "projector"), ("lm_head.", "lm_head"),
                ("model.image_newline", "newline")]
    for key, value in model.state_dict().items():
        for prefix, group in prefixes:
            if key.startswith(prefix):
                short = key[len(prefix):] or "image_newline"
                if group == "tower":
                    short = _tower_key(short)
                groups[group][short] = value.detach().clone().contiguous()
                break
        else:
            raise KeyError(f"unexpected reference key {key}")
    return groups


def hf_tensors(model: torch.nn.Module, spelling: int) -> dict[str, torch.Tensor]:
    """llava-hf keys. 4: ``language_model.model.*`` (the Hub repos); 5: ``model.language_model.*``."""
    g = split_state_dict(model)
    if spelling == 4:
        llm, head, tower, proj, newline = (
            "language_model.model.", "language_model.lm_head.", "vision_tower.",
            "multi_modal_projector.", "")
    elif spelling == 5:
        llm, head, tower, proj, newline = (
            "model.language_model.", "lm_head.", "model.vision_tower.",
            "model.multi_modal_projector.", "model.")
    else:
        raise ValueError(f"spelling must be 4 or 5, got {spelling!r}")
    out: dict[str, torch.Tensor] = {}
    out.update({llm + k: v for k, v in g["llm"].items()})
    out.update({head + k: v for k, v in g["lm_head"].items()})
    out.update({tower + k: v for k, v in g["tower"].items()})
    out.update({proj + k: v for k, v in g["projector"].items()})
    out.update({newline + k: v for k, v in g["newline"].items()})
    return out


_PROJECTOR_ORIGINAL = {"linear_1": "0", "linear_2": "2"}  # mlp2x_gelu: Linear, GELU, Linear


def original_tensors(model: torch.nn.Module, llava_version: str) -> dict[str, torch.Tensor]:
    """liuhaotian keys: ``model.*`` LLM, ``model.mm_projector.{0,2}.*``, 1.6 tower and newline."""
    g = split_state_dict(model)
    out: dict[str, torch.Tensor] = {}
    out.update({f"model.{k}": v for k, v in g["llm"].items()})
    out.update({f"lm_head.{k}": v for k, v in g["lm_head"].items()})
    for k, v in g["projector"].items():
        layer, leaf = k.split(".", 1)
        out[f"model.mm_projector.{_PROJECTOR_ORIGINAL[layer]}.{leaf}"] = v
    if llava_version == "1.6":
        out.update({f"model.vision_tower.vision_tower.{k}": v for k, v in g["tower"].items()})
        out["model.image_newline"] = g["newline"]["image_newline"]
    return out


def _parse_size(size: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", size.upper())
    if m is None:
        raise ValueError(f"cannot parse max_shard_size {size!r}")
    return int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)]


def save_safetensors(dest: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                     max_shard_size: str | None, stem: str = "model") -> list[Path]:
    tensors = {k: v.to(dtype).contiguous() for k, v in sorted(tensors.items())}
    if max_shard_size is None:
        path = dest / f"{stem}.safetensors"
        save_file(tensors, str(path), metadata={"format": "pt"})
        return [path]
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        path = dest / f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path), metadata={"format": "pt"})
        paths.append(path)
        weight_map.update({k: path.name for k in shard})
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    _write_json(dest / f"{stem}.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": weight_map})
    return paths


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


# ---------------------------------------------------------------- image processors


def clip_preprocessor_config(image_processor_type: str) -> dict[str, Any]:
    return {
        "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": OPENAI_CLIP_MEAN,
        "image_processor_type": image_processor_type,
        "image_std": OPENAI_CLIP_STD,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": IMAGE_SIZE},
    }


def reference_image_processor(llava_version: str, *, pad_to_square: bool) -> Any:
    common = dict(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, resample=3,
    )
    if llava_version == "1.5":
        # do_pad: expand to square with the mean colour first (original image_aspect_ratio="pad")
        return LlavaImageProcessorPil(do_pad=pad_to_square, **common)
    return LlavaNextImageProcessorPil(image_grid_pinpoints=GRID_PINPOINTS, do_pad=True, **common)


# ---------------------------------------------------------------- layouts


def _t4_config(config: dict[str, Any]) -> dict[str, Any]:
    """transformers-4 config spelling: ``torch_dtype`` and a flat ``rope_theta``."""
    if "dtype" in config:
        config["torch_dtype"] = config.pop("dtype")
    rope = config.pop("rope_parameters", None)
    if rope is not None:
        config["rope_theta"] = rope.get("rope_theta")
        config["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
        if "partial_rotary_factor" in rope:  # Phi3Config: flat in transformers 4
            config["partial_rotary_factor"] = rope["partial_rotary_factor"]
    for sub in ("text_config", "vision_config"):
        if isinstance(config.get(sub), dict):
            _t4_config(config[sub])
    return config


def write_llava_hf(dest: Path, model: torch.nn.Module, llava_version: str, *, spelling: int,
                   save_dtype: torch.dtype, max_shard_size: str | None,
                   generation_config: dict[str, Any] | None = None) -> None:
    save_safetensors(dest, hf_tensors(model, spelling), save_dtype, max_shard_size)
    model.config.save_pretrained(str(dest))  # config.json as transformers writes it
    config = {"architectures": [type(model).__name__],
              **json.loads((dest / "config.json").read_text()),
              "dtype": _DTYPE_NAMES[save_dtype]}
    if spelling == 4:
        config = _t4_config(config)
    config.pop("transformers_version", None)
    _write_json(dest / "config.json", config)
    _write_json(dest / "generation_config.json",
                generation_config or {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": SP_VOCAB_SIZE + 1})
    if llava_version == "1.5":
        pre = clip_preprocessor_config("CLIPImageProcessor")
        processor_class = "LlavaProcessor"
    else:
        pre = clip_preprocessor_config("LlavaNextImageProcessor")
        pre.update({"aspect_ratio_setting": "anyres", "do_pad": True,
                    "image_grid_pinpoints": GRID_PINPOINTS})
        processor_class = "LlavaNextProcessor"
    pre["processor_class"] = processor_class
    _write_json(dest / "preprocessor_config.json", pre)
    _write_json(dest / "processor_config.json", {
        "image_token": IMAGE_TOKEN, "num_additional_image_tokens": 1, "patch_size": PATCH_SIZE,
        "processor_class": processor_class, "vision_feature_select_strategy": "default",
    })


def original_config(model: torch.nn.Module, llava_version: str, llm: str, clip_path: Path,
                    save_dtype: torch.dtype) -> dict[str, Any]:
    text = model.config.text_config
    config: dict[str, Any] = {
        "_name_or_path": f"./checkpoints/tiny-{llm}",
        "architectures": ["LlavaLlamaForCausalLM" if llm == "llama" else "LlavaMistralForCausalLM"],
        "model_type": "llava_llama" if llm == "llama" else "llava_mistral",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "hidden_act": "silu",
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "initializer_range": 0.02,
        "max_position_embeddings": text.max_position_embeddings,
        "num_attention_heads": text.num_attention_heads,
        "num_hidden_layers": text.num_hidden_layers,
        "num_key_value_heads": text.num_key_value_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": float(text.rope_parameters["rope_theta"]),
        "tie_word_embeddings": False,
        "torch_dtype": _DTYPE_NAMES[save_dtype],
        "transformers_version": "4.36.2",
        "use_cache": True,
        "vocab_size": text.vocab_size,
        "freeze_mm_mlp_adapter": False,
        "image_aspect_ratio": "pad" if llava_version == "1.5" else "anyres",
        "mm_hidden_size": model.config.vision_config.hidden_size,
        "mm_patch_merge_type": "flat" if llava_version == "1.5" else "spatial_unpad",
        "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": str(clip_path),
        "tokenizer_model_max_length": 2048 if llava_version == "1.5" else 4096,
        "tokenizer_padding_side": "right",
        "tune_mm_mlp_adapter": False,
        "use_mm_proj": True,
    }
    if llm == "mistral":
        config["sliding_window"] = None
    if llava_version == "1.6":
        config.update({
            "image_crop_resolution": 224,
            "image_grid_pinpoints": GRID_PINPOINTS,
            "image_split_resolution": 224,
            "mm_vision_tower_lr": 2e-6,
            "unfreeze_mm_vision_tower": True,
        })
    return config


def write_clip_repo(dest: Path, tower: dict[str, torch.Tensor] | None, seed: int) -> None:
    """A full openai/clip-vit-style repo; its vision half is ``tower`` (or random when None)."""
    dest.mkdir(parents=True, exist_ok=True)
    text = CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=16, projection_dim=64,
                          bos_token_id=0, eos_token_id=2, pad_token_id=1)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision_config().to_dict(),
                        projection_dim=64)
    config.architectures = ["CLIPModel"]
    clip = CLIPModel(config).eval()
    randomize_(clip, seed)
    tensors = {k: v.detach().clone().contiguous() for k, v in clip.state_dict().items()}
    if tower is not None:
        missing = set(k for k in tensors if k.startswith("vision_model.")) ^ set(tower)
        if missing:
            raise KeyError(f"CLIP vision keys differ from the tower's: {sorted(missing)[:5]}")
        tensors.update(tower)
    save_safetensors(dest, tensors, torch.float32, None)
    config.save_pretrained(str(dest))
    config_dict = _t4_config(json.loads((dest / "config.json").read_text()))
    config_dict["torch_dtype"] = "float32"
    config_dict.pop("transformers_version", None)
    _write_json(dest / "config.json", config_dict)
    _write_json(dest / "preprocessor_config.json", clip_preprocessor_config("CLIPImageProcessor"))


def write_original(dest: Path, clip_path: Path, model: torch.nn.Module, llava_version: str,
                   llm: str, *, save_dtype: torch.dtype, max_shard_size: str | None,
                   seed: int) -> None:
    save_safetensors(dest, original_tensors(model, llava_version), save_dtype, max_shard_size)
    _write_json(dest / "config.json", original_config(model, llava_version, llm, clip_path, save_dtype))
    _write_json(dest / "generation_config.json",
                {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "max_length": 4096})
    tower = split_state_dict(model)["tower"]
    # 1.5 loads its tower from the CLIP repo; 1.6 ships a fine-tuned tower, so its CLIP repo differs.
    write_clip_repo(clip_path, tower if llava_version == "1.5" else None, seed + 1000)


def build_checkpoint(
    root: Path,
    *,
    llava_version: str,
    layout: str,
    llm: str = "llama",
    spelling: int = 4,
    save_dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    tokenizer_files: str | None = None,
    seed: int = 0,
    sp_model_path: Path | None = None,
    rope_theta: float | None = None,
    exact_in: str | None = None,
) -> TinyCheckpoint:
    """Write a tiny random checkpoint under ``root`` and return it with its reference.

    ``tokenizer_files`` defaults to "both" for llava-hf and "model" for original (what
    those repos ship). ``sp_model_path`` reuses an already trained tokenizer. ``rope_theta``
    overrides the LLM's RoPE base (llama 1e4, mistral 1e6 by default). ``exact_in`` ("f16" / "q8_0")
    rounds every weight to a value that storage type holds losslessly (see ``make_exact_``).
    The reference tokenizer is what the reference loads from the written files: transformers'
    ``AutoTokenizer`` for llava-hf, transformers 4's slow ``LlamaTokenizer`` for the original layout.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if save_dtype not in _DTYPE_NAMES:
        raise ValueError(f"save_dtype must be one of {list(_DTYPE_NAMES)}, got {save_dtype}")
    llava_hf = layout == "llava-hf"
    if tokenizer_files is None:
        tokenizer_files = "both" if llava_hf else "model"
    if tokenizer_files not in TOKENIZER_FILES:
        raise ValueError(f"tokenizer_files must be one of {TOKENIZER_FILES}, got {tokenizer_files!r}")
    user_defined = tokenizer_files == "model-user-defined"
    if user_defined:
        sp_model_path = train_tokenizer(root / "sentencepiece-user-defined", (IMAGE_TOKEN,))
    elif sp_model_path is None:
        sp_model_path = train_tokenizer(root / "sentencepiece")
    json_tokenizer = reference_tokenizer(sp_model_path, with_image_token=llava_hf and not user_defined)

    if llava_hf and user_defined:
        # <image> is sentencepiece's own piece 3; no pad token
        model = build_reference(llava_version, llm, vocab_size=SP_VOCAB_SIZE, image_token_id=USER_DEFINED_IMAGE_ID,
                                pad_token_id=0, rope_theta=rope_theta)
    elif llava_hf:
        # <image> = sp vocab, <pad> = sp vocab + 1
        model = build_reference(llava_version, llm, vocab_size=SP_VOCAB_SIZE + 2,
                                image_token_id=SP_VOCAB_SIZE, pad_token_id=SP_VOCAB_SIZE + 1, rope_theta=rope_theta)
    else:
        # No image token in the vocab: the reference marks image positions with <unk>.
        model = build_reference(llava_version, llm, vocab_size=SP_VOCAB_SIZE, image_token_id=0,
                                pad_token_id=0, rope_theta=rope_theta)
    randomize_(model, seed)
    if exact_in is not None:
        make_exact_(model, exact_in)
    if save_dtype != torch.float32:
        if llava_hf or llava_version == "1.6":
            round_trip_(model, save_dtype)
        else:
            # 1.5 original: the tower comes from the float32 CLIP repo, the rest from the checkpoint.
            for name, module in model.model.named_children():
                if name != "vision_tower":
                    round_trip_(module, save_dtype)
            round_trip_(model.lm_head, save_dtype)

    name = (f"{layout}-{llava_version}-{llm}-s{spelling}-{_DTYPE_NAMES[save_dtype]}"
            f"-{max_shard_size or 'single'}-{tokenizer_files}-{seed}" + (f"-rope{rope_theta:g}" if rope_theta else "")
            + (f"-{exact_in}" if exact_in else ""))
    path = root / name
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    clip_path = None
    if llava_hf:
        write_llava_hf(path, model, llava_version, spelling=spelling, save_dtype=save_dtype,
                       max_shard_size=max_shard_size)
    else:
        clip_path = root / f"{name}-clip"
        if clip_path.exists():
            shutil.rmtree(clip_path)
        write_original(path, clip_path, model, llava_version, llm, save_dtype=save_dtype,
                       max_shard_size=max_shard_size, seed=seed)
    write_tokenizer_files(path, json_tokenizer, sp_model_path, files=tokenizer_files, llava_hf=llava_hf,
                          model_max_length=2048 if llava_version == "1.5" else 4096)
    legacy = json.loads((path / "tokenizer_config.json").read_text()).get("legacy")
    tokenizer: Any = (AutoTokenizer.from_pretrained(str(path)) if llava_hf
                      else SlowLlamaTokenizer(sp_model_path, legacy=True if legacy is None else legacy))
    if llava_hf and tokenizer_files == "added-tokens-json":
        # transformers 5 no longer reads added_tokens.json; transformers 4 (which wrote such repos) added them
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in (IMAGE_TOKEN, PAD_TOKEN)])
        assert tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, PAD_TOKEN]) == [SP_VOCAB_SIZE, SP_VOCAB_SIZE + 1]
    return TinyCheckpoint(
        path=path,
        clip_path=clip_path,
        layout=layout,
        llava_version=llava_version,
        llm=llm,
        model=model,
        tokenizer=tokenizer,
        sp_model_path=sp_model_path,
        image_processor=reference_image_processor(llava_version, pad_to_square=not llava_hf),
        image_token_id=(USER_DEFINED_IMAGE_ID if user_defined else SP_VOCAB_SIZE) if llava_hf else None,
    )


# ---------------------------------------------------------------- the LLaVA family's other LLMs
#
# llava-hf checkpoints whose LLM is Llama 3 (a byte-level BPE tokenizer.json, no tokenizer.model) or
# Phi-3 (Phi3ForCausalLM: fused qkv_proj / gate_up_proj, SentencePiece with added chat tokens) or Qwen2
# (llava-interleave / onevision's LLM: q/k/v biases, byte-level BPE with digits one at a time, ChatML), each
# with its chat templates (the processor's in chat_template.json, the tokenizer's in tokenizer_config.json)
# and a generation_config.json listing every end-of-turn id. A Mistral LLaVA 1.5 (BakLLaVA) is
# ``build_checkpoint(root, llava_version="1.5", layout="llava-hf", llm="mistral")``.

FAMILIES = ("llama3", "phi3", "qwen2")
BPE_VOCAB_SIZE = 640  # trained byte-level pieces (256 bytes + merges), before the added tokens
# Llama 3's pre-tokenizer split, as its tokenizer.json spells it: digits in groups of 1-3
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
LLAMA3_USER_DEFINED = "<|note|>"  # a non-special added token: llama.cpp's USER_DEFINED
# Meta-Llama-3-8B-Instruct's tokenizer chat template
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# llava-hf/llama3-llava-next-8b-hf's processor chat template (images first, then text)
LLAMA3_PROCESSOR_TEMPLATE = (
    "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + '<|eot_id|>' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
# Phi-3's added tokens in their order from id 32000 (here from SP_VOCAB_SIZE), and whether the tokenizer
# strips the whitespace after each (Phi-3-mini's tokenizer_config.json)
PHI3_ADDED = (
    ("<|endoftext|>", False), ("<|assistant|>", True), ("<|placeholder1|>", True), ("<|placeholder2|>", True),
    ("<|placeholder3|>", True), ("<|placeholder4|>", True), ("<|system|>", True), ("<|end|>", True),
    ("<|placeholder5|>", True), ("<|placeholder6|>", True), ("<|user|>", True),
)
PHI3_VOCAB_SIZE = SP_VOCAB_SIZE + len(PHI3_ADDED) + 1 + 4  # + <image>, then unused rows (Phi-3: 32064)
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
PHI3_PROCESSOR_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' }}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<image>\n' }}{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{{ '<|end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}"
    "{% endif %}"
)


# Qwen2's pre-tokenizer split (Qwen2Tokenizer's PRETOKENIZE_REGEX): digits one at a time
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 151643-151645 in Qwen2
# Qwen2-Instruct's tokenizer chat template (ChatML with a default system prompt)
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# llava-hf's llava-onevision-qwen2 / llava-interleave-qwen processor chat template (images, then videos, then
# the text; transformers' own LlavaOnevisionProcessor tests use it)
QWEN2_PROCESSOR_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN2_BIAS_STD = 0.5  # q/k/v biases: Qwen2's are large (its RoPE'd keys carry them), default init draws 0.02


@dataclass(frozen=True)
class ByteLevelTokenizer:
    """A trained byte-level BPE tokenizer.json (Llama-3's or Qwen2's) and the ids of its added tokens."""

    path: Path  # tokenizer.json
    ids: dict[str, int]  # added token -> id (LLAMA3_SPECIAL, LLAMA3_USER_DEFINED, <image>, <pad>; or QWEN2_SPECIAL, <image>)
    split: str = LLAMA3_SPLIT  # its pre-tokenizer's split regex

    @property
    def vocab_size(self) -> int:
        return max(self.ids.values()) + 1


def train_byte_level_bpe(root: Path, split: str = LLAMA3_SPLIT, vocab_size: int = BPE_VOCAB_SIZE) -> ByteLevelTokenizer:
    """Train a Llama-3-style byte-level BPE tokenizer (``split`` then ByteLevel, ignore_merges, BOS added by
    the post-processor) on `training_text`, with Llama 3's special tokens, a user-defined token, ``<image>``
    and ``<pad>`` after the trained pieces."""
    from tokenizers import AddedToken as TkAddedToken
    from tokenizers import processors

    tok = _trained_byte_level(root, split, vocab_size, ignore_merges=True)
    tok.add_special_tokens([TkAddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIAL])
    tok.add_tokens([TkAddedToken(LLAMA3_USER_DEFINED, special=False, normalized=False)])
    tok.add_special_tokens([TkAddedToken(t, special=True, normalized=False) for t in (IMAGE_TOKEN, PAD_TOKEN)])
    ids = {t: tok.token_to_id(t) for t in (*LLAMA3_SPECIAL, LLAMA3_USER_DEFINED, IMAGE_TOKEN, PAD_TOKEN)}
    bos = LLAMA3_SPECIAL[0]
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1",
                                      special_tokens=[(bos, ids[bos])]),
    ])
    path = root / "tokenizer.json"
    tok.save(str(path))
    return ByteLevelTokenizer(path, ids, split)


def _trained_byte_level(root: Path, split: str, vocab_size: int, *, ignore_merges: bool, nfc: bool = False) -> Any:
    """A tokenizers.Tokenizer: (NFC, then) ``split``, then ByteLevel, its BPE trained on `training_text`."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    root.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(training_text(), trainer)
    return tok


def train_qwen2_bpe(root: Path, vocab_size: int = BPE_VOCAB_SIZE) -> ByteLevelTokenizer:
    """Train a Qwen2-style byte-level BPE tokenizer (NFC, `QWEN2_SPLIT` then ByteLevel, merges always applied,
    no BOS: a ByteLevel post-processor only), with Qwen2's special tokens then ``<image>`` after the pieces."""
    from tokenizers import AddedToken as TkAddedToken
    from tokenizers import processors

    tok = _trained_byte_level(root, QWEN2_SPLIT, vocab_size, ignore_merges=False, nfc=True)
    tok.add_special_tokens([TkAddedToken(t, special=True, normalized=False) for t in (*QWEN2_SPECIAL, IMAGE_TOKEN)])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    path = root / "tokenizer.json"
    tok.save(str(path))
    return ByteLevelTokenizer(path, {t: tok.token_to_id(t) for t in (*QWEN2_SPECIAL, IMAGE_TOKEN)}, QWEN2_SPLIT)


def write_qwen2_tokenizer(dest: Path, bpe: ByteLevelTokenizer) -> None:
    """tokenizer.json, tokenizer_config.json (Qwen2-Instruct's: no BOS, ``<|im_end|>`` ends, ChatML template)
    and special_tokens_map.json, as llava-hf's Qwen2 LLaVAs ship them."""
    shutil.copyfile(bpe.path, dest / "tokenizer.json")
    decoder = {str(i): _decoder_entry(t) for t, i in sorted(bpe.ids.items(), key=lambda kv: kv[1])}
    _write_json(dest / "tokenizer_config.json", {
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": QWEN2_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "processor_class": "LlavaProcessor",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    })
    _write_json(dest / "special_tokens_map.json", {
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>"})


def _decoder_entry(content: str, *, special: bool = True, rstrip: bool = False) -> dict[str, Any]:
    return {**_added_token(content), "special": special, "rstrip": rstrip}


def write_llama3_tokenizer(dest: Path, bpe: ByteLevelTokenizer) -> None:
    """tokenizer.json, tokenizer_config.json (Llama 3's chat template) and special_tokens_map.json."""
    shutil.copyfile(bpe.path, dest / "tokenizer.json")
    decoder = {str(i): _decoder_entry(t, special=t != LLAMA3_USER_DEFINED)
               for t, i in sorted(bpe.ids.items(), key=lambda kv: kv[1])}
    _write_json(dest / "tokenizer_config.json", {
        "added_tokens_decoder": decoder,
        "bos_token": "<|begin_of_text|>",
        "chat_template": LLAMA3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": True,
        "eos_token": "<|end_of_text|>",
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 8192,
        "pad_token": PAD_TOKEN,
        "padding_side": "left",
        "processor_class": "LlavaProcessor",
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
    _write_json(dest / "special_tokens_map.json", {
        "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": PAD_TOKEN})


def phi3_reference_tokenizer(sp_model_path: Path) -> TokenizersBackend:
    """The SentencePiece tokenizer with Phi-3's added tokens (then ``<image>``) after its pieces."""
    tok = reference_tokenizer(sp_model_path, with_image_token=False)
    tok.add_tokens([AddedToken(t, special=True, normalized=False, rstrip=rstrip) for t, rstrip in PHI3_ADDED],
                   special_tokens=True)
    tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    assert tok.convert_tokens_to_ids([PHI3_ADDED[0][0], IMAGE_TOKEN]) == [SP_VOCAB_SIZE, SP_VOCAB_SIZE + len(PHI3_ADDED)]
    return tok


def write_phi3_tokenizer(dest: Path, tokenizer: TokenizersBackend, sp_model_path: Path) -> None:
    """tokenizer.model, tokenizer.json (Hub form: "</s>" and the chat tokens strip the whitespace after them),
    tokenizer_config.json (Phi-3's chat template) and special_tokens_map.json."""
    shutil.copyfile(sp_model_path, dest / "tokenizer.model")
    data = llama_tokenizer_json(tokenizer)
    rstrip = {t: r for t, r in PHI3_ADDED} | {"</s>": True}
    for added in data["added_tokens"]:
        added["rstrip"] = rstrip.get(added["content"], False)
    _write_json(dest / "tokenizer.json", data)
    decoder = {str(t["id"]): _decoder_entry(t["content"], rstrip=t["rstrip"]) for t in data["added_tokens"]}
    _write_json(dest / "tokenizer_config.json", {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "bos_token": "<s>",
        "chat_template": PHI3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "legacy": False,
        "model_max_length": 4096,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "processor_class": "LlavaProcessor",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
    })
    _write_json(dest / "special_tokens_map.json", {
        "bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>"})


def family_text_config(family: str, vocab_size: int, *, bos: int | None, eos: int, pad: int,
                       partial_rotary_factor: float = 1.0, longrope: bool = False,
                       tie_word_embeddings: bool = False) -> LlamaConfig | Phi3Config | Qwen2Config:
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie_word_embeddings,
                  bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    if family == "qwen2":
        # Qwen2-0.5B's shape of config: RoPE base 1e6, a sliding window it does not use (written to config.json
        # by `_unused_sliding_window`: Qwen2Config drops it when use_sliding_window is false)
        return Qwen2Config(rms_norm_eps=1e-6, max_position_embeddings=32768, use_sliding_window=False,
                           max_window_layers=2, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                           **common)
    if family == "llama3":
        return LlamaConfig(rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192, **common)
    if family == "phi3":
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": 10000.0,
                                "partial_rotary_factor": partial_rotary_factor}
        if longrope:
            # Phi-3-mini-128k: longrope factors over 32x the 4096 trained positions, no sliding window
            pairs = int(64 // 4 * partial_rotary_factor) // 2
            gen = torch.Generator().manual_seed(7)
            rope.update(rope_type="longrope",
                        long_factor=(1 + 3 * torch.rand(pairs, generator=gen)).tolist(),
                        short_factor=(1 + 0.5 * torch.rand(pairs, generator=gen)).tolist())
            return Phi3Config(rms_norm_eps=1e-5, max_position_embeddings=131072, original_max_position_embeddings=4096,
                              sliding_window=None, rope_parameters=rope, **common)
        # Phi-3-mini-4k: a 2047-position sliding window, RoPE trained at 4096 positions
        return Phi3Config(rms_norm_eps=1e-5, max_position_embeddings=4096, original_max_position_embeddings=4096,
                          sliding_window=2047, rope_parameters=rope, **common)
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def build_family_checkpoint(
    root: Path,
    *,
    family: str,
    llava_version: str = "1.5",
    spelling: int = 4,
    seed: int = 0,
    sp_model_path: Path | None = None,
    bpe: ByteLevelTokenizer | None = None,
    partial_rotary_factor: float = 1.0,
    longrope: bool = False,
    tie_word_embeddings: bool = False,
    vision: PretrainedConfig | None = None,
    vision_feature_select_strategy: str = "default",
    vision_feature_layer: int = -2,
) -> TinyCheckpoint:
    """A tiny random llava-hf checkpoint whose LLM is ``family`` ("llama3": Llama 3 with a byte-level BPE
    tokenizer.json; "phi3": Phi-3 with SentencePiece plus its chat tokens; "qwen2": Qwen2 with q/k/v biases,
    a Qwen2 byte-level BPE and llava-onevision's ChatML template), LLaVA 1.5 or 1.6 (NeXT).
    ``AutoProcessor.from_pretrained(path)`` loads it (its chat template in chat_template.json).
    ``sp_model_path`` / ``bpe`` reuse trained tokenizers (a ``bpe`` of another split is not used for qwen2);
    ``partial_rotary_factor`` and ``longrope`` (Phi-3-128k's RoPE scaling) shape Phi-3's RoPE;
    ``tie_word_embeddings`` ties the LLM's output to its embedding (Qwen2-0.5B's), then no lm_head is written.
    ``vision`` is the tower's config (default: the tiny CLIP of `vision_config`); the image positions per image
    follow from its image and patch sizes and ``vision_feature_select_strategy``; a SigLIP ``vision`` gets
    SigLIP's processor files (``SiglipImageProcessor``: a resize to its size, mean and std 0.5), as
    llava-hf/llava-interleave-qwen-*-hf ship them (there: ``vision_feature_layer=-1``, ``"full"``)."""
    if family == "qwen2":
        bpe = bpe if bpe is not None and bpe.split == QWEN2_SPLIT else train_qwen2_bpe(root / "qwen2-bpe")
        ids = bpe.ids
        image_id = ids[IMAGE_TOKEN]
        vocab_size = -(-bpe.vocab_size // 32) * 32 + 32  # rows past the tokens, as Qwen2's 151936 for 151646
        bos, eos, pad = None, ids["<|endoftext|>"], ids["<|endoftext|>"]
        generation = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
                      "pad_token_id": pad}
        processor_template, tokenizer_path = QWEN2_PROCESSOR_TEMPLATE, bpe.path
    elif family == "llama3":
        bpe = bpe or train_byte_level_bpe(root / "byte-level-bpe")
        ids = bpe.ids
        image_id, vocab_size = ids[IMAGE_TOKEN], bpe.vocab_size
        bos, eos, pad = ids["<|begin_of_text|>"], ids["<|end_of_text|>"], ids[PAD_TOKEN]
        generation = {"bos_token_id": bos, "eos_token_id": [eos, ids["<|eot_id|>"]], "pad_token_id": pad}
        processor_template, tokenizer_path = LLAMA3_PROCESSOR_TEMPLATE, bpe.path
    elif family == "phi3":
        sp_model_path = sp_model_path or train_tokenizer(root / "sentencepiece")
        phi3 = phi3_reference_tokenizer(sp_model_path)
        image_id, vocab_size = SP_VOCAB_SIZE + len(PHI3_ADDED), PHI3_VOCAB_SIZE
        added = {t: SP_VOCAB_SIZE + i for i, (t, _) in enumerate(PHI3_ADDED)}
        bos, eos, pad = 1, added["<|endoftext|>"], added["<|endoftext|>"]
        generation = {"bos_token_id": bos, "eos_token_id": [eos, added["<|assistant|>"], added["<|end|>"]],
                      "pad_token_id": pad}
        processor_template, tokenizer_path = PHI3_PROCESSOR_TEMPLATE, sp_model_path
    else:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")

    text = family_text_config(family, vocab_size, bos=bos, eos=eos, pad=pad,
                              partial_rotary_factor=partial_rotary_factor, longrope=longrope,
                              tie_word_embeddings=tie_word_embeddings)
    vision = vision if vision is not None else vision_config()
    patches = (vision.image_size // vision.patch_size) ** 2
    common = dict(
        vision_config=vision, text_config=text, image_token_index=image_id,
        vision_feature_layer=vision_feature_layer, vision_feature_select_strategy=vision_feature_select_strategy,
        projector_hidden_act="gelu", tie_word_embeddings=tie_word_embeddings,
        image_seq_length=patches,
    )
    if llava_version == "1.5":
        model: torch.nn.Module = LlavaForConditionalGeneration(LlavaConfig(**common))
    elif llava_version == "1.6":
        model = LlavaNextForConditionalGeneration(LlavaNextConfig(image_grid_pinpoints=GRID_PINPOINTS, **common))
    else:
        raise ValueError(f"llava_version must be one of {VERSIONS}, got {llava_version!r}")
    model = model.float().eval()
    randomize_(model, seed)
    if family == "qwen2":
        _redraw_attention_biases_(model, seed, QWEN2_BIAS_STD)
        model.generation_config = GenerationConfig(**generation)  # the reference stops where the files say
    if tie_word_embeddings:
        assert model.lm_head.weight is model.model.language_model.embed_tokens.weight

    name = f"llava-hf-{llava_version}-{family}-s{spelling}-{seed}" + (
        f"-rot{partial_rotary_factor:g}" if partial_rotary_factor != 1.0 else "") + ("-longrope" if longrope else "") + (
        "-tied" if tie_word_embeddings else "")
    path = root / name
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    write_llava_hf(path, model, llava_version, spelling=spelling, save_dtype=torch.float32, max_shard_size=None,
                   generation_config=generation)
    if tie_word_embeddings:  # save_pretrained leaves the tied output out of the files
        _drop_tensors(path, ("language_model.lm_head.", "lm_head."))
    if family == "qwen2":
        _unused_sliding_window(path / "config.json")
        write_qwen2_tokenizer(path, bpe)  # type: ignore[arg-type]
    elif family == "llama3":
        write_llama3_tokenizer(path, bpe)  # type: ignore[arg-type]
    else:
        write_phi3_tokenizer(path, phi3, sp_model_path)  # type: ignore[arg-type]
    _write_json(path / "chat_template.json", {"chat_template": processor_template})
    image_processor = reference_image_processor(llava_version, pad_to_square=False)
    if getattr(vision, "model_type", "") == "siglip_vision_model":
        image_processor = _siglip_processor_files(path, vision, llava_version, vision_feature_select_strategy)
    return TinyCheckpoint(
        path=path, clip_path=None, layout="llava-hf", llava_version=llava_version, llm=family, model=model,
        tokenizer=AutoTokenizer.from_pretrained(str(path)), sp_model_path=tokenizer_path,
        image_processor=image_processor, image_token_id=image_id,
    )


def _siglip_processor_files(path: Path, vision: PretrainedConfig, llava_version: str, strategy: str) -> Any:
    """SigLIP's preprocessor and processor configs in place of CLIP's; the reference image processor."""
    from siglip_checkpoints import siglip_image_processor, siglip_preprocessor_config

    if llava_version != "1.5":
        raise ValueError("a SigLIP tower is built for LLaVA 1.5's layout (llava-interleave); OneVision has its own")
    _write_json(path / "preprocessor_config.json", siglip_preprocessor_config(vision.image_size))
    _write_json(path / "processor_config.json", {
        "image_token": IMAGE_TOKEN, "num_additional_image_tokens": 0, "patch_size": vision.patch_size,
        "processor_class": "LlavaProcessor", "vision_feature_select_strategy": strategy,
    })
    return siglip_image_processor(vision.image_size)


@torch.no_grad()
def _redraw_attention_biases_(model: torch.nn.Module, seed: int, std: float) -> None:
    """The LLM's q/k/v projection biases drawn from N(0, std), so that a dropped or misplaced bias shows."""
    gen = torch.Generator().manual_seed(seed + 17)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if "language_model" in name and "self_attn" in name and name.endswith("_proj.bias"):
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def _drop_tensors(path: Path, prefixes: tuple[str, ...]) -> None:
    """Rewrite the single-file checkpoint without the tensors whose names start with ``prefixes``."""
    from safetensors.torch import load_file

    file = path / "model.safetensors"
    tensors = {k: v for k, v in load_file(str(file)).items() if not k.startswith(prefixes)}
    save_file(tensors, str(file), metadata={"format": "pt"})


def _unused_sliding_window(config_path: Path) -> None:
    """Qwen2-0.5B's config.json form: a sliding window that ``use_sliding_window: false`` turns off."""
    config = json.loads(config_path.read_text())
    config["text_config"].update(sliding_window=4096, use_sliding_window=False, max_window_layers=2)
    config["text_config"].pop("layer_types", None)
    _write_json(config_path, config)
