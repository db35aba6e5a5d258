"""The converter's parsed hyperparameters against transformers' own config classes, for every
fixture and for configs written in transformers 4's and 5's spellings."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from checkpoints import TinyCheckpoint, build_family_checkpoint
from llama_utils import load_llama, text_logits
from transformers import AutoConfig, LlamaConfig, LlavaConfig, MistralConfig

from llava_gguf.convert import ConvertOptions, MmprojType, Quant, convert_checkpoint
from llava_gguf.convert.checkpoint import read_checkpoint
from llava_gguf.errors import CheckpointError
from llava_gguf.metadata import GGUFFields, read_gguf

FIXTURES = [
    pytest.param(("1.5", "llava-hf", "llama", {}), id="hf4-1.5-llama"),
    pytest.param(("1.5", "llava-hf", "llama", {"spelling": 5}), id="hf5-1.5-llama"),
    pytest.param(("1.6", "llava-hf", "mistral", {"spelling": 5}), id="hf5-1.6-mistral-rope1e6"),
    pytest.param(("1.6", "llava-hf", "llama", {"spelling": 5, "rope_theta": 5e6}), id="hf5-1.6-yi-like-rope5e6"),
    pytest.param(("1.6", "llava-hf", "mistral", {}), id="hf4-1.6-mistral"),
    pytest.param(("1.5", "original", "llama", {}), id="orig-1.5-llama"),
    pytest.param(("1.6", "original", "mistral", {}), id="orig-1.6-mistral"),
    pytest.param(("1.6", "original", "llama", {"rope_theta": 5e6}), id="orig-1.6-llama-rope5e6"),
]


def _reference_text_config(ckpt: TinyCheckpoint) -> LlamaConfig | MistralConfig:
    """What transformers makes of the checkpoint's config.json (the original layout's LLM half
    is a plain Llama / Mistral config with extra fields)."""
    if ckpt.layout == "llava-hf":
        return AutoConfig.from_pretrained(str(ckpt.path)).text_config
    raw = json.loads((ckpt.path / "config.json").read_text())
    cls = MistralConfig if raw["architectures"][0] == "LlavaMistralForCausalLM" else LlamaConfig
    return cls(**{k: v for k, v in raw.items() if k not in ("model_type", "architectures")})


@pytest.mark.parametrize("case", FIXTURES)
def test_parsed_config_equals_transformers(tiny_checkpoint: Callable[..., TinyCheckpoint], case) -> None:
    version, layout, llm, options = case
    ckpt = tiny_checkpoint(llava_version=version, layout=layout, llm=llm, **options)
    ref = _reference_text_config(ckpt)
    ours = read_checkpoint(ckpt.path).text
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "vocab_size"):
        assert getattr(ours, name) == getattr(ref, name), name
    assert ours.rope_theta == ref.rope_parameters["rope_theta"]
    assert ours.head_size == (getattr(ref, "head_dim", None) or ref.hidden_size // ref.num_attention_heads)
    assert ours.sliding_window == getattr(ref, "sliding_window", None)
    assert ours.tie_word_embeddings == ckpt.model.config.get_text_config().tie_word_embeddings
    assert ours.rope_theta == ckpt.model.config.text_config.rope_parameters["rope_theta"]
    if ckpt.layout == "llava-hf":
        vision = AutoConfig.from_pretrained(str(ckpt.path)).vision_config
        parsed = read_checkpoint(ckpt.path).vision
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "image_size", "patch_size", "layer_norm_eps", "hidden_act"):
            assert getattr(parsed, name) == getattr(vision, name), name


def test_transformers5_configs_keep_rope_parameters(tiny_checkpoint) -> None:
    """The fixtures really hold transformers 5's spelling, and its non-default bases."""
    ckpt = tiny_checkpoint(llava_version="1.6", layout="llava-hf", llm="mistral", spelling=5)
    text = json.loads((ckpt.path / "config.json").read_text())["text_config"]
    assert "rope_theta" not in text and text["rope_parameters"]["rope_theta"] == 1e6


