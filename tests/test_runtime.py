"""The runtime against transformers on the same weights: features, logits, greedy answers, chat."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import TinyCheckpoint
from PIL import Image

from llava_gguf.convert import ConvertOptions, MmprojType, Quant, convert_checkpoint
from llava_gguf.llm.llama import KVCacheType, LlamaOptions
from llava_gguf.llm.sampling import SamplingOptions
from llava_gguf.llm.templates import Message, Role, user_text
from llava_gguf.model import EncoderChoice, GenerationOptions, LlavaModel, RuntimeOptions

CASES = [
    pytest.param(("1.5", "llava-hf", "llama"), id="hf-1.5"),
    pytest.param(("1.5", "original", "llama"), id="orig-1.5"),
    pytest.param(("1.6", "llava-hf", "mistral"), id="hf-1.6-mistral"),
    pytest.param(("1.6", "original", "llama"), id="orig-1.6"),
]
GREEDY = GenerationOptions(max_tokens=16, sampling=SamplingOptions(temperature=0.0))
# the prompt cache off: these tests count what each run decodes (test_prompt_cache.py tests the cache)
EXACT = RuntimeOptions(llama=LlamaOptions(kv_cache_type=KVCacheType.F32, flash_attn=False, n_threads=2),
                       encoder=EncoderChoice.NUMPY, prompt_cache=False)


def random_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    # smooth-ish content so resizing matters
    base = rng.integers(0, 256, (max(1, height // 8), max(1, width // 8), 3), dtype=np.uint8)
    return Image.fromarray(base).resize((width, height), Image.BILINEAR)


@pytest.fixture(scope="module")
def pair(tiny_checkpoint: Callable[..., TinyCheckpoint], tmp_path_factory: pytest.TempPathFactory):
    cache: dict[tuple, tuple[TinyCheckpoint, LlavaModel]] = {}

    def make(case: tuple) -> tuple[TinyCheckpoint, LlavaModel]:
        if case not in cache:
            version, layout, llm = case
            ckpt = tiny_checkpoint(llava_version=version, layout=layout, llm=llm)
            out = tmp_path_factory.mktemp("gguf")
            result = convert_checkpoint(ckpt.path, out, ConvertOptions(quant=Quant.F32, mmproj_type=MmprojType.F32))
            cache[case] = ckpt, LlavaModel(result.llm, result.mmproj, EXACT)
        return cache[case]

    return make


# ---------------------------------------------------------------- the reference


def reference_pixels(ckpt: TinyCheckpoint, images: list[Image.Image]) -> dict[str, torch.Tensor]:
    out = ckpt.image_processor(images, return_tensors="pt")
    inputs = {"pixel_values": out["pixel_values"]}
    if "image_sizes" in out:
        inputs["image_sizes"] = out["image_sizes"]
    return inputs


def reference_features(ckpt: TinyCheckpoint, images: list[Image.Image]) -> list[np.ndarray]:
    with torch.no_grad():
        feats = ckpt.model.model.get_image_features(**reference_pixels(ckpt, images)).pooler_output
    return [f.reshape(-1, f.shape[-1]).numpy() for f in feats]


def reference_ids(ckpt: TinyCheckpoint, prompt: str, counts: list[int]) -> list[int]:
    """input_ids as the reference builds them, each image expanded to its feature count.

    llava-hf (LlavaProcessor): the whole prompt in one pass, ``<image>`` a token of its own.
    original (``tokenizer_image_token``): every chunk tokenized on its own, its BOS dropped.
    """
    if ckpt.layout == "llava-hf":
        whole = list(ckpt.tokenizer(prompt).input_ids)
        assert whole.count(ckpt.image_token_id) == len(counts)
        queue = iter(counts)
        return [t for tok in whole for t in ([tok] * next(queue) if tok == ckpt.image_token_id else [tok])]
    chunks = prompt.split("<image>")
    ids = list(ckpt.tokenizer(chunks[0]).input_ids)
    for n, chunk in zip(counts, chunks[1:]):
        ids += [ckpt.placeholder_id] * n
        ids += ckpt.tokenizer(chunk).input_ids[1:]
    return ids


def reference_run(ckpt: TinyCheckpoint, prompt: str, images: list[Image.Image], max_new: int = 16):
    counts = [len(f) for f in reference_features(ckpt, images)] if images else []
    ids = torch.tensor([reference_ids(ckpt, prompt, counts)])
    # an explicit mask: the original layout's placeholder id is also the pad id
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              **(reference_pixels(ckpt, images) if images else {})}
    with torch.no_grad():
        logits = ckpt.model(**inputs).logits[0, -1].numpy()
        generated = ckpt.model.generate(**inputs, max_new_tokens=max_new, do_sample=False, eos_token_id=2,
                                        pad_token_id=0)[0, ids.shape[1]:].tolist()
    if 2 in generated:
        generated = generated[: generated.index(2)]
    return logits, generated, counts


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("case", CASES[:3])  # original-layout LLaVA 1.6 follows the original code: test_original.py
@pytest.mark.parametrize("size", [(90, 50), (30, 120), (56, 56), (1, 1), (400, 300)])
def test_packed_features_match(pair, case, size) -> None:
    ckpt, model = pair(case)
    image = random_image(*size, seed=size[0])
    ours = model.image_features(image)
    (ref,) = reference_features(ckpt, [image])
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-3


def _prompt(model: LlavaModel, question: str, n_images: int) -> str:
    return model.render([Message(Role.USER, user_text(question, n_images))])


@pytest.mark.parametrize("case", CASES)
def test_one_image_logits_and_greedy_answer(pair, case) -> None:
    ckpt, model = pair(case)
    image = random_image(90, 50, seed=1)
    prompt = _prompt(model, "What is in the picture?", 1)
    ref_logits, ref_tokens, counts = reference_run(ckpt, prompt, [image])
    ours = model.prompt_logits(prompt, [image])
    assert np.abs(ours - ref_logits).max() <= 2e-3
    chat = model.chat()
    "".join(chat.send("What is in the picture?", [image], GREEDY))
    assert chat.last_prompt == prompt
    assert model.timings.n_image_tokens == counts
    assert chat.last_tokens == ref_tokens
    assert len(ref_tokens) == 16 or len(chat.last_tokens) == len(ref_tokens)


@pytest.mark.parametrize("case", [CASES[0], CASES[3]])
def test_two_images(pair, case) -> None:
    ckpt, model = pair(case)
    images = [random_image(90, 50, seed=2), random_image(40, 100, seed=3)]
    prompt = _prompt(model, "Compare the two pictures.", 2)
    ref_logits, ref_tokens, counts = reference_run(ckpt, prompt, images)
    ours = model.prompt_logits(prompt, images)
    assert np.abs(ours - ref_logits).max() <= 2e-3
    chat = model.chat()
    "".join(chat.send("Compare the two pictures.", images, GREEDY))
    assert chat.last_tokens == ref_tokens


@pytest.mark.parametrize("case", [CASES[1], CASES[2]])
def test_second_turn_reuses_cache(pair, case) -> None:
    ckpt, model = pair(case)
    image = random_image(70, 60, seed=4)
    chat = model.chat()
    "".join(chat.send("What is in the picture?", [image], GREEDY))
    first = model.timings
    assert first.n_images_encoded == 1
    "".join(chat.send("And what colour is it?", [], GREEDY))
    second = model.timings
    assert second.n_images_encoded == 0
    # only what follows the cached prefix was decoded again
    assert second.n_prefilled < second.n_prompt_tokens - first.n_prompt_tokens + first.n_generated + 2
    prompt = chat.last_prompt
    assert prompt == model.render(chat.messages[:-1])
    ref_logits, ref_tokens, _ = reference_run(ckpt, prompt, [image])
    assert chat.last_tokens == ref_tokens
    ours = model.prompt_logits(prompt, [image])
    assert np.abs(ours - ref_logits).max() <= 2e-3


def test_context_overflow_is_caught_before_any_work(pair, tmp_path: Path) -> None:
    from llava_gguf.errors import ContextOverflowError

    ckpt, exact = pair(CASES[2].values[0])
    small = LlavaModel(exact.llm_path, exact.mmproj_path,
                       RuntimeOptions(llama=LlamaOptions(n_ctx=64, kv_cache_type=KVCacheType.F32, flash_attn=False)))
    image = random_image(400, 300, seed=5)
    assert small.count_image_tokens(image) > 64
    with pytest.raises(ContextOverflowError, match=r"need \d+ tokens but the context holds 64"):
        "".join(small.chat().send("Describe.", [image], GREEDY))
    assert small.timings.n_images_encoded == 0
    assert small.timings.vision_encode_s == 0.0


def test_feature_cache_across_runs(pair, tmp_path: Path) -> None:
    ckpt, exact = pair(CASES[0].values[0])
    options = RuntimeOptions(llama=EXACT.llama, cache_dir=tmp_path / "features")
    image = random_image(90, 50, seed=6)
    first = LlavaModel(exact.llm_path, exact.mmproj_path, options)
    features = first.image_features(image)
    assert first.timings.n_images_encoded == 1
    second = LlavaModel(exact.llm_path, exact.mmproj_path, options)
    again = second.image_features(image)
    assert second.timings.n_images_encoded == 0 and second.cache.hits == 1
    np.testing.assert_array_equal(features, again)


def _odd_image(kind: str, path: Path) -> Path:
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (48, 72, 3), dtype=np.uint8)
    if kind == "cmyk.jpg":
        Image.fromarray(rgb).convert("CMYK").save(path)
    elif kind == "16bit.png":
        Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(path)  # mode I;16
    elif kind == "alpha.png":
        Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (48, 72), dtype=np.uint8)])).save(path)
    elif kind == "animated.gif":
        frames = [Image.fromarray(rgb), Image.fromarray(255 - rgb)]
        frames[0].save(path, save_all=True, append_images=frames[1:])
    return path


@pytest.mark.parametrize("kind", ["cmyk.jpg", "16bit.png", "alpha.png", "animated.gif"])
def test_odd_images_match_the_reference(pair, tmp_path: Path, kind: str) -> None:
    from transformers.image_utils import load_image as hf_load_image

    ckpt, model = pair(CASES[2].values[0])
    path = _odd_image(kind, tmp_path / kind)
    ours = model.image_features(path)
    # the reference processor converts what transformers' own loader opens (first frame, EXIF)
    (ref,) = reference_features(ckpt, [Image.open(path) if kind != "animated.gif" else hf_load_image(str(path))])
    assert np.abs(ours - ref).max() <= 1e-3


@pytest.mark.parametrize("content", [b"not an image", b"", b"\xff\xd8\xff\xe0" + b"\x00" * 20])
def test_bad_images_are_clear_errors(pair, tmp_path: Path, content: bytes) -> None:
    from llava_gguf.errors import ImageError

    _, model = pair(CASES[0].values[0])
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageError) as info:
        "".join(model.chat().send("Describe.", [path], GREEDY))
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_image_in_a_later_turn(pair) -> None:
    """A second message may bring its own image: the reference sees both, in order."""
    ckpt, model = pair(CASES[3].values[0])
    first, second = random_image(80, 60, seed=8), random_image(50, 90, seed=9)
    chat = model.chat()
    "".join(chat.send("What is in the picture?", [first], GREEDY))
    "".join(chat.send("And in this one?", [second], GREEDY))
    assert model.timings.n_images_encoded == 1  # only the new image
    assert chat.last_prompt.count("<image>") == 2
    _, ref_tokens, _ = reference_run(ckpt, chat.last_prompt, [first, second])
    assert chat.last_tokens == ref_tokens


def test_low_memory_features_are_the_same(pair) -> None:
    """Low memory keeps no f32 vision weights and releases the mapped ones between images: same features."""
    ckpt, exact = pair(CASES[2].values[0])
    low = LlavaModel(exact.llm_path, exact.mmproj_path,
                     RuntimeOptions(llama=EXACT.llama, encoder=EncoderChoice.NUMPY, low_memory=True))
    for seed, size in ((10, (90, 50)), (11, (60, 120))):
        image = random_image(*size, seed=seed)
        "".join(low.chat().send("Describe.", [image], GenerationOptions(max_tokens=1)))
        (ref,) = reference_features(ckpt, [image])
        assert np.abs(low.image_features(image) - ref).max() <= 1e-3


def test_context_grows_with_the_conversation(pair) -> None:
    ckpt, exact = pair(CASES[3].values[0])
    model = LlavaModel(exact.llm_path, exact.mmproj_path, EXACT)
    chat = model.chat()
    "".join(chat.send("Hello?", [], GREEDY))
    small = model.runtime.n_ctx
    images = [random_image(400, 300, seed=12), random_image(300, 400, seed=13)]
    "".join(chat.send("Compare these.", images, GREEDY))
    assert model.runtime.n_ctx >= 2 * small
    assert model.runtime.n_ctx >= model.timings.n_prompt_tokens + GREEDY.max_tokens
    _, ref_tokens, _ = reference_run(ckpt, chat.last_prompt, images)
    assert chat.last_tokens == ref_tokens


def test_the_readme_api_imports_from_the_package() -> None:
    """The README's `from llava_gguf import ...` gives the runtime's own classes; importing the
    package alone (as the converter and the errors do) does not load llama.cpp."""
    import subprocess
    import sys

    import llava_gguf

    assert llava_gguf.LlavaModel is LlavaModel and llava_gguf.RuntimeOptions is RuntimeOptions
    assert llava_gguf.GenerationOptions is GenerationOptions and llava_gguf.SamplingOptions is SamplingOptions
    assert llava_gguf.LlamaOptions is LlamaOptions and llava_gguf.KVCacheType is KVCacheType
    assert set(llava_gguf.__all__) >= {"LlavaModel", "RuntimeOptions", "GenerationOptions", "LlamaOptions"}
    code = "import sys, llava_gguf, llava_gguf.errors; print('llama_cpp' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
