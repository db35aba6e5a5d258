"""The LLaVA family's other LLMs (issue 20), converted and compared with transformers: Llama 3 (byte-level
BPE) in LLaVA 1.5 and LLaVA-NeXT, Phi-3 (llama.cpp's phi3 architecture) and BakLLaVA's Mistral in llava-hf's
LLaVA 1.5 layout."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from checkpoints import (
    IMAGE_TOKEN,
    LLAMA3_CHAT_TEMPLATE,
    LLAMA3_PROCESSOR_TEMPLATE,
    PHI3_PROCESSOR_TEMPLATE,
    TinyCheckpoint,
    build_checkpoint,
    build_family_checkpoint,
    train_byte_level_bpe,
)
from llama_utils import load_llama, text_logits

from llava_gguf.convert import ConvertOptions, MmprojType, Quant, convert_checkpoint
from llava_gguf.convert.checkpoint import read_chat_template, read_checkpoint
from llava_gguf.errors import CheckpointError
from llava_gguf.llm.llama import LlamaOptions, LlamaRuntime
from llava_gguf.llm.repack import RepackPolicy
from llava_gguf.llm.templates import Template
from llava_gguf.metadata import GGUFFields, LlavaKeys

CASES = [
    pytest.param(("llama3", "1.5", 1.0), id="llama3-1.5"),
    pytest.param(("llama3", "1.6", 1.0), id="llama3-next"),
    pytest.param(("phi3", "1.5", 1.0), id="phi3-1.5"),
    pytest.param(("phi3", "1.6", 0.5), id="phi3-next-partial-rotary"),
    pytest.param(("phi3", "1.5", "longrope"), id="phi3-1.5-longrope"),
]

COMMON_TEXTS = [
    "Hello world, what is in this image?",
    "café naïve résumé über Москва 日本語 東京 😀🚀👍 — …",
    "12345678 and 3.14159, or 007 and 1000000",
    "  leading spaces,\ttabs and\n\nnewlines   trailing  ",
    "line one\r\nline two\n\n\n   \n",
    "don't I'll we've THEY'RE",
]
SPECIAL_TEXTS = {
    "llama3": [
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is this?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|begin_of_text|>text<|end_of_text|> <|note|> user-defined<|note|>x",
        "<image><image>\n12345<|eot_id|>",
    ],
    "phi3": [
        "<|user|>\nWhat is this?<|end|>\n<|assistant|>\n",
        "<|system|>\nBe brief.<|end|>\n<|user|>\n  two spaces<|end|>\n<|endoftext|> after",
        "<|user|>\n<image>What?<|end|>\n<|assistant|>\nIt is a cat.<|end|>\n",
    ],
}


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory, sp_model: Path) -> Callable[..., tuple[TinyCheckpoint, Path]]:
    """Factory: ``family(kind, llava_version, partial_rotary_factor or "longrope", quant)`` -> (checkpoint, LLM GGUF)."""
    checkpoints: dict[tuple, TinyCheckpoint] = {}
    converted: dict[tuple, Path] = {}
    bpe = train_byte_level_bpe(tmp_path_factory.mktemp("byte-level-bpe"))

    def make(kind: str, version: str = "1.5", rotary: float = 1.0,
             quant: Quant = Quant.F32) -> tuple[TinyCheckpoint, Path]:
        key = (kind, version, rotary)
        if key not in checkpoints:
            longrope = rotary == "longrope"
            checkpoints[key] = build_family_checkpoint(
                tmp_path_factory.mktemp(f"{kind}-{version}"), family=kind, llava_version=version,
                sp_model_path=sp_model, bpe=bpe, partial_rotary_factor=1.0 if longrope else rotary, longrope=longrope)
        if (*key, quant) not in converted:
            out = tmp_path_factory.mktemp(f"gguf-{kind}-{version}-{quant.value}")
            result = convert_checkpoint(checkpoints[key].path, out, ConvertOptions(quant=quant, mmproj_type=MmprojType.F32))
            converted[(*key, quant)] = result.llm
        return checkpoints[key], converted[(*key, quant)]

    return make


def _fields(path: Path) -> GGUFFields:
    return GGUFFields(gguf.GGUFReader(path))


@pytest.mark.parametrize("case", CASES)
def test_gguf_carries_the_family(family, case) -> None:
    kind, version, rotary = case
    ckpt, llm = family(kind, version, rotary)
    text = ckpt.model.config.text_config
    fields = _fields(llm)
    arch = "phi3" if kind == "phi3" else "llama"
    assert fields.get(gguf.Keys.General.ARCHITECTURE) == arch
    assert fields.get(gguf.Keys.LLM.EMBEDDING_LENGTH.format(arch=arch)) == text.hidden_size
    assert fields.get(gguf.Keys.LLM.FEED_FORWARD_LENGTH.format(arch=arch)) == text.intermediate_size
    assert fields.get(gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=arch)) == text.num_key_value_heads
    assert fields.get(gguf.Keys.Rope.FREQ_BASE.format(arch=arch)) == pytest.approx(text.rope_parameters["rope_theta"])
    head_dim = text.hidden_size // text.num_attention_heads
    rotated = int(head_dim * text.rope_parameters.get("partial_rotary_factor", 1.0))
    assert fields.get(gguf.Keys.Rope.DIMENSION_COUNT.format(arch=arch)) == rotated
    assert len(fields.get(gguf.Keys.Tokenizer.LIST)) == text.vocab_size
    assert fields.get(LlavaKeys.TEMPLATE) == Template.CHECKPOINT.value
    assert fields.get(LlavaKeys.IMAGE_TOKEN_ID) == ckpt.image_token_id
    assert fields.get(gguf.Keys.Tokenizer.LIST)[ckpt.image_token_id] == IMAGE_TOKEN
    generation = json.loads((ckpt.path / "generation_config.json").read_text())
    assert list(fields.get(LlavaKeys.EOS_TOKEN_IDS)) == generation["eos_token_id"]
    tokens = fields.get(gguf.Keys.Tokenizer.LIST)
    eot = fields.get(gguf.Keys.Tokenizer.EOT_ID)
    types = fields.get(gguf.Keys.Tokenizer.TOKEN_TYPE)
    if kind == "llama3":
        # the processor's template (chat_template.json) wins over the tokenizer's
        assert fields.get(gguf.Keys.Tokenizer.CHAT_TEMPLATE) == LLAMA3_PROCESSOR_TEMPLATE
        assert (fields.get(gguf.Keys.Tokenizer.MODEL), fields.get(gguf.Keys.Tokenizer.PRE)) == ("gpt2", "llama-bpe")
        assert [tokens[i] for i in fields.get(LlavaKeys.EOS_TOKEN_IDS)] == ["<|end_of_text|>", "<|eot_id|>"]
        assert tokens[eot] == "<|eot_id|>"
        assert fields.get(gguf.Keys.Tokenizer.ADD_BOS) is True
        assert len(fields.get(gguf.Keys.Tokenizer.MERGES)) > 0
        vocab = ckpt.tokenizer.get_vocab()
        assert types[vocab["<|eot_id|>"]] == gguf.TokenType.CONTROL
        assert types[vocab["<|note|>"]] == gguf.TokenType.USER_DEFINED
        assert types[vocab["Ġthe"]] == gguf.TokenType.NORMAL
    else:
        assert fields.get(gguf.Keys.Tokenizer.CHAT_TEMPLATE) == PHI3_PROCESSOR_TEMPLATE
        assert fields.get(gguf.Keys.Tokenizer.MODEL) == "llama"
        assert [tokens[i] for i in fields.get(LlavaKeys.EOS_TOKEN_IDS)] == ["<|endoftext|>", "<|assistant|>", "<|end|>"]
        assert tokens[eot] == "<|end|>"
        assert fields.get(gguf.Keys.LLM.CONTEXT_LENGTH.format(arch=arch)) == (
            text.sliding_window or text.max_position_embeddings)
        assert fields.get(gguf.Keys.Rope.SCALING_ORIG_CTX_LEN.format(arch=arch)) == text.original_max_position_embeddings
        reader = gguf.GGUFReader(llm)
        factors = {t.name: np.array(t.data) for t in reader.tensors if t.name.startswith("rope_factors")}
        if rotary == "longrope":
            assert np.array_equal(factors["rope_factors_long.weight"], np.float32(text.rope_parameters["long_factor"]))
            assert np.array_equal(factors["rope_factors_short.weight"], np.float32(text.rope_parameters["short_factor"]))
            scale = text.max_position_embeddings / text.original_max_position_embeddings
            assert fields.get(gguf.Keys.Rope.SCALING_ATTN_FACTOR.format(arch=arch)) == pytest.approx(
                (1 + np.log(scale) / np.log(text.original_max_position_embeddings)) ** 0.5)
        else:
            assert not factors
        for token in ("<|user|>", "<|end|>", "<|endoftext|>", IMAGE_TOKEN):
            assert types[tokens.index(token)] == gguf.TokenType.CONTROL, token
        names = {t.name for t in gguf.GGUFReader(llm).tensors}
        assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight"} <= names and "blk.0.attn_q.weight" not in names


@pytest.mark.parametrize("case", CASES[:3])
def test_tokenization_equals_transformers(family, case) -> None:
    """The runtime's tokenizer (llama.cpp's vocabulary, with the reference's whitespace rules around special
    tokens, Phi-3's included) gives transformers' ids."""
    kind, version, rotary = case
    ckpt, path = family(kind, version, rotary)
    runtime = LlamaRuntime(path, LlamaOptions(n_threads=1, repack=RepackPolicy.OFF))
    try:
        add_bos = bool(_fields(path).get(gguf.Keys.Tokenizer.ADD_BOS))
        for text in COMMON_TEXTS + SPECIAL_TEXTS[kind]:
            assert runtime.tokenize(text, add_bos=add_bos, special=True) == ckpt.tokenizer(text).input_ids, text
    finally:
        runtime.close()


def test_llama3_groups_digits_by_three(family) -> None:
    ckpt, path = family("llama3")
    llm = load_llama(path)
    pieces = [llm.detokenize([t]).decode() for t in llm.tokenize(b"12345678", add_bos=False, special=True)]
    assert "".join(pieces) == "12345678" and all(len(p) <= 3 for p in pieces) and len(pieces) >= 3
    assert pieces == ckpt.tokenizer.convert_ids_to_tokens(ckpt.tokenizer("12345678", add_special_tokens=False).input_ids)


@pytest.mark.parametrize("case", CASES)
def test_text_logits_equal_transformers(family, case) -> None:
    kind, version, rotary = case
    ckpt, path = family(kind, version, rotary)
    llm = load_llama(path)
    text = COMMON_TEXTS[1] + " " + SPECIAL_TEXTS[kind][0] + COMMON_TEXTS[2]
    ids = ckpt.tokenizer(text).input_ids
    ids = [i for i in ids if i != ckpt.image_token_id]  # text only: the full model needs no pixels
    ours = text_logits(llm, ids)
    with torch.no_grad():
        reference = ckpt.model(input_ids=torch.tensor([ids])).logits[0].numpy()
    scale = float(np.abs(reference).max())
    assert scale > 1.0
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-3 * scale)
    assert (ours.argmax(-1) == reference.argmax(-1)).mean() > 0.95


@pytest.mark.parametrize("kind", ["llama3", "phi3"])
def test_q4_k_m_conversion_loads(family, kind) -> None:
    ckpt, path = family(kind, quant=Quant.Q4_K_M)
    fields = _fields(path)
    assert fields.get(LlavaKeys.TEMPLATE) == Template.CHECKPOINT.value
    llm = load_llama(path)
    ids = ckpt.tokenizer(SPECIAL_TEXTS[kind][0]).input_ids
    logits = text_logits(llm, ids)
    assert np.isfinite(logits).all()


def test_unknown_bpe_split_is_refused_in_one_line(family, tmp_path: Path) -> None:
    ckpt, _ = family("llama3")
    copy = tmp_path / "odd-split"
    shutil.copytree(ckpt.path, copy)
    data = json.loads((copy / "tokenizer.json").read_text())
    split = data["pre_tokenizer"]["pretokenizers"][0]
    split["pattern"]["Regex"] = split["pattern"]["Regex"].replace(r"\p{N}{1,3}", r"\p{N}{1,4}")
    (copy / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError) as e:
        convert_checkpoint(copy, tmp_path / "out", ConvertOptions(quant=Quant.F32, mmproj_type=MmprojType.F32))
    message = str(e.value)
    assert "\n" not in message and r"\p{N}{1,4}" in message and "llama-bpe" in message
    assert not list((tmp_path / "out").glob("*.gguf"))


@pytest.mark.parametrize("name", ["tiny-llava", "llava-phi-3-mini-hf"])
def test_phi3_whitespace_as_the_reference_whatever_the_name(family, tmp_path: Path, name: str) -> None:
    """Phi-3's tokenizer strips whitespace after its chat tokens but not after <image>; llama.cpp strips after
    every special token, and only when general.name says phi-3. The runtime applies the reference's rule and
    keeps llama.cpp's off, so the name changes nothing."""
    ckpt, _ = family("phi3")
    copy = tmp_path / name
    shutil.copytree(ckpt.path, copy)
    result = convert_checkpoint(copy, tmp_path / "out", ConvertOptions(quant=Quant.F32, mmproj_type=MmprojType.F32))
    assert _fields(result.llm).get(gguf.Keys.General.NAME) == name
    runtime = LlamaRuntime(result.llm, LlamaOptions(n_threads=1, repack=RepackPolicy.OFF))
    try:
        for text in [*SPECIAL_TEXTS["phi3"], "<|user|>\n<image>\nWhat is it?<|end|>\n<|assistant|>\n"]:
            assert runtime.tokenize(text, add_bos=True, special=True) == ckpt.tokenizer(text).input_ids, text
    finally:
        runtime.close()