@pytest.mark.parametrize("case", [FIXTURES[2], FIXTURES[3], FIXTURES[7]])
def test_rope_base_reaches_the_gguf_and_the_logits(tiny_checkpoint, tmp_path: Path, case) -> None:
    version, layout, llm, options = case
    ckpt = tiny_checkpoint(llava_version=version, layout=layout, llm=llm, **options)
    result = convert_checkpoint(ckpt.path, tmp_path, ConvertOptions(quant=Quant.F32, mmproj_type=MmprojType.F32))
    fields = GGUFFields(read_gguf(result.llm))
    assert fields.get(gguf.Keys.Rope.FREQ_BASE.format(arch="llama")) == ckpt.model.config.text_config.rope_parameters["rope_theta"]
    ids = ckpt.tokenizer("USER: a long enough prompt so that the rotary base matters at later positions 1 2 3 4 5 6 7 8 9 ASSISTANT:").input_ids
    with torch.no_grad():
        ref = ckpt.model(input_ids=torch.tensor([ids])).logits[0].numpy()
    ours = text_logits(load_llama(result.llm), ids)
    assert np.abs(ours - ref).max() <= 1e-3


def _write_config(tmp_path: Path, ckpt: TinyCheckpoint, edit: Callable[[dict], None]) -> Path:
    """A copy of a llava-hf checkpoint (weights linked) with an edited config.json."""
    dest = tmp_path / "edited"
    dest.mkdir()
    for f in ckpt.path.iterdir():
        (dest / f.name).symlink_to(f)
    config = json.loads((ckpt.path / "config.json").read_text())
    edit(config)
    (dest / "config.json").unlink()
    (dest / "config.json").write_text(json.dumps(config))
    return dest


@pytest.mark.parametrize(("edit", "message"), [
    (lambda c: c["text_config"].update(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
     r"RoPE scaling 'yarn'.*not supported"),
    (lambda c: c["text_config"].update(rope_theta=1e4, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
     r"two RoPE bases"),
    (lambda c: c["text_config"].update(hidden_act="gelu"), r"activation 'gelu' is not supported"),
    (lambda c: c["text_config"].update(attention_bias=True), r"attention_bias=true is not supported"),
    (lambda c: c.update(image_grid_pinpoints="not pairs"), r"image_grid_pinpoints .* not a list of pairs"),
])
def test_configs_llama_cpp_cannot_run_are_clear_errors(tiny_checkpoint, tmp_path: Path, edit, message: str) -> None:
    ckpt = tiny_checkpoint(llava_version="1.6", layout="llava-hf", llm="mistral", spelling=5)
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(_write_config(tmp_path, ckpt, edit))


def test_linear_rope_scaling_in_either_spelling(tiny_checkpoint, tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(llava_version="1.6", layout="llava-hf", llm="mistral", spelling=5)
    path = _write_config(tmp_path, ckpt, lambda c: c["text_config"].update(
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}))
    text = read_checkpoint(path).text
    assert (text.rope_theta, text.rope_scaling["factor"]) == (1e6, 2.0)


def test_defaults_are_transformers_defaults(tiny_checkpoint, tmp_path: Path) -> None:
    """Fields a config leaves out get what transformers gives them: LlavaConfig's CLIP-L/336 tower,
    MistralConfig's sliding window and RoPE base, the default image token."""
    ckpt = tiny_checkpoint(llava_version="1.6", layout="llava-hf", llm="mistral", spelling=5)

    def strip(c: dict) -> None:
        del c["vision_config"]
        del c["image_token_index"]
        for key in ("rope_parameters", "rope_theta", "sliding_window", "rms_norm_eps"):
            c["text_config"].pop(key, None)

    path = _write_config(tmp_path, ckpt, strip)
    parsed = read_checkpoint(path)
    ref = AutoConfig.from_pretrained(str(path))
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                 "patch_size", "layer_norm_eps", "hidden_act"):
        assert getattr(parsed.vision, name) == getattr(ref.vision_config, name), name
    assert parsed.text.rope_theta == ref.text_config.rope_parameters["rope_theta"]
    assert parsed.text.sliding_window == ref.text_config.sliding_window
    assert parsed.text.rms_norm_eps == ref.text_config.rms_norm_eps
    assert parsed.text.context_length == min(ref.text_config.max_position_embeddings, ref.text_config.sliding_window)
    assert parsed.image_token_id == LlavaConfig().image_token_id


# ---------------------------------------------------------------- the family's other LLMs (Llama 3, Phi-3)

FAMILY_FIXTURES = [
    pytest.param(("llama3", 4, {}), id="hf4-llama3"),
    pytest.param(("llama3", 5, {}), id="hf5-llama3"),
    pytest.param(("phi3", 4, {}), id="hf4-phi3"),
    pytest.param(("phi3", 5, {"partial_rotary_factor": 0.5}), id="hf5-phi3-partial-rotary"),
    pytest.param(("phi3", 4, {"longrope": True}), id="hf4-phi3-longrope"),
    pytest.param(("phi3", 5, {"longrope": True}), id="hf5-phi3-longrope"),
]


@pytest.fixture(scope="module")
def family_checkpoint(tmp_path_factory: pytest.TempPathFactory, sp_model: Path) -> Callable[..., TinyCheckpoint]:
    cache: dict[tuple, TinyCheckpoint] = {}

    def make(family: str, spelling: int = 4, **options: object) -> TinyCheckpoint:
        key = (family, spelling, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = build_family_checkpoint(tmp_path_factory.mktemp(f"{family}-s{spelling}"), family=family,
                                                 spelling=spelling, sp_model_path=sp_model, **options)
        return cache[key]

    return make


@pytest.mark.parametrize("case", FAMILY_FIXTURES)
def test_family_configs_parse_as_transformers(family_checkpoint, case) -> None:
    family, spelling, options = case
    ckpt = family_checkpoint(family, spelling, **options)
    ref = AutoConfig.from_pretrained(str(ckpt.path)).text_config
    ours = read_checkpoint(ckpt.path).text
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "vocab_size"):
        assert getattr(ours, name) == getattr(ref, name), name
    assert ours.rope_theta == ref.rope_parameters["rope_theta"]
    assert ours.sliding_window == getattr(ref, "sliding_window", None)
    head_dim = ref.hidden_size // ref.num_attention_heads
    assert ours.rope_dimension_count == int(head_dim * ref.rope_parameters.get("partial_rotary_factor", 1.0))
    if family == "phi3":
        assert ours.original_max_position_embeddings == ref.original_max_position_embeddings
    if options.get("longrope"):
        assert ours.rope_scaling_kind == "longrope"
        assert ours.rope_scaling["long_factor"] == ref.rope_parameters["long_factor"]
        assert ours.rope_scaling["short_factor"] == ref.rope_parameters["short_factor"]
    else:
        assert ours.rope_scaling is None


def test_phi3_defaults_are_transformers_defaults(family_checkpoint, tmp_path: Path) -> None:
    """A Phi-3 text_config holding only its model_type parses as Phi3Config() does."""
    ckpt = family_checkpoint("phi3", 5)
    path = _write_config(tmp_path, ckpt, lambda c: c.update(text_config={"model_type": "phi3"}))
    parsed = read_checkpoint(path).text
    ref = AutoConfig.from_pretrained(str(path)).text_config
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "vocab_size",
                 "original_max_position_embeddings", "tie_word_embeddings"):
        assert getattr(parsed, name) == getattr(ref, name), name
    assert parsed.rope_theta == ref.rope_parameters["rope_theta"]
    assert parsed.partial_rotary_factor == ref.rope_parameters.get("partial_rotary_factor", 1.0)
    assert parsed.sliding_window == ref.sliding_window


