"""llama.cpp's libmtmd against transformers on the same weights, and the probe that judges it.

Everything runs the real libmtmd of the installed llama-cpp-python; the reference features come
from transformers' ``get_image_features``, and libmtmd's documented deviation (class token after
the patches, tanh-GELU) is rebuilt from the reference model's own modules.
"""

from __future__ import annotations

import ctypes
import io
import logging
from collections.abc import Callable
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
import torch
from checkpoints import TinyCheckpoint
from llama_cpp import mtmd_cpp
from PIL import Image

from llava_gguf.convert import ConvertOptions, MmprojType, Quant, convert_checkpoint
from llava_gguf.errors import ImageError
from llava_gguf.image.preprocess import normalize_tile, preprocess
from llava_gguf.llm.llama import LlamaRuntime
from llava_gguf.metadata import VisionSettings, read_gguf
from llava_gguf.vision import NumpyVisionEncoder
from llava_gguf.vision.choose import choose_encoder
from llava_gguf.vision.ggml_encoder import GgmlVisionEncoder
from llava_gguf.vision.mtmd_encoder import (
    PROBE_TOLERANCE,
    MtmdVisionEncoder,
    encode_bitmap,
    probe_mtmd,
    probe_run_count,
    tiles_to_pixels,
)


class Converted:
    def __init__(self, ckpt: TinyCheckpoint, out: Path) -> None:
        result = convert_checkpoint(ckpt.path, out, ConvertOptions(quant=Quant.F32, mmproj_type=MmprojType.F32))
        self.ckpt, self.mmproj = ckpt, result.mmproj
        self.runtime = LlamaRuntime(result.llm)
        self.settings = VisionSettings.read(read_gguf(result.mmproj))


@pytest.fixture(scope="module")
def converted(tiny_checkpoint: Callable[..., TinyCheckpoint], tmp_path_factory: pytest.TempPathFactory):
    cache: dict[str, Converted] = {}

    def make(version: str) -> Converted:
        if version not in cache:
            ckpt = tiny_checkpoint(llava_version=version, layout="llava-hf")
            cache[version] = Converted(ckpt, tmp_path_factory.mktemp(f"mtmd-{version}"))
        return cache[version]

    yield make
    for c in cache.values():
        c.runtime.close()


# libmtmd against the formula above: f16 rounding through two blocks, features of size about 10
FORMULA_TOLERANCE = 5e-3


def tile_pixels(size: int, seed: int) -> np.ndarray:
    """A random uint8 RGB tile [S, S, 3] with both extremes present."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    pixels[0, 0], pixels[-1, -1] = 0, 255
    return pixels


# ---------------------------------------------------------------- the references


def reference_features(ckpt: TinyCheckpoint, pixel_values: torch.Tensor) -> np.ndarray:
    """transformers' features of one LLaVA 1.5 tile [1, 3, S, S] -> [n_patches, llm_hidden]."""
    with torch.no_grad():
        feats = ckpt.model.model.get_image_features(pixel_values=pixel_values).pooler_output
    return feats[0].reshape(-1, feats[0].shape[-1]).numpy()