def test_checkpoint_template_for_llava_hf(family, tmp_path: Path, sp_model: Path) -> None:
    """llava-hf LLaVA 1.5 with Mistral (BakLLaVA) prompts as llava-hf's 1.5; Mistral 1.6 keeps mistral_instruct."""
    bakllava = build_checkpoint(tmp_path / "bakllava", llava_version="1.5", layout="llava-hf", llm="mistral",
                                sp_model_path=sp_model)
    assert read_checkpoint(bakllava.path).template is Template.LLAVA_HF
    next_mistral = build_checkpoint(tmp_path / "next", llava_version="1.6", layout="llava-hf", llm="mistral",
                                    sp_model_path=sp_model)
    assert read_checkpoint(next_mistral.path).template is Template.MISTRAL_INSTRUCT
    result = convert_checkpoint(bakllava.path, tmp_path / "out", ConvertOptions(quant=Quant.F32, mmproj_type=MmprojType.F32))
    fields = _fields(result.llm)
    assert fields.get(LlavaKeys.TEMPLATE) == Template.LLAVA_HF.value
    assert list(fields.get(LlavaKeys.EOS_TOKEN_IDS)) == [2]


def test_chat_template_sources_in_transformers_order(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "tokenizer"}))
    assert read_chat_template(tmp_path) == "tokenizer"
    (tmp_path / "chat_template.jinja").write_text("jinja")
    assert read_chat_template(tmp_path) == "jinja"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "processor"}))
    assert read_chat_template(tmp_path) == "processor"


