"""Parity of the NumPy vision encoder with transformers' LLaVA image features.

Each case builds a tiny random `LlavaForConditionalGeneration`, writes its vision tensors into a
real tiny mmproj GGUF, loads it with `NumpyVisionEncoder.from_gguf` and compares the features
with `model.model.get_image_features(...).pooler_output` (one [tokens, llm_hidden] per tile).
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from llava_gguf.convert.names import Layout, block_index, canonical_name, gguf_name, is_vision
from llava_gguf.errors import GGUFFormatError, ImageError
from llava_gguf.llm.llama import KVCacheType
from llava_gguf.memory import estimate_memory, vision_weight_bytes
from llava_gguf.metadata import ClipKeys, ImageMode, SelectStrategy, VisionSettings
from llava_gguf.vision import GGUFTensors, NumpyVisionEncoder, gelu, load_mmproj_tensors, quick_gelu
from llava_gguf.vision.ggml_encoder import GgmlVisionEncoder

IMAGE_SIZE = 56
PATCH_SIZE = 14
N_LAYERS = 3


@dataclass(frozen=True)
class Case:
    feature_layer: int  # transformers' vision_feature_layer (may be negative)
    strategy: SelectStrategy
    weights: str = "f32"  # "f32", "f16" or a ggml quant type ("q8_0", "q4_0"...): how the GGUF stores the 2-D weights
    tol: float = 1e-5


def tiny_llava(case: Case) -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=128,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=127,
        vision_feature_layer=case.feature_layer,
        vision_feature_select_strategy=case.strategy.value,
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(config).eval()
    # A larger spread than the default init, so that any mistake shows in the features.
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.1)
            if "norm" in name and name.endswith("weight"):
                p.add_(1.0)
    return model


def hub_name(name: str) -> str:
    """The llava-hf checkpoint spelling of a transformers 5 parameter name.

    transformers 5 flattens `CLIPVisionModel` (``model.vision_tower.encoder...``, also in
    `save_pretrained`), while the llava-hf checkpoints on the Hub, which the converter reads,
    spell ``vision_tower.vision_model.encoder...``.
    """
    flat, hub = "model.vision_tower.", "model.vision_tower.vision_model."
    if name.startswith(flat) and not name.startswith(hub):
        return hub + name[len(flat) :]
    return name


def gguf_tensors(model: LlavaForConditionalGeneration, n_blocks: int) -> dict[str, np.ndarray]:
    """The vision tensors the mmproj holds, by GGUF name, float32 in torch's shapes."""
    out = {}
    for name, tensor in model.state_dict().items():
        canonical = canonical_name(hub_name(name), Layout.LLAVA_HF)
        if canonical is None or not is_vision(canonical):
            continue
        bid = block_index(canonical)
        if bid is not None and bid >= n_blocks:
            continue
        out[gguf_name(canonical, gguf.MODEL_ARCH.MMPROJ, n_blocks)] = tensor.detach().float().numpy().copy()
    return out


def store(tensors: dict[str, np.ndarray], weights: str) -> dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType | None]]:
    """Each tensor as written to the GGUF: (array, raw quantization type or None).

    Norms, biases and the class embedding stay f32; "f16" stores every other tensor in f16;
    a quant type ("q8_0"...) quantizes the linear weights and keeps the patch conv and positions in f16.
    """
    positions = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_ENC_EMBD_POS] + ".weight"
    stored: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType | None]] = {}
    for name, array in tensors.items():
        if weights == "f32" or array.ndim < 2:
            stored[name] = (array, None)
        elif weights == "f16" or array.ndim != 2 or name == positions:
            stored[name] = (array.astype(np.float16), None)
        else:
            qtype = gguf.GGMLQuantizationType[weights.upper()]
            stored[name] = (gguf.quants.quantize(array, qtype), qtype)
    return stored


