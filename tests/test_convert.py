"""The converter against transformers: GGUF contents, logits, tokenizer, libmtmd, quant types, bad input."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from checkpoints import TinyCheckpoint
from llama_utils import load_llama, mtmd_loads, text_logits

from llava_gguf.convert import ConvertOptions, ConvertResult, MmprojType, Quant, convert_checkpoint
from llava_gguf.errors import CheckpointError, ConversionError
from llava_gguf.metadata import ClipKeys, GGUFFields, LlavaKeys, VisionSettings

CASES = [
    pytest.param(("1.5", "llava-hf", "llama", {}), id="hf-1.5-llama"),
    pytest.param(("1.5", "llava-hf", "llama", {"spelling": 5}), id="hf5-1.5-llama"),
    pytest.param(("1.6", "llava-hf", "mistral", {}), id="hf-1.6-mistral"),
    pytest.param(("1.6", "llava-hf", "llama", {"tokenizer_files": "json"}), id="hf-1.6-llama-json-tokenizer"),
    pytest.param(("1.5", "original", "llama", {}), id="orig-1.5-llama"),
    pytest.param(("1.6", "original", "mistral", {}), id="orig-1.6-mistral"),
    pytest.param(("1.6", "original", "llama", {"save_dtype": torch.bfloat16, "max_shard_size": "200KB"}),
                 id="orig-1.6-llama-bf16-sharded"),
    pytest.param(("1.5", "llava-hf", "llama", {"save_dtype": torch.float16}), id="hf-1.5-llama-f16"),
]

PROMPTS = [
    "USER: What is shown in this picture? ASSISTANT:",
    "café naïve 日本語 😀 — 12345 6789",
    "  leading spaces,\ttabs and\n\nnewlines   trailing  ",
]


@pytest.fixture(scope="module")
def converted(tiny_checkpoint: Callable[..., TinyCheckpoint], tmp_path_factory: pytest.TempPathFactory):
    cache: dict[str, tuple[TinyCheckpoint, ConvertResult]] = {}

    def make(case: tuple, quant: Quant = Quant.F32, mmproj: MmprojType = MmprojType.F32):
        key = f"{case}-{quant}-{mmproj}"
        if key not in cache:
            version, layout, llm, options = case
            ckpt = tiny_checkpoint(llava_version=version, layout=layout, llm=llm, **options)
            out = tmp_path_factory.mktemp("gguf")
            cache[key] = ckpt, convert_checkpoint(ckpt.path, out, ConvertOptions(quant=quant, mmproj_type=mmproj))
        return cache[key]

    return make


@pytest.mark.parametrize("case", CASES)
def test_gguf_contents(converted, case) -> None:
    ckpt, result = converted(case)
    text = ckpt.model.config.text_config
    vision = ckpt.model.config.vision_config
    llm = gguf.GGUFReader(result.llm)
    fields = GGUFFields(llm)
    assert fields.get(gguf.Keys.General.ARCHITECTURE) == "llama"
    assert fields.get(gguf.Keys.LLM.CONTEXT_LENGTH.format(arch="llama")) == text.max_position_embeddings
    assert fields.get(gguf.Keys.LLM.EMBEDDING_LENGTH.format(arch="llama")) == text.hidden_size
    assert fields.get(gguf.Keys.LLM.BLOCK_COUNT.format(arch="llama")) == text.num_hidden_layers
    assert fields.get(gguf.Keys.LLM.FEED_FORWARD_LENGTH.format(arch="llama")) == text.intermediate_size
    assert fields.get(gguf.Keys.Attention.HEAD_COUNT.format(arch="llama")) == text.num_attention_heads
    assert fields.get(gguf.Keys.Attention.HEAD_COUNT_KV.format(arch="llama")) == text.num_key_value_heads
    assert fields.get(gguf.Keys.Rope.FREQ_BASE.format(arch="llama")) == pytest.approx(text.rope_parameters["rope_theta"])
    assert fields.get(gguf.Keys.Attention.LAYERNORM_RMS_EPS.format(arch="llama")) == pytest.approx(text.rms_norm_eps)
    assert fields.get(gguf.Keys.Tokenizer.MODEL) == "llama"
    assert len(fields.get(gguf.Keys.Tokenizer.LIST)) == text.vocab_size
    assert fields.get(gguf.Keys.Tokenizer.BOS_ID) == 1 and fields.get(gguf.Keys.Tokenizer.EOS_ID) == 2
    if ckpt.image_token_id is not None:
        assert fields.get(LlavaKeys.IMAGE_TOKEN_ID) == ckpt.image_token_id
        assert fields.get(gguf.Keys.Tokenizer.LIST)[ckpt.image_token_id] == "<image>"
    names = {t.name: t for t in llm.tensors}
    head_dim = text.hidden_size // text.num_attention_heads
    assert tuple(names["blk.0.attn_k.weight"].shape) == (text.hidden_size, text.num_key_value_heads * head_dim)
    assert tuple(names["token_embd.weight"].shape) == (text.hidden_size, text.vocab_size)
    assert len(names) == 3 + 9 * text.num_hidden_layers
    assert {t.tensor_type for t in llm.tensors} <= {gguf.GGMLQuantizationType.F32}

    mm = gguf.GGUFReader(result.mmproj)
    mf = GGUFFields(mm)
    assert mf.get(gguf.Keys.General.ARCHITECTURE) == "clip"
    assert mf.get(gguf.Keys.Clip.PROJECTOR_TYPE) == "mlp"
    assert mf.get(gguf.Keys.Clip.HAS_VISION_ENCODER) is True
    assert mf.get(gguf.Keys.ClipVision.USE_GELU) is False
    assert mf.get(gguf.Keys.ClipVision.IMAGE_SIZE) == vision.image_size
    assert mf.get(gguf.Keys.ClipVision.PATCH_SIZE) == vision.patch_size
    assert mf.get(gguf.Keys.ClipVision.EMBEDDING_LENGTH) == vision.hidden_size
    assert mf.get(gguf.Keys.ClipVision.FEED_FORWARD_LENGTH) == vision.intermediate_size
    assert mf.get(gguf.Keys.ClipVision.PROJECTION_DIM) == text.hidden_size
    assert mf.get(gguf.Keys.ClipVision.Attention.HEAD_COUNT) == vision.num_attention_heads
    assert mf.get(gguf.Keys.ClipVision.Attention.LAYERNORM_EPS) == pytest.approx(vision.layer_norm_eps)
    np.testing.assert_allclose(mf.get(gguf.Keys.ClipVision.IMAGE_MEAN), ckpt.image_processor.image_mean, rtol=1e-6)
    np.testing.assert_allclose(mf.get(gguf.Keys.ClipVision.IMAGE_STD), ckpt.image_processor.image_std, rtol=1e-6)
    assert mm.fields[gguf.Keys.ClipVision.IMAGE_MEAN].types[-1] == gguf.GGUFValueType.FLOAT32
    # select layer -2 of 3: hidden_states[2], so exactly 2 blocks are stored and run
    n_run = vision.num_hidden_layers + 1 + ckpt.model.config.vision_feature_layer
    assert mf.get(ClipKeys.FEATURE_LAYER) == [n_run]
    assert mf.get(gguf.Keys.ClipVision.BLOCK_COUNT) == n_run
    mnames = {t.name for t in mm.tensors}
    assert "v.post_ln.weight" not in mnames
    assert {"v.patch_embd.weight", "v.class_embd", "v.position_embd.weight", "v.pre_ln.weight", "mm.0.weight",
            "mm.2.weight", "mm.0.bias", "mm.2.bias"} <= mnames
    assert f"v.blk.{n_run - 1}.ffn_up.weight" in mnames and f"v.blk.{n_run}.ln1.weight" not in mnames
    assert {t.name: tuple(t.shape) for t in mm.tensors}["v.blk.0.ffn_up.weight"] == (vision.hidden_size, vision.intermediate_size)
    settings = VisionSettings.read(mm)
    if ckpt.llava_version == "1.6":
        assert "v.image_newline" in mnames
        pinpoints = mf.get(ClipKeys.IMAGE_GRID_PINPOINTS)
        assert pinpoints == [x for hw in ckpt.model.config.image_grid_pinpoints for x in hw]
        assert mm.fields[ClipKeys.IMAGE_GRID_PINPOINTS].types[-1] == gguf.GGUFValueType.INT32
        assert mf.get(ClipKeys.MM_PATCH_MERGE_TYPE) == "spatial_unpad"
        assert settings.image_mode.value == "anyres"
    else:
        assert "v.image_newline" not in mnames
        assert settings.image_mode.value == ("pad" if ckpt.layout == "original" else "crop")
    assert settings.vision_feature_layer == ckpt.model.config.vision_feature_layer


def _stored_tower_matches(ckpt: TinyCheckpoint, result: ConvertResult) -> bool:
    mm = gguf.GGUFReader(result.mmproj)
    stored = {t.name: np.asarray(t.data) for t in mm.tensors}["v.blk.0.attn_q.weight"]
    tower = ckpt.model.model.vision_tower
    reference = getattr(tower, "vision_model", tower).encoder.layers[0].self_attn.q_proj.weight
    return np.allclose(stored, reference.detach().numpy(), atol=1e-6)


@pytest.mark.parametrize("case", [CASES[4], CASES[5]])
def test_original_tower_source(converted, case) -> None:
    """LLaVA 1.5 takes its tower from the CLIP repo; LLaVA 1.6 from its own checkpoint."""
    ckpt, result = converted(case)
    assert _stored_tower_matches(ckpt, result)


@pytest.mark.parametrize("case", CASES)
def test_llm_logits_match_transformers(converted, case) -> None:
    ckpt, result = converted(case)
    llm = load_llama(result.llm)
    for prompt in PROMPTS:
        ids = ckpt.tokenizer(prompt).input_ids
        ours = text_logits(llm, ids)
        with torch.no_grad():
            ref = ckpt.model(input_ids=torch.tensor([ids])).logits[0].numpy()
        assert np.abs(ours - ref).max() <= 1e-3, prompt
        assert (ours.argmax(-1) == ref.argmax(-1)).all()


TOKENIZER_STRINGS = [
    "Hello world",
    "café naïve résumé über Москва 日本語 東京 😀🚀👍",
    "digits 0 1 12 123 1234567890 3.14159",
    "   spaces   runs\t\ttabs\n\n\nnewlines  ",
    "<image>\nWhat is in this image?",
    "USER: <image>\nDescribe. ASSISTANT:",
    "unseen ☃ ∑ ζ characters",
    "",
]


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[4], CASES[5]])
def test_tokenizer_matches(converted, case) -> None:
    ckpt, result = converted(case)
    llm = load_llama(result.llm, logits_all=False)
    for text in TOKENIZER_STRINGS:
        ref = ckpt.tokenizer(text).input_ids
        ours = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        assert ours == ref, text


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[5]])
def test_mmproj_loads_in_libmtmd(converted, case) -> None:
    for kind in (MmprojType.F32, MmprojType.F16, MmprojType.Q8_0):
        ckpt, result = converted(case, quant=Quant.F32, mmproj=kind)
        llm = load_llama(result.llm, logits_all=False)
        assert mtmd_loads(result.mmproj, llm), kind


@pytest.mark.parametrize("quant", list(Quant))
def test_every_quant_loads_and_generates(converted, quant: Quant) -> None:
    ckpt, result = converted(CASES[0].values[0], quant=quant, mmproj=MmprojType.F16)
    expected = gguf.LlamaFileType.ALL_F32 if quant is Quant.F32 else gguf.LlamaFileType[f"MOSTLY_{quant.value}"]
    assert GGUFFields(gguf.GGUFReader(result.llm)).get(gguf.Keys.General.FILE_TYPE) == expected
    llm = load_llama(result.llm, logits_all=False)
    out = llm.create_completion("USER: Describe the picture. ASSISTANT:", max_tokens=8, temperature=0.0)
    assert out["usage"]["completion_tokens"] > 0
    if quant is Quant.F16:
        ids = ckpt.tokenizer(PROMPTS[0]).input_ids
        with torch.no_grad():
            ref = ckpt.model(input_ids=torch.tensor([ids])).logits[0, -1].numpy()
        llm_all = load_llama(result.llm)
        ours = text_logits(llm_all, ids)[-1]
        assert np.abs(ours - ref).max() < 0.1
    # no intermediate or partial files are left behind
    assert sorted(p.name for p in result.llm.parent.iterdir()) == sorted([result.llm.name, result.mmproj.name])


# ---------------------------------------------------------------- bad input


def _convert_fails(source: Path, out: Path, match: str, exc: type[Exception] = CheckpointError) -> None:
    with pytest.raises(exc, match=match) as info:
        convert_checkpoint(source, out, ConvertOptions(quant=Quant.F16))
    assert "\n" not in str(info.value)
    assert not out.exists() or not any(out.iterdir()), "a failed conversion left files behind"


def _copy(ckpt: TinyCheckpoint, dest: Path) -> Path:
    shutil.copytree(ckpt.path, dest)
    return dest


def test_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("hello")
    _convert_fails(tmp_path / "src", tmp_path / "out", "no config.json")
    _convert_fails(tmp_path / "missing-dir", tmp_path / "out", "no such directory")


def test_not_llava(tmp_path: Path, tiny_checkpoint) -> None:
    src = _copy(tiny_checkpoint(), tmp_path / "src")
    (src / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    _convert_fails(src, tmp_path / "out", "not a LLaVA checkpoint")


def test_unknown_architecture(tmp_path: Path, tiny_checkpoint) -> None:
    src = _copy(tiny_checkpoint(layout="original"), tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = ["LlavaQwenForCausalLM"]
    (src / "config.json").write_text(json.dumps(config))
    _convert_fails(src, tmp_path / "out", "unsupported LLaVA architecture 'LlavaQwenForCausalLM'")


def test_missing_shard(tmp_path: Path, tiny_checkpoint) -> None:
    src = _copy(tiny_checkpoint(llava_version="1.6", layout="original", max_shard_size="200KB"), tmp_path / "src")
    shards = sorted(src.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    _convert_fails(src, tmp_path / "out", f"missing shard.*{shards[-1].name}")


def test_truncated_safetensors(tmp_path: Path, tiny_checkpoint) -> None:
    src = _copy(tiny_checkpoint(), tmp_path / "src")
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    _convert_fails(src, tmp_path / "out", "truncated")
    weights.write_bytes(data[:5])
    _convert_fails(src, tmp_path / "out", "not a safetensors file")


def test_corrupt_tokenizer_model(tmp_path: Path, tiny_checkpoint) -> None:
    """A broken tokenizer.model is the project's one-line error, not protobuf's traceback."""
    src = _copy(tiny_checkpoint(), tmp_path / "src")
    (src / "tokenizer.model").write_bytes(b"\x0a\xff\xff garbage")
    _convert_fails(src, tmp_path / "out", "not a SentencePiece model")


def test_missing_tensor(tmp_path: Path, tiny_checkpoint) -> None:
    from safetensors.numpy import load_file, save_file

    src = _copy(tiny_checkpoint(), tmp_path / "src")
    tensors = load_file(src / "model.safetensors")
    del tensors[next(k for k in tensors if k.endswith("layers.1.mlp.down_proj.weight"))]
    save_file(tensors, src / "model.safetensors")
    _convert_fails(src, tmp_path / "out", "language-model tensor.*missing.*layers.1.mlp.down_proj")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_unprivileged(tmp_path: Path, tiny_checkpoint) -> None:
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    _convert_fails(tiny_checkpoint().path, out, "not writable", ConversionError)


def test_unwritable_output(tmp_path: Path, tiny_checkpoint) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    _convert_fails(tiny_checkpoint().path, blocker / "out", "cannot create output directory", ConversionError)


def test_interrupted_conversion_leaves_nothing(tmp_path: Path, tiny_checkpoint) -> None:
    calls = []

    def interrupt(description: str, done: int, total: int) -> None:
        calls.append(description)
        if description.startswith("llm"):
            raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(tiny_checkpoint().path, out, ConvertOptions(quant=Quant.Q8_0), interrupt)
    assert calls and list(out.iterdir()) == []


def test_pytorch_bin_checkpoint(tmp_path: Path, tiny_checkpoint, converted) -> None:
    """Older LLaVA uploads ship pytorch_model.bin: read through torch.load(weights_only=True)."""
    from safetensors.torch import load_file

    ckpt = tiny_checkpoint(layout="original")
    src = _copy(ckpt, tmp_path / "src")
    for shard in src.glob("*.safetensors"):
        torch.save(load_file(shard), src / "pytorch_model.bin")
        shard.unlink()
    result = convert_checkpoint(src, tmp_path / "out", ConvertOptions(quant=Quant.F32, mmproj_type=MmprojType.F32))
    _, reference = converted(CASES[4].values[0])
    ours = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(result.llm).tensors}
    for t in gguf.GGUFReader(reference.llm).tensors:
        np.testing.assert_array_equal(ours[t.name], np.asarray(t.data))


def test_pytorch_bin_without_torch(tmp_path: Path, tiny_checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load_file

    src = _copy(tiny_checkpoint(layout="original"), tmp_path / "src")
    for shard in src.glob("*.safetensors"):
        torch.save(load_file(shard), src / "pytorch_model.bin")
        shard.unlink()
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # as if torch were not installed
    _convert_fails(src, tmp_path / "out", "need torch to read")


def test_bf16_source_quantizes_through_bf16(converted) -> None:
    """A bf16 checkpoint goes to llama.cpp's quantizer as bf16 bits, unchanged."""
    ckpt, result = converted(CASES[6].values[0], quant=Quant.Q8_0, mmproj=MmprojType.F16)
    ids = ckpt.tokenizer(PROMPTS[0]).input_ids
    with torch.no_grad():
        ref = ckpt.model(input_ids=torch.tensor([ids])).logits[0].numpy()
    ours = text_logits(load_llama(result.llm), ids)
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.9
    # llama.cpp's Q8_0 of the bf16 weights equals gguf-py's Q8_0 (bit-exact with libggml) of the reference
    stored = {t.name: t for t in gguf.GGUFReader(result.llm).tensors}["blk.0.attn_v.weight"]
    assert stored.tensor_type == gguf.GGMLQuantizationType.Q8_0
    weight = ckpt.model.model.language_model.layers[0].self_attn.v_proj.weight.detach().numpy()
    expected = gguf.quants.quantize(weight.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(np.asarray(stored.data).reshape(expected.shape), expected)


def test_transformers5_save_pretrained_layout(tmp_path: Path, tiny_checkpoint, converted) -> None:
    """What transformers 5's own save_pretrained writes (its tower keys lack "vision_model.") converts the same."""
    ckpt = tiny_checkpoint(llava_version="1.6")
    src = tmp_path / "saved"
    ckpt.model.save_pretrained(src)
    for f in ckpt.path.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "preprocessor", "processor")):
            shutil.copy(f, src / f.name)
    result = convert_checkpoint(src, tmp_path / "out", ConvertOptions(quant=Quant.F32, mmproj_type=MmprojType.F32))
    _, reference = converted(("1.6", "llava-hf", "llama", {}))
    for ours_path, ref_path in ((result.llm, reference.llm), (result.mmproj, reference.mmproj)):
        ours = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(ours_path).tensors}
        ref = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(ref_path).tensors}
        assert ours.keys() == ref.keys()
        for name in ref:
            np.testing.assert_array_equal(ours[name], ref[name])