def _ggml_table(fn: Callable[[torch.Tensor], torch.Tensor], clamp: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """ggml's CPU activations read an f16 table at the f16-rounded input (GGML_GELU_FP16);
    its GELU passes |x| >= 10 through (x) or to 0."""

    def act(x: torch.Tensor) -> torch.Tensor:
        y = fn(x.half().float()).half().float()
        if clamp:
            y = torch.where(x >= 10, x, torch.where(x <= -10, torch.zeros_like(x), y))
        return y

    return act


def libmtmd_formula(ckpt: TinyCheckpoint, pixel_values: torch.Tensor) -> np.ndarray:
    """What libmtmd computes, from the reference modules: the class token after the patches but the
    positions in order, so patch i gets position i; patch 0 dropped; tanh-GELU in the projector.
    Plus ggml's f16 steps: the patch convolution (im2col) and the activation tables."""
    model = ckpt.model.model
    tower = getattr(model.vision_tower, "vision_model", model.vision_tower)  # transformers 4 nests it
    n_layers = len(tower.encoder.layers)
    layer = model.config.vision_feature_layer
    n_run = layer if layer >= 0 else n_layers + 1 + layer
    quick_gelu = _ggml_table(lambda x: x * torch.sigmoid(1.702 * x), clamp=False)
    tanh_gelu = _ggml_table(lambda x: torch.nn.functional.gelu(x, approximate="tanh"), clamp=True)
    with torch.no_grad():
        conv = tower.embeddings.patch_embedding
        weight = conv.weight.half().float()
        patches = torch.nn.functional.conv2d(pixel_values.half().float(), weight, stride=conv.stride)  # [1, H, g, g]
        patches = patches.flatten(2).transpose(1, 2)  # [1, H, g, g] -> [1, g*g, H]
        cls = tower.embeddings.class_embedding.reshape(1, 1, -1)  # [1, 1, H]
        x = torch.cat([patches, cls], dim=1) + tower.embeddings.position_embedding.weight[None]  # [1, n + 1, H]
        x = tower.pre_layrnorm(x)
        for block in tower.encoder.layers[:n_run]:
            h = block.self_attn(block.layer_norm1(x), None)[0]
            x = x + h
            m = block.mlp
            x = x + m.fc2(quick_gelu(m.fc1(block.layer_norm2(x))))
        x = x[:, 1:]  # [1, n + 1, H] -> [1, n, H]: patches 1.. then the class token
        proj = model.multi_modal_projector
        y = proj.linear_2(tanh_gelu(proj.linear_1(x)))
    return y[0].numpy()


def libmtmd_helper_features(c: Converted, pixels: np.ndarray) -> np.ndarray:
    """libmtmd's own path from an image file: ``mtmd_helper_bitmap_init_from_buf`` on a PNG."""
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    data = png.getvalue()
    params = mtmd_cpp.mtmd_context_params_default()
    params.use_gpu, params.print_timings, params.warmup, params.n_threads = False, False, False, 1
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = mtmd_cpp.mtmd_init_from_file(str(c.mmproj).encode(), c.runtime.model.model, params)
    assert ctx
    buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    bitmap = mtmd_cpp.mtmd_helper_bitmap_init_from_buf(ctx, buf, len(data), False)
    chunks = mtmd_cpp.mtmd_input_chunks_init()
    try:
        n = (c.settings.image_size // c.settings.patch_size) ** 2
        return encode_bitmap(ctx, bitmap, chunks, mtmd_cpp.mtmd_default_marker(), n, c.runtime.n_embd)
    finally:
        mtmd_cpp.mtmd_input_chunks_free(chunks)
        mtmd_cpp.mtmd_bitmap_free(bitmap)
        mtmd_cpp.mtmd_free(ctx)


def reference_tile(c: Converted, pixels: np.ndarray) -> torch.Tensor:
    """The reference processor's pixel_values [1, 3, S, S] of a tile-sized image (left unchanged)."""
    pixel_values = c.ckpt.image_processor(Image.fromarray(pixels), return_tensors="pt")["pixel_values"]
    assert np.array_equal(tiles_to_pixels(pixel_values.numpy(), c.settings)[0], pixels)
    return pixel_values


# ---------------------------------------------------------------- tests


def test_probe_verdict_agrees_with_transformers(converted, tmp_path: Path) -> None:
    c = converted("1.5")
    pixels = tile_pixels(c.settings.image_size, seed=0)
    pixel_values = reference_tile(c, pixels)
    ours = libmtmd_helper_features(c, pixels)
    reference = reference_features(c.ckpt, pixel_values)
    diff = float(np.abs(ours - reference).max())
    verdict = probe_mtmd(tmp_path)
    assert verdict.ok == (diff <= PROBE_TOLERANCE * np.abs(reference).max()), (verdict, diff)
    if not verdict.ok:
        # and it is the documented deviation, not some other one
        assert np.abs(ours - libmtmd_formula(c.ckpt, pixel_values)).max() <= FORMULA_TOLERANCE
        assert "issue 25814" in verdict.reason
        assert verdict.max_abs_diff > 1.0  # the probe tower sees the same gross error


def test_verdict_is_cached_per_library(tmp_path: Path) -> None:
    before = probe_run_count()
    first = probe_mtmd(tmp_path)
    assert probe_run_count() == before + 1
    assert (tmp_path / "mtmd-probe.json").is_file()
    second = probe_mtmd(tmp_path)
    assert probe_run_count() == before + 1  # no second libmtmd run
    assert second == first
    assert first.seconds < 2.0


def test_auto_picks_the_reference(converted, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    c = converted("1.5")
    verdict = probe_mtmd(tmp_path)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="llava_gguf.vision.choose"):
        encoder, name, reason = choose_encoder("auto", c.mmproj, c.runtime.model.model, cache_dir=tmp_path)
    records = [r for r in caplog.records if r.name == "llava_gguf.vision.choose"]
    assert len(records) == 1 and records[0].getMessage() == reason
    if verdict.ok:
        assert (name, type(encoder)) == ("mtmd", MtmdVisionEncoder)
    else:  # one of the exact encoders, whichever ran the probe tile faster here
        assert (name, type(encoder)) in (("numpy", NumpyVisionEncoder), ("ggml", GgmlVisionEncoder))
        assert "per probe tile" in reason


def test_forced_mtmd_is_libmtmd(converted, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    c = converted("1.5")
    verdict = probe_mtmd(tmp_path)
    with caplog.at_level(logging.WARNING, logger="llava_gguf.vision.choose"):
        encoder, name, reason = choose_encoder("mtmd", c.mmproj, c.runtime.model.model, cache_dir=tmp_path)
    assert name == "mtmd" and isinstance(encoder, MtmdVisionEncoder)
    assert encoder.llm_hidden_size == c.runtime.n_embd and encoder.n_tokens == 16
    if not verdict.ok:
        assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [reason]
    pixels = tile_pixels(c.settings.image_size, seed=1)
    pixel_values = reference_tile(c, pixels)
    ours = encoder.encode(pixel_values.numpy())  # the runtime's normalized tiles
    assert ours.shape == (1, 16, c.runtime.n_embd)
    assert np.array_equal(ours[0], libmtmd_helper_features(c, pixels))
    assert np.abs(ours[0] - libmtmd_formula(c.ckpt, pixel_values)).max() <= FORMULA_TOLERANCE
    encoder.close()


def test_mtmd_encodes_llava16_tiles_one_by_one(converted, tmp_path: Path) -> None:
    """A tile-sized bitmap is never sliced, even with pinpoints: one chunk of n_patches per tile."""
    c = converted("1.6")
    encoder, _, _ = choose_encoder("mtmd", c.mmproj, c.runtime.model.model, cache_dir=tmp_path)
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (90, 150, 3), dtype=np.uint8))
    tiles, _ = preprocess(image, c.settings)  # [n_tiles, 3, S, S]
    assert len(tiles) > 1
    done: list[tuple[int, int]] = []
    ours = encoder.encode(tiles, lambda i, n: done.append((i, n)))
    assert ours.shape == (len(tiles), 16, c.runtime.n_embd)
    assert done == [(i + 1, len(tiles)) for i in range(len(tiles))]
    for tile, features in zip(tiles, ours):
        expected = libmtmd_formula(c.ckpt, torch.from_numpy(tile[None]))
        assert np.abs(features - expected).max() <= FORMULA_TOLERANCE
    assert np.array_equal(encoder.image_newline, NumpyVisionEncoder.from_gguf(c.mmproj).image_newline)
    encoder.close()


def test_tiles_to_pixels_inverts_normalization(converted) -> None:
    settings = converted("1.5").settings
    pixels = np.random.default_rng(3).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    pixels[0, 0, 0] = (0, 128, 255)
    tiles = np.stack([normalize_tile(p, settings) for p in pixels])  # [2, 3, 8, 8]
    assert np.array_equal(tiles_to_pixels(tiles, settings), pixels)
    with pytest.raises(ImageError, match="not normalized uint8 pixels"):
        tiles_to_pixels(tiles + 0.1, settings)