def round_like_stored(model: LlavaForConditionalGeneration, stored: dict, n_blocks: int) -> None:
    """Give the torch model exactly the weights the GGUF holds (f16 rounding, q8_0 error)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            canonical = canonical_name(hub_name(name), Layout.LLAVA_HF)
            if canonical is None or not is_vision(canonical):
                continue
            bid = block_index(canonical)
            if bid is not None and bid >= n_blocks:
                continue
            array, qtype = stored[gguf_name(canonical, gguf.MODEL_ARCH.MMPROJ, n_blocks)]
            value = gguf.quants.dequantize(array, qtype) if qtype is not None else array.astype(np.float32)
            p.copy_(torch.from_numpy(value.reshape(p.shape)))


def write_mmproj(path: Path, stored: dict, n_blocks: int, case: Case) -> None:
    """A minimal mmproj GGUF. The real converter (llava_gguf.convert) writes these files and has
    its own tests; this only exercises `NumpyVisionEncoder.from_gguf` on a real file."""
    writer = gguf.GGUFWriter(path, "clip")
    writer.add_clip_projector_type(ClipKeys.PROJECTOR_MLP)
    writer.add_vision_block_count(n_blocks)
    writer.add_vision_embedding_length(64)
    writer.add_vision_feed_forward_length(128)
    writer.add_vision_head_count(4)
    writer.add_vision_attention_layernorm_eps(1e-5)
    writer.add_vision_image_size(IMAGE_SIZE)
    writer.add_vision_patch_size(PATCH_SIZE)
    writer.add_vision_image_mean([0.5, 0.5, 0.5])
    writer.add_vision_image_std([0.5, 0.5, 0.5])
    writer.add_array(ClipKeys.FEATURE_LAYER, [n_blocks])
    VisionSettings(
        llava_version="1.5",
        layout=Layout.LLAVA_HF.value,
        image_mode=ImageMode.CROP,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        shortest_edge=IMAGE_SIZE,
        crop_size=(IMAGE_SIZE, IMAGE_SIZE),
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
        vision_feature_layer=case.feature_layer,
        vision_feature_select_strategy=case.strategy,
    ).write(writer)
    for name, (array, qtype) in stored.items():
        writer.add_tensor(name, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def reference_features(model: LlavaForConditionalGeneration, tiles: np.ndarray, case: Case) -> np.ndarray:
    with torch.no_grad():
        out = model.model.get_image_features(
            pixel_values=torch.from_numpy(tiles),
            vision_feature_layer=case.feature_layer,
            vision_feature_select_strategy=case.strategy.value,
        )
    return torch.stack(list(out.pooler_output)).numpy()  # n_tiles x [tokens, llm_hidden]


CASES = [
    Case(-2, SelectStrategy.DEFAULT),
    Case(-2, SelectStrategy.FULL),
    Case(-1, SelectStrategy.FULL),
    Case(1, SelectStrategy.DEFAULT),
    Case(-2, SelectStrategy.DEFAULT, weights="f16"),
    Case(-2, SelectStrategy.FULL, weights="q8_0"),
    # the types of published legacy mmproj files (llama.cpp's clip quantizer)
    Case(-2, SelectStrategy.DEFAULT, weights="q4_0"),
    Case(-2, SelectStrategy.DEFAULT, weights="q4_1"),
    Case(-2, SelectStrategy.DEFAULT, weights="q5_0"),
    Case(-2, SelectStrategy.DEFAULT, weights="q5_1"),
]


ENCODERS = {"numpy": NumpyVisionEncoder.from_gguf, "ggml": GgmlVisionEncoder.from_gguf}


@pytest.mark.parametrize("encoder_name", list(ENCODERS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"layer{c.feature_layer}-{c.strategy.value}-{c.weights}")
def test_features_match_transformers(case: Case, encoder_name: str, tmp_path: Path) -> None:
    """Both exact encoders (NumPy, and ggml on the CPU backend) on every storage type: the reference
    holds the values the GGUF stores (f16 rounding, quantization error), so 1e-5 is float32 arithmetic."""
    model = tiny_llava(case)
    n_blocks = case.feature_layer % (N_LAYERS + 1)  # hidden_states index = blocks that run
    stored = store(gguf_tensors(model, n_blocks), case.weights)
    round_like_stored(model, stored, n_blocks)
    path = tmp_path / "mmproj.gguf"
    write_mmproj(path, stored, n_blocks, case)

    tiles = np.random.default_rng(1).standard_normal((2, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    expected = reference_features(model, tiles, case)
    encoder = ENCODERS[encoder_name](path)
    got = encoder.encode(tiles)

    n_patches = (IMAGE_SIZE // PATCH_SIZE) ** 2
    assert got.shape == (2, n_patches + (case.strategy == SelectStrategy.FULL), 64)
    assert got.dtype == np.float32
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= case.tol
    assert np.abs(expected).max() > 0.1  # the comparison is not between near-zero features


def test_f16_weights_are_views_and_cache_is_bounded(tmp_path: Path) -> None:
    case = Case(-2, SelectStrategy.DEFAULT, weights="f16")
    model = tiny_llava(case)
    stored = store(gguf_tensors(model, 2), "f16")
    path = tmp_path / "mmproj.gguf"
    write_mmproj(path, stored, 2, case)
    tensors = load_mmproj_tensors(path)
    assert isinstance(tensors, GGUFTensors)
    up = tensors["v.blk.0.ffn_up.weight"]
    assert up.dtype == np.float16 and up.shape == (128, 64) and not up.flags.owndata
    assert tensors.shape("v.blk.0.ffn_up.weight") == (128, 64)
    assert tensors["v.patch_embd.weight"].shape == (64, 3, PATCH_SIZE, PATCH_SIZE)

    tiles = np.zeros((1, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    uncached = NumpyVisionEncoder.from_gguf(path, cache_bytes=0)
    cached = NumpyVisionEncoder.from_gguf(path)
    np.testing.assert_array_equal(uncached.encode(tiles), cached.encode(tiles))
    assert uncached._cache == {}
    assert cached._cache  # upcast weights kept between tiles while the budget allows


def test_on_tile_reports_progress(tmp_path: Path) -> None:
    case = Case(-2, SelectStrategy.DEFAULT)
    model = tiny_llava(case)
    path = tmp_path / "mmproj.gguf"
    write_mmproj(path, store(gguf_tensors(model, 2), "f32"), 2, case)
    calls: list[tuple[int, int]] = []
    NumpyVisionEncoder.from_gguf(path).encode(
        np.zeros((3, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32), on_tile=lambda done, total: calls.append((done, total))
    )
    assert calls == [(1, 3), (2, 3), (3, 3)]
    # 2 tiles through 2 blocks and the projector (3 steps): reported as whole tiles' worth of work
    calls.clear()
    NumpyVisionEncoder.from_gguf(path).encode(
        np.zeros((2, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32), on_tile=lambda done, total: calls.append((done, total))
    )
    assert calls == [(1, 2), (2, 2)]


def _mapped_rss(path: Path) -> int:
    """Bytes of this process's mappings of ``path`` that are resident (Linux's /proc/self/smaps)."""
    rss, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
            inside = len(fields) >= 6 and fields[5] == str(path.resolve())
        elif inside and fields[0] == "Rss:":
            rss += int(fields[1]) * 1024
    return rss


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
def test_converted_weights_leave_resident_memory(tmp_path: Path) -> None:
    """An f16 tensor's whole pages are dropped from resident memory once converted to float32, so
    the file is not resident beside its copy; the features are unchanged."""
    case = Case(-2, SelectStrategy.DEFAULT, weights="f16")
    model = tiny_llava(case)
    path = tmp_path / "mmproj.gguf"
    write_mmproj(path, store(gguf_tensors(model, 2), "f16"), 2, case)
    reader = gguf.GGUFReader(path)
    page = mmap.PAGESIZE
    whole_pages = sum(max(0, (int(t.data_offset) + int(t.n_bytes)) // page - -(-int(t.data_offset) // page))
                      for t in reader.tensors if t.tensor_type == gguf.GGMLQuantizationType.F16)
    assert whole_pages * page > path.stat().st_size / 2  # most of the file can leave

    tiles = np.random.default_rng(2).standard_normal((2, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    encoder = NumpyVisionEncoder.from_gguf(path, cache_bytes=0)
    expected = NumpyVisionEncoder(dict(encoder._tensors.items()), encoder.config).encode(tiles)  # every page read
    resident = _mapped_rss(path)
    assert resident >= path.stat().st_size // page * page
    np.testing.assert_array_equal(encoder.encode(tiles), expected)
    assert _mapped_rss(path) <= resident - whole_pages * page
    np.testing.assert_array_equal(encoder.encode(tiles), expected)  # read again from the page cache


def test_errors_name_the_problem(tmp_path: Path) -> None:
    case = Case(-2, SelectStrategy.DEFAULT)
    model = tiny_llava(case)
    tensors = gguf_tensors(model, 2)
    path = tmp_path / "mmproj.gguf"
    write_mmproj(path, store(tensors, "f32"), 2, case)
    encoder = NumpyVisionEncoder.from_gguf(path)
    with pytest.raises(ImageError, match=r"\(1, 3, 28, 28\)"):
        encoder.encode(np.zeros((1, 3, 28, 28), np.float32))

    del tensors["v.blk.1.attn_k.weight"]
    broken = tmp_path / "broken.gguf"
    write_mmproj(broken, store(tensors, "f32"), 2, case)
    with pytest.raises(GGUFFormatError, match="v.blk.1.attn_k.weight"):
        NumpyVisionEncoder.from_gguf(broken)

    not_clip = tmp_path / "llm.gguf"
    writer = gguf.GGUFWriter(not_clip, "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(GGUFFormatError, match="not an mmproj"):
        NumpyVisionEncoder.from_gguf(not_clip)


def _activation_inputs() -> np.ndarray:
    return np.concatenate(
        [np.linspace(-40, 40, 200_001), np.random.default_rng(2).standard_normal(100_000) * 4]
    ).astype(np.float32)


def _ulps(got: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """|got - exact| in units of float32's spacing at the exact value (float64), where that is normal;
    0.5 is correct rounding. The bound holds on any CPU: it compares with exact arithmetic, not with
    another library's kernels."""
    normal = np.abs(exact) >= np.finfo(np.float32).tiny
    spacing = np.spacing(np.abs(exact[normal]).astype(np.float32)).astype(np.float64)
    return np.abs(got[normal].astype(np.float64) - exact[normal]) / spacing