@pytest.mark.parametrize(("edit", "message"), [
    (lambda c: c["text_config"].update(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
     r"RoPE scaling 'yarn'.*not supported; supported: linear, longrope, default"),
    (lambda c: c["text_config"].update(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4,
                                                        "long_factor": [1.0] * 3, "short_factor": [1.0] * 3}),
     r"longrope factors of lengths \[3\], expected 8"),
    (lambda c: c["text_config"].update(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}),
     r"longrope RoPE scaling without a long_factor list"),
    (lambda c: c["text_config"].update(hidden_act="gelu_new"), r"activation 'gelu_new' is not supported"),
])
def test_phi3_configs_llama_cpp_cannot_run_are_clear_errors(family_checkpoint, tmp_path: Path, edit, message) -> None:
    ckpt = family_checkpoint("phi3", 5)
    with pytest.raises(CheckpointError, match=message) as e:
        read_checkpoint(_write_config(tmp_path, ckpt, edit))
    assert "\n" not in str(e.value)


def test_longrope_is_refused_for_llama(tiny_checkpoint, tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(llava_version="1.6", layout="llava-hf", llm="mistral", spelling=5)
    path = _write_config(tmp_path, ckpt, lambda c: c["text_config"].update(rope_parameters={
        "rope_type": "longrope", "rope_theta": 1e4, "long_factor": [1.0] * 8, "short_factor": [1.0] * 8}))
    with pytest.raises(CheckpointError, match=r"RoPE scaling 'longrope'.*supported: linear, default"):
        read_checkpoint(path)