def test_builtin_template_without_a_chat_template(family, tmp_path: Path) -> None:
    """No chat template in the files: Llama 3's and Phi-3's built-in templates."""
    for kind, expected in (("llama3", Template.LLAMA3), ("phi3", Template.PHI3)):
        ckpt, _ = family(kind)
        copy = tmp_path / kind
        shutil.copytree(ckpt.path, copy)
        (copy / "chat_template.json").unlink()
        config = json.loads((copy / "tokenizer_config.json").read_text())
        assert config.pop("chat_template") in (LLAMA3_CHAT_TEMPLATE, ckpt.tokenizer.chat_template)
        (copy / "tokenizer_config.json").write_text(json.dumps(config))
        assert read_checkpoint(copy).template is expected


def test_fused_projection_of_the_wrong_size_is_refused(family, tmp_path: Path) -> None:
    ckpt, _ = family("phi3")
    copy = tmp_path / "phi3-mha"
    shutil.copytree(ckpt.path, copy)
    config = json.loads((copy / "config.json").read_text())
    config["text_config"]["num_key_value_heads"] = 4  # the weights hold 2 KV heads
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"qkv_proj.weight has shape \(128, 64\), expected \(192, 64\)"):
        convert_checkpoint(copy, tmp_path / "out", ConvertOptions(quant=Quant.F32, mmproj_type=MmprojType.F32))


@pytest.mark.parametrize(("pre_tokenizer", "ignore_merges", "expected"), [
    ({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}, False, "gpt-2"),
    ({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                                                r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"},
         "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}, False, "qwen2"),
])
def test_known_pre_tokenizers_get_llama_cpp_names(pre_tokenizer: dict, ignore_merges: bool, expected: str) -> None:
    from llava_gguf.convert.vocab import bpe_pre_tokenizer

    data = {"pre_tokenizer": pre_tokenizer, "model": {"type": "BPE", "ignore_merges": ignore_merges}}
    assert bpe_pre_tokenizer(data, Path("tokenizer.json")) == expected


def test_byte_level_with_prefix_space_is_refused() -> None:
    from llava_gguf.convert.vocab import bpe_pre_tokenizer

    data = {"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}, "model": {}}
    with pytest.raises(CheckpointError, match="add_prefix_space"):
        bpe_pre_tokenizer(data, Path("tokenizer.json"))