def _gelu_exact(x: np.ndarray) -> np.ndarray:
    return np.array([v * 0.5 * math.erfc(-v / math.sqrt(2.0)) for v in x.astype(np.float64).tolist()])


def _quick_gelu_exact(x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    with np.errstate(over="ignore"):
        return x64 / (1.0 + np.exp(-1.702 * x64))


def test_gelu_is_exact_erf_gelu_and_torch_within_its_own_spread() -> None:
    """Ours is the exact erf GELU at float32 rounding. torch's GELU rounds 1 + erf(x / sqrt 2) to float32
    and its vector kernels differ between CPUs (AVX2 and AVX-512 measured 1.23e-6 and under 1e-6 relative
    apart from ours): it is checked against the same exact values, with its own, looser spread."""
    x = _activation_inputs()
    exact = _gelu_exact(x)
    assert _ulps(gelu(x.copy()), exact).max() <= 0.5 + 1e-3
    theirs = torch.nn.GELU()(torch.from_numpy(x)).numpy()
    # torch near y = 0 is off by about |x| * 2^-24 (the rounding of 1 + erf): absolute, scaled by |x|
    # measured (AVX-512): 3.3e-7 and 6.8e-7; AVX2's kernel is 1.23e-6 from ours
    assert (np.abs(theirs - exact) / np.maximum(np.abs(x), 1.0)).max() <= 1e-5
    large = np.abs(exact) >= 0.1
    assert (np.abs(theirs - exact)[large] / np.abs(exact[large])).max() <= 1e-5


def test_gelu_against_math_erfc() -> None:
    x = np.linspace(-14, 8, 100_001).astype(np.float32)
    exact = _gelu_exact(x).astype(np.float32)
    got = gelu(x)
    tiny = np.abs(exact) < 1e-37  # float32 denormals
    rel = np.abs(got - exact)[~tiny] / np.abs(exact[~tiny])
    assert rel.max() <= 2.5e-7  # within float32 rounding, even far in the negative tail


def test_quick_gelu_matches_clip() -> None:
    """CLIP's x * sigmoid(1.702 x) in float32 arithmetic: a few roundings from the exact value (float64),
    as torch's is (its spread differs between CPUs, so both are held to the exact value)."""
    x = _activation_inputs()
    exact = _quick_gelu_exact(x)
    with np.errstate(over="ignore"):
        ours = quick_gelu(x.copy())
    theirs = (torch.from_numpy(x) * torch.sigmoid(1.702 * torch.from_numpy(x))).numpy()
    large = np.abs(exact) >= 1e-3
    # measured (AVX-512): ours 8.5, torch 8.9 ULPs, mostly the rounding of 1.702 x near x = -5 where
    # exp(1.702 x) amplifies it; exp's vector kernels differ by a few ULPs between CPUs
    assert _ulps(ours[large], exact[large]).max() <= 32
    assert _ulps(theirs[large], exact[large]).max() <= 64
    scale = np.maximum(np.abs(x), 1.0)  # near 0 and in the negative tail: absolute, scaled by |x|
    assert (np.abs(ours - exact) / scale).max() <= 1e-6 and (np.abs(theirs - exact) / scale).max() <= 1e-6


class _PeakHeld(NumpyVisionEncoder):
    """Records the most bytes of converted float32 weights held at once (cache and current layer)."""

    peak = 0

    def _weight(self, name: str) -> np.ndarray:
        out = super()._weight(name)
        held = sum(a.nbytes for scope in (self._cache, self._scope or {}) for a in scope.values())
        self.peak = max(self.peak, held)
        return out


def test_memory_estimate_counts_what_the_encoder_holds(tmp_path: Path) -> None:
    """The estimate's float32 copies are the encoder's measured peak: one layer without a cache,
    every converted tensor with a large one."""
    case = Case(-2, SelectStrategy.DEFAULT, weights="f16")
    mmproj = tmp_path / "mmproj.gguf"
    write_mmproj(mmproj, store(gguf_tensors(tiny_llava(case), 2), "f16"), 2, case)
    reader = gguf.GGUFReader(mmproj)
    size = mmproj.stat().st_size
    tiles = np.random.default_rng(3).standard_normal((2, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    for cache_bytes in (0, 2**30):
        encoder = _PeakHeld.from_gguf(mmproj, cache_bytes=cache_bytes)
        encoder.encode(tiles)
        resident, held = vision_weight_bytes(reader, size, cache_bytes)
        assert encoder.peak == held
        assert resident < size  # converted tensors' pages leave (test_converted_weights_leave_resident_memory)
    # the largest layer here is the embeddings' float16 weights (patch conv 64x3x14x14, positions
    # 17x64) in float32; a block's are q, k, v, o 64x64 and fc1, fc2 128x64
    n_positions = (IMAGE_SIZE // PATCH_SIZE) ** 2 + 1
    assert vision_weight_bytes(reader, size, 0)[1] == 4 * (64 * 3 * PATCH_SIZE**2 + n_positions * 64)
    assert 4 * (64 * 3 * PATCH_SIZE**2 + n_positions * 64) > 4 * (4 * 64 * 64 + 2 * 128 * 64)

    llm = tmp_path / "llm.gguf"
    writer = gguf.GGUFWriter(llm, "llama")
    for add, value in ((writer.add_block_count, 1), (writer.add_embedding_length, 64), (writer.add_head_count, 4),
                       (writer.add_context_length, 512)):
        add(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    none, full = (estimate_memory(llm, mmproj, n_ctx=256, kv_cache_type=KVCacheType.F16, vision_cache_bytes=c)
                  for c in (0, 2**30))
    assert full.vision - none.vision == vision_weight_bytes(reader, size, 2**30)[1] - vision_weight_bytes(reader, size, 0)[1]
    assert none.weights == llm.stat().st_size + vision_weight_bytes(reader, size, 0)[0]
    # a server's sequences: each of n_ctx positions (at most the trained context), their KV caches side by side
    four = estimate_memory(llm, mmproj, n_ctx=256, kv_cache_type=KVCacheType.F16, n_seq=4)
    assert (four.n_ctx, four.kv_cache) == (4 * none.n_ctx, 4 * none.kv_cache) and none.n_ctx == 256


def test_tiles_together_equal_tiles_alone(tmp_path: Path) -> None:
    """An image's tiles go through the tower together, a layer at a time: each tile's features are
    exactly what it gives alone, with or without the cache, on quantized weights too."""
    case = Case(-2, SelectStrategy.DEFAULT, weights="q8_0")
    path = tmp_path / "mmproj.gguf"
    write_mmproj(path, store(gguf_tensors(tiny_llava(case), 2), "q8_0"), 2, case)
    tiles = np.random.default_rng(4).standard_normal((3, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    together = NumpyVisionEncoder.from_gguf(path, cache_bytes=0).encode(tiles)
    cached = NumpyVisionEncoder.from_gguf(path)
    alone = np.concatenate([cached.encode(tiles[i:i + 1]) for i in range(3)])
    np.testing.assert_array_equal(together, alone)
    np.testing.assert_array_equal(cached.encode(tiles), together)
