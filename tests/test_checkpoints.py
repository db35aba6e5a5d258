"""Self-checks of the tiny checkpoint fixtures against transformers and sentencepiece."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest
import sentencepiece as spm
import torch
from checkpoints import IMAGE_TOKEN, SP_VOCAB_SIZE, TinyCheckpoint
from PIL import Image
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

COMBOS = [(v, layout, llm) for v in ("1.5", "1.6") for layout in ("llava-hf", "original")
          for llm in ("llama", "mistral")]
TEXTS = [
    "Hello world",
    "café 日本語 😀 12345 and 3.14159",
    "  two  spaces\tand\nnewline   ",
    " leading space",
    "\n\nUSER: What is shown in this picture?\nASSISTANT:",
    "zzq xyzzy ☃ Ωμέγα",
    "",
]
Factory = Callable[..., TinyCheckpoint]


def read_tensors(ck: TinyCheckpoint) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(ck.path.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def sample_image(width: int = 90, height: int = 50) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))



def multimodal_inputs(ck: TinyCheckpoint) -> dict[str, torch.Tensor]:
    """BOS, text, as many placeholders as the image has features, text."""
    pixels = ck.image_processor(sample_image(), return_tensors="pt")
    inputs = {"pixel_values": pixels["pixel_values"]}
    if "image_sizes" in pixels:
        inputs["image_sizes"] = pixels["image_sizes"]
    with torch.no_grad():
        feats = ck.model.model.get_image_features(**inputs).pooler_output
    n = sum(f.shape[0] for f in feats) if isinstance(feats, (list, tuple)) else feats.shape[-2]
    before = ck.tokenizer("USER: ")["input_ids"]
    after = ck.tokenizer("\nWhat is in the picture? ASSISTANT:", add_special_tokens=False)["input_ids"]
    ids = before + [ck.placeholder_id] * n + after
    return {"input_ids": torch.tensor([ids]), **inputs}


@pytest.mark.parametrize("llava_version,layout,llm", COMBOS)
def test_builds_with_separated_logits(tiny_checkpoint: Factory, llava_version: str, layout: str,
                                      llm: str) -> None:
    ck = tiny_checkpoint(llava_version=llava_version, layout=layout, llm=llm)
    assert (ck.path / "config.json").is_file()
    assert not ck.model.training
    inputs = multimodal_inputs(ck)
    with torch.no_grad():
        logits = ck.model(**inputs).logits[0]  # [S, V]
    assert torch.isfinite(logits).all()
    top2 = logits.topk(2, dim=-1).values
    gaps = top2[:, 0] - top2[:, 1]
    assert gaps[-1] > 0.1, f"greedy token not separated: gap {gaps[-1]:.4f}"
    assert gaps.median() > 0.3, f"median top-2 gap {gaps.median():.4f}"
    assert (gaps > 0.1).float().mean() > 0.75
    assert logits.abs().max() < 50, "logits saturate"
    # The image changes the answer's logits (the vision path is live).
    with torch.no_grad():
        other = ck.model(**{**inputs, "pixel_values": inputs["pixel_values"].flip(-1)}).logits[0]
    assert (other[-1] - logits[-1]).abs().max() > 0.05


@pytest.mark.parametrize("llava_version", ["1.5", "1.6"])
@pytest.mark.parametrize("spelling", [4, 5])
def test_llava_hf_loads_in_transformers(tiny_checkpoint: Factory, llava_version: str,
                                        spelling: int) -> None:
    ck = tiny_checkpoint(llava_version=llava_version, layout="llava-hf", spelling=spelling)
    keys = read_tensors(ck).keys()
    if spelling == 4:
        assert "language_model.lm_head.weight" in keys
        assert "multi_modal_projector.linear_1.weight" in keys
        assert "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight" in keys
        assert ("image_newline" in keys) == (llava_version == "1.6")
    else:
        assert "lm_head.weight" in keys
        assert "model.language_model.layers.0.self_attn.q_proj.weight" in keys
        assert "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight" in keys
        assert ("model.image_newline" in keys) == (llava_version == "1.6")
    cls = LlavaForConditionalGeneration if llava_version == "1.5" else LlavaNextForConditionalGeneration
    loaded = cls.from_pretrained(str(ck.path), dtype=torch.float32).eval()
    ref_sd, got_sd = ck.model.state_dict(), loaded.state_dict()
    assert ref_sd.keys() == got_sd.keys()
    for k, v in ref_sd.items():
        assert torch.equal(v, got_sd[k]), k
    inputs = multimodal_inputs(ck)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, ck.model(**inputs).logits)


@pytest.mark.parametrize("llava_version", ["1.5", "1.6"])
def test_original_layout(tiny_checkpoint: Factory, llava_version: str) -> None:
    ck = tiny_checkpoint(llava_version=llava_version, layout="original")
    config = json.loads((ck.path / "config.json").read_text())
    assert config["architectures"] == ["LlavaLlamaForCausalLM"]
    assert config["mm_vision_tower"] == str(ck.clip_path)
    assert config["vocab_size"] == SP_VOCAB_SIZE
    tensors = read_tensors(ck)
    ref = ck.model.state_dict()
    assert torch.equal(tensors["model.mm_projector.2.weight"],
                       ref["model.multi_modal_projector.linear_2.weight"])
    assert torch.equal(tensors["model.layers.1.mlp.down_proj.weight"],
                       ref["model.language_model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(tensors["lm_head.weight"], ref["lm_head.weight"])
    tower_keys = [k for k in tensors if k.startswith("model.vision_tower.")]
    with safe_open(str(ck.clip_path / "model.safetensors"), "pt") as f:
        clip_q = f.get_tensor("vision_model.encoder.layers.0.self_attn.q_proj.weight")
        assert "text_model.embeddings.token_embedding.weight" in f.keys()
    ref_q = ref[next(k for k in ref if k.endswith("vision_tower.encoder.layers.0.self_attn.q_proj.weight"))]
    if llava_version == "1.5":
        assert tower_keys == [] and "model.image_newline" not in tensors
        assert torch.equal(clip_q, ref_q)
    else:
        assert torch.equal(
            tensors["model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight"],
            ref_q)
        assert torch.equal(tensors["model.image_newline"], ref["model.image_newline"])
        assert not torch.allclose(clip_q, ref_q)
    assert ck.image_token_id is None and ck.placeholder_id == 0
    assert sorted(p.name for p in ck.path.iterdir() if "token" in p.name) == [
        "special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"]


@pytest.mark.parametrize("save_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["llava-hf", "original"])
def test_save_dtype_round_trips(tiny_checkpoint: Factory, save_dtype: torch.dtype, layout: str) -> None:
    ck = tiny_checkpoint(llava_version="1.6", layout=layout, save_dtype=save_dtype,
                         max_shard_size="40KB")
    index = json.loads((ck.path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    tensors = read_tensors(ck)
    assert set(index["weight_map"]) == set(tensors)
    assert {t.dtype for t in tensors.values()} == {save_dtype}
    lm_head = "language_model.lm_head.weight" if layout == "llava-hf" else "lm_head.weight"
    assert torch.equal(tensors[lm_head].float(), ck.model.lm_head.weight)


@pytest.mark.parametrize("layout", ["llava-hf", "original"])
def test_tokenizer_matches_sentencepiece(tiny_checkpoint: Factory, layout: str) -> None:
    ck = tiny_checkpoint(llava_version="1.5", layout=layout)
    sp = spm.SentencePieceProcessor(model_file=str(ck.sp_model_path))
    assert sp.vocab_size() == SP_VOCAB_SIZE
    for text in TEXTS:
        assert ck.tokenizer(text)["input_ids"] == [sp.bos_id(), *sp.encode(text)], repr(text)
    if layout == "llava-hf":
        assert ck.image_token_id == SP_VOCAB_SIZE
        ids = ck.tokenizer(f"USER: {IMAGE_TOKEN}\nWhat?")["input_ids"]
        assert ids == [1, *sp.encode("USER: "), ck.image_token_id, *sp.encode("\nWhat?")]
        assert ck.model.config.text_config.vocab_size == SP_VOCAB_SIZE + 2
    else:
        assert IMAGE_TOKEN not in ck.tokenizer.get_vocab()
        assert ck.model.config.text_config.vocab_size == SP_VOCAB_SIZE


def test_tokenizer_json_only(tiny_checkpoint: Factory) -> None:
    ck = tiny_checkpoint(llava_version="1.5", layout="llava-hf", tokenizer_files="json")
    assert not (ck.path / "tokenizer.model").exists()
    tok = Tokenizer.from_file(str(ck.path / "tokenizer.json"))
    sp = spm.SentencePieceProcessor(model_file=str(ck.sp_model_path))
    for text in TEXTS:
        assert tok.encode(text).ids == [1, *sp.encode(text)], repr(text)
    assert tok.token_to_id(IMAGE_TOKEN) == SP_VOCAB_SIZE


def test_image_processors(tiny_checkpoint: Factory) -> None:
    hf15 = tiny_checkpoint(llava_version="1.5", layout="llava-hf")
    orig15 = tiny_checkpoint(llava_version="1.5", layout="original")
    assert type(hf15.image_processor).__name__ == "LlavaImageProcessorPil"
    assert hf15.image_processor.do_pad is False and orig15.image_processor.do_pad is True
    pre = json.loads((hf15.path / "preprocessor_config.json").read_text())
    assert pre["crop_size"] == {"height": 56, "width": 56} and pre["size"] == {"shortest_edge": 56}
    hf16 = tiny_checkpoint(llava_version="1.6", layout="llava-hf")
    assert type(hf16.image_processor).__name__ == "LlavaNextImageProcessorPil"
    out = hf16.image_processor(sample_image(), return_tensors="pt")
    assert tuple(out["pixel_values"].shape[-3:]) == (3, 56, 56)
    assert out["image_sizes"].tolist() == [[50, 90]]
