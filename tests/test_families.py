"""The LLaVA family's other LLMs (issues 20 and 21), converted and compared with transformers: Llama 3
(byte-level BPE) in LLaVA 1.5 and LLaVA-NeXT, Phi-3 (llama.cpp's phi3 architecture), Qwen2 (llama.cpp's qwen2:
q/k/v biases, NEOX RoPE, Qwen2's byte-level BPE, ChatML; tied or untied embeddings) and BakLLaVA's Mistral in
llava-hf's LLaVA 1.5 layout."""

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
    QWEN2_PROCESSOR_TEMPLATE,
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
    pytest.param(("qwen2", "1.5", 1.0), id="qwen2-1.5"),
    pytest.param(("qwen2", "1.5", "tied"), id="qwen2-1.5-tied"),
]
# one case per tokenizer
TOKENIZER_CASES = [c for c in CASES if c.id in ("llama3-1.5", "llama3-next", "phi3-1.5", "qwen2-1.5")]
ARCHS = {"llama3": "llama", "phi3": "phi3", "qwen2": "qwen2"}

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
    "qwen2": [
        "<|im_start|>user <image>\nWhat is this?<|im_end|><|im_start|>assistant\n",
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n  two spaces 3.5<|im_end|>\n<|endoftext|> after",
        "<image><image>\n12345<|im_end|>x",
    ],
}


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory, sp_model: Path) -> Callable[..., tuple[TinyCheckpoint, Path]]:
    """Factory: ``family(kind, llava_version, variant, quant)`` -> (checkpoint, LLM GGUF); ``variant`` is Phi-3's
    partial_rotary_factor or "longrope", or "tied" (tied embeddings)."""
    checkpoints: dict[tuple, TinyCheckpoint] = {}
    converted: dict[tuple, Path] = {}
    bpe = train_byte_level_bpe(tmp_path_factory.mktemp("byte-level-bpe"))

    def make(kind: str, version: str = "1.5", rotary: float | str = 1.0,
             quant: Quant = Quant.F32) -> tuple[TinyCheckpoint, Path]:
        key = (kind, version, rotary)
        if key not in checkpoints:
            longrope, tied = rotary == "longrope", rotary == "tied"
            checkpoints[key] = build_family_checkpoint(
                tmp_path_factory.mktemp(f"{kind}-{version}"), family=kind, llava_version=version,
                sp_model_path=sp_model, bpe=bpe, partial_rotary_factor=1.0 if longrope or tied else rotary,
                longrope=longrope, tie_word_embeddings=tied)
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
    arch = ARCHS[kind]
    assert fields.get(gguf.Keys.General.ARCHITECTURE) == arch
    assert fields.get(gguf.Keys.LLM.EMBEDDING_LENGTH.format(arch=arch)) == text.hidden_size
    assert fields.get(gguf.Keys.LLM.FEED_FORWARD_LENGTH.format(arch=arch)) == text.intermediate_size
    assert fields.get(gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=arch)) == text.num_key_value_heads
    assert fields.get(gguf.Keys.Rope.FREQ_BASE.format(arch=arch)) == pytest.approx(text.rope_parameters["rope_theta"])
    head_dim = text.hidden_size // text.num_attention_heads
    rotated = int(head_dim * (text.rope_parameters.get("partial_rotary_factor") or 1.0))
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
    elif kind == "qwen2":
        assert fields.get(gguf.Keys.Tokenizer.CHAT_TEMPLATE) == QWEN2_PROCESSOR_TEMPLATE
        assert (fields.get(gguf.Keys.Tokenizer.MODEL), fields.get(gguf.Keys.Tokenizer.PRE)) == ("gpt2", "qwen2")
        assert [tokens[i] for i in fields.get(LlavaKeys.EOS_TOKEN_IDS)] == ["<|im_end|>", "<|endoftext|>"]
        assert tokens[eot] == "<|im_end|>"
        assert not fields.get(gguf.Keys.Tokenizer.ADD_BOS)  # Qwen2 adds no BOS
        assert len(fields.get(gguf.Keys.Tokenizer.MERGES)) > 0
        for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", IMAGE_TOKEN):
            assert types[tokens.index(token)] == gguf.TokenType.CONTROL, token
        # Qwen2-0.5B's sliding_window is in config.json but use_sliding_window is false: the full context
        assert text.use_sliding_window is False
        assert json.loads((ckpt.path / "config.json").read_text())["text_config"]["sliding_window"] == 4096
        assert fields.get(gguf.Keys.LLM.CONTEXT_LENGTH.format(arch=arch)) == text.max_position_embeddings == 32768
        reader = gguf.GGUFReader(llm)
        tensors = {t.name: np.array(t.data) for t in reader.tensors}
        state = ckpt.model.state_dict()
        for i in range(text.num_hidden_layers):
            for proj, short in (("q", "q"), ("k", "k"), ("v", "v")):
                bias = state[f"model.language_model.layers.{i}.self_attn.{proj}_proj.bias"].numpy()
                # NEOX RoPE: q and k (weights and biases) are Hugging Face's rows, unpermuted
                assert np.array_equal(tensors[f"blk.{i}.attn_{short}.bias"], bias)
                assert np.array_equal(tensors[f"blk.{i}.attn_{short}.weight"],
                                      state[f"model.language_model.layers.{i}.self_attn.{proj}_proj.weight"].numpy())
        assert ("output.weight" in tensors) is (rotary != "tied")
        assert text.tie_word_embeddings is (rotary == "tied")
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


@pytest.mark.parametrize("case", TOKENIZER_CASES)
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


def test_qwen2_splits_digits_one_at_a_time(family) -> None:
    ckpt, path = family("qwen2")
    llm = load_llama(path)
    pieces = [llm.detokenize([t]).decode() for t in llm.tokenize(b"12345678 x42", add_bos=False, special=True)]
    assert pieces[:8] == list("12345678")
    assert llm.tokenize(b"12345678 x42", add_bos=False, special=True) == ckpt.tokenizer("12345678 x42").input_ids


def test_qwen2_normalizes_to_nfc_as_its_tokenizer_json(family) -> None:
    """Qwen2's tokenizer.json normalizes to NFC and llama.cpp does not: the GGUF says so and the runtime
    normalizes, so decomposed text (e + U+0301) tokenizes as the reference does."""
    ckpt, path = family("qwen2")
    assert _fields(path).get(LlavaKeys.UNICODE_NORMALIZATION) == "NFC"
    runtime = LlamaRuntime(path, LlamaOptions(n_threads=1, repack=RepackPolicy.OFF))
    try:
        for text in ["cafe\u0301 Ame\u0301lie", "A\u030angstro\u0308m", "<|im_start|>user\nn\u0303<|im_end|>"]:
            assert runtime.tokenize(text, add_bos=False, special=True) == ckpt.tokenizer(text).input_ids, text
    finally:
        runtime.close()


@pytest.mark.parametrize("kind", ["llama3", "phi3", "qwen2"])
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


def test_qwen2_without_a_chat_template_is_refused_in_one_line(family, tmp_path: Path) -> None:
    """LLaVA's conv_templates do not cover Qwen2: its prompts come from the checkpoint's template, or nothing."""
    ckpt, _ = family("qwen2")
    copy = tmp_path / "qwen2-no-template"
    shutil.copytree(ckpt.path, copy)
    (copy / "chat_template.json").unlink()
    config = json.loads((copy / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(copy)
    assert "\n" not in str(e.value) and "qwen2" in str(e.value) and "chat template" in str(e.value)


@pytest.mark.parametrize("spelling", [4, 5])
def test_qwen2_config_parses_as_transformers(tmp_path: Path, spelling: int) -> None:
    """Both spellings (transformers 4's flat rope_theta, 5's rope_parameters), tied or not, as AutoConfig reads
    them; then a text_config of only its model_type gets Qwen2Config's defaults."""
    from transformers import AutoConfig

    for tied in (False, True):
        ckpt = build_family_checkpoint(tmp_path / f"s{spelling}-{tied}", family="qwen2", spelling=spelling,
                                       tie_word_embeddings=tied)
        raw = json.loads((ckpt.path / "config.json").read_text())["text_config"]
        assert ("rope_parameters" in raw) is (spelling == 5) and ("rope_theta" in raw) is (spelling == 4)
        _assert_text_config_as_transformers(ckpt.path, AutoConfig.from_pretrained(str(ckpt.path)))
    config = json.loads((ckpt.path / "config.json").read_text())
    config["text_config"] = {"model_type": "qwen2"}
    (ckpt.path / "config.json").write_text(json.dumps(config))
    _assert_text_config_as_transformers(ckpt.path, AutoConfig.from_pretrained(str(ckpt.path)))
    # a window that use_sliding_window turns on bounds the context, as for Mistral
    config["text_config"] = {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 1024}
    (ckpt.path / "config.json").write_text(json.dumps(config))
    assert read_checkpoint(ckpt.path).text.context_length == 1024


def _assert_text_config_as_transformers(path: Path, reference: object) -> None:
    ref = reference.get_text_config()  # type: ignore[attr-defined]
    ours = read_checkpoint(path).text
    assert ours.family.arch_name == "qwen2"
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "vocab_size"):
        assert getattr(ours, name) == getattr(ref, name), name
    assert ours.rope_theta == ref.rope_parameters["rope_theta"] and ours.rope_scaling is None
    assert ours.tie_word_embeddings is bool(reference.tie_word_embeddings)  # type: ignore[attr-defined]
    assert ours.sliding_window == ref.sliding_window is None
    assert ours.context_length == ref.max_position_embeddings


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
