"""The prompt cache on disk: a later run restores the KV state of the prompt up to its last image, with the
same logits and answers as a fresh prefill (and as transformers), keyed by what the positions hold."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import seed_probe_cache
from PIL import Image
from test_runtime import EXACT, GREEDY, random_image, reference_run

from llava_gguf.llm.templates import Message, Role, user_text
from llava_gguf.model import LlavaModel, RuntimeOptions

QUESTION = "What is in the picture?"


@pytest.fixture(scope="module")
def pair(f32_pair):
    """A LLaVA 1.6 llava-hf checkpoint (images of several hundred positions) and its F32 GGUF pair."""
    return f32_pair("1.6", "llava-hf", "llama")


def cached(directory: Path, **changes) -> RuntimeOptions:
    return replace(EXACT, prompt_cache=True, prompt_cache_dir=directory, **changes)


def ask(llm: Path, mmproj: Path, options: RuntimeOptions, question: str, images: list) -> tuple[LlavaModel, list[int]]:
    model = LlavaModel(llm, mmproj, options)
    chat = model.chat()
    "".join(chat.send(question, images, GREEDY))
    return model, chat.last_tokens


def prompt_of(model: LlavaModel, question: str, n_images: int) -> str:
    return model.render([Message(Role.USER, user_text(question, n_images))])


def test_a_later_run_restores_the_image_prefix_exactly(pair, tmp_path: Path) -> None:
    ckpt, llm, mmproj = pair
    image = random_image(90, 50, seed=21)
    first, first_tokens = ask(llm, mmproj, cached(tmp_path), QUESTION, [image])
    assert first.timings.n_restored == 0 and first.prompt_cache.saved == 1
    assert len(list(tmp_path.glob("*.kv"))) == 1
    prompt = first.chat().model.render([Message(Role.USER, user_text(QUESTION, 1))])
    fresh_logits = LlavaModel(llm, mmproj, EXACT).prompt_logits(prompt, [image])
    first.close()

    second = LlavaModel(llm, mmproj, cached(tmp_path))
    restored_logits = second.prompt_logits(prompt, [image])
    n_image = second.count_image_tokens(image)
    assert second.timings.n_restored >= n_image  # the image's positions came from disk
    assert second.timings.n_images_encoded == 0  # and its features were never needed
    assert np.array_equal(restored_logits, fresh_logits)  # bit-identical (max |diff| 0)
    chat = second.chat()
    "".join(chat.send(QUESTION, [image], GREEDY))
    assert chat.last_tokens == first_tokens == reference_run(ckpt, prompt, [image])[1]


def test_a_follow_up_question_about_the_same_photo(pair, tmp_path: Path) -> None:
    """The prefix through the image is shared by every question about it (and by `chat` with `/image`)."""
    ckpt, llm, mmproj = pair
    image = random_image(70, 60, seed=22)
    ask(llm, mmproj, cached(tmp_path), "Describe it.", [image])[0].close()
    model, tokens = ask(llm, mmproj, cached(tmp_path), "What colour is it?", [image])
    assert model.timings.n_restored > 0
    assert tokens == reference_run(ckpt, prompt_of(model, "What colour is it?", 1), [image])[1]


def test_two_images_of_equal_token_count_never_share_an_entry(pair, tmp_path: Path) -> None:
    ckpt, llm, mmproj = pair
    a, b = random_image(90, 50, seed=23), random_image(90, 50, seed=24)
    model_a, _ = ask(llm, mmproj, cached(tmp_path), QUESTION, [a])
    assert model_a.count_image_tokens(a) == model_a.count_image_tokens(b)
    model_b, tokens_b = ask(llm, mmproj, cached(tmp_path), QUESTION, [b])
    assert model_b.timings.n_restored == 0 and model_b.timings.n_images_encoded == 1
    assert tokens_b == reference_run(ckpt, prompt_of(model_b, QUESTION, 1), [b])[1]
    assert len(list(tmp_path.glob("*.kv"))) == 2


def test_two_images_restore_through_the_second(pair, tmp_path: Path) -> None:
    ckpt, llm, mmproj = pair
    images = [random_image(90, 50, seed=25), random_image(40, 100, seed=26)]
    ask(llm, mmproj, cached(tmp_path), "Compare them.", images)[0].close()
    model, tokens = ask(llm, mmproj, cached(tmp_path), "Which is brighter?", images)
    assert model.timings.n_restored >= sum(model.count_image_tokens(i) for i in images)
    assert tokens == reference_run(ckpt, prompt_of(model, "Which is brighter?", 2), images)[1]


def test_a_truncated_or_corrupt_entry_is_removed_and_never_loaded(pair, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    ckpt, llm, mmproj = pair
    image = random_image(90, 50, seed=27)
    _, expected = ask(llm, mmproj, cached(tmp_path), QUESTION, [image])
    (entry,) = tmp_path.glob("*.kv")
    data = entry.read_bytes()
    for damaged, why in ((data[: len(data) // 2], "truncated"), (data[:-10] + b"\0" * 10, "checksum")):
        entry.write_bytes(damaged)
        with caplog.at_level(logging.WARNING, logger="llava_gguf.llm.prompt_cache"):
            caplog.clear()
            model, tokens = ask(llm, mmproj, cached(tmp_path), QUESTION, [image])
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and why in warnings[0] and "removed" in warnings[0]
        assert model.timings.n_restored == 0 and tokens == expected
        assert entry.is_file() and entry.read_bytes() == data  # decoded again and saved afresh


def test_an_unwritable_cache_directory_runs_without_caching(pair, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    ckpt, llm, mmproj = pair
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    image = random_image(90, 50, seed=28)
    with caplog.at_level(logging.WARNING, logger="llava_gguf.llm.prompt_cache"):
        model, tokens = ask(llm, mmproj, cached(blocker / "prompts"), QUESTION, [image])
        "".join(model.chat().send("Again?", [image], GREEDY))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "prompt cache off for this run" in warnings[0]
    assert tokens == reference_run(ckpt, prompt_of(model, QUESTION, 1), [image])[1]


def test_eviction_keeps_the_cache_under_its_bound(pair, tmp_path: Path) -> None:
    _, llm, mmproj = pair
    images = [random_image(90, 50, seed=30 + i) for i in range(3)]
    ask(llm, mmproj, cached(tmp_path), QUESTION, [images[0]])[0].close()
    one = sum(p.stat().st_size for p in tmp_path.glob("*.kv"))
    small = cached(tmp_path, prompt_cache_max_bytes=int(one * 2.5))
    for image in images[1:]:
        ask(llm, mmproj, small, QUESTION, [image])[0].close()
    assert len(list(tmp_path.glob("*.kv"))) == 2  # the oldest went
    # the survivors are the two latest: asking about the first image again decodes it
    model, _ = ask(llm, mmproj, small, QUESTION, [images[0]])
    assert model.timings.n_restored == 0
    model, _ = ask(llm, mmproj, small, QUESTION, [images[2]])
    assert model.timings.n_restored > 0


def test_a_changed_llm_file_is_not_restored(pair, tmp_path: Path) -> None:
    _, llm, mmproj = pair
    copy = tmp_path / "llm-copy.gguf"
    copy.write_bytes(llm.read_bytes())
    image = random_image(90, 50, seed=33)
    cache_dir = tmp_path / "prompts"
    ask(copy, mmproj, cached(cache_dir), QUESTION, [image])[0].close()
    os.utime(copy, ns=(copy.stat().st_atime_ns, copy.stat().st_mtime_ns + 10**9))  # edited, say
    model, _ = ask(copy, mmproj, cached(cache_dir), QUESTION, [image])
    assert model.timings.n_restored == 0
    other = cached(cache_dir, llama=replace(EXACT.llama, n_batch=256))  # another batch size: other values
    model, _ = ask(copy, mmproj, other, QUESTION, [image])
    assert model.timings.n_restored == 0


def _cli(*args: str, cache: Path) -> Any:
    env = {**os.environ, "LLAVA_GGUF_CACHE": str(cache)}
    env.pop("LLAVA_GGUF_MODEL", None)
    done = subprocess.run([sys.executable, "-m", "llava_gguf.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout) if "--json" in args else {"stdout": done.stdout}


def test_two_processes_in_a_row_and_the_cache_command(pair, tmp_path: Path) -> None:
    ckpt, llm, mmproj = pair
    cache = tmp_path / "cache"
    seed_probe_cache(cache)
    image = tmp_path / "photo.png"
    random_image(90, 50, seed=34).save(image)
    args = ["ask", "--llm", str(llm), "--mmproj", str(mmproj), "-i", str(image), "--temp", "0", "-n", "16",
            "--kv-cache-type", "f32", "--flash-attn", "off", "-t", "2", "--encoder", "numpy", "--json", QUESTION]
    first = _cli(*args, cache=cache)
    second = _cli(*args, cache=cache)
    assert first["timings"]["n_restored"] == 0 and second["timings"]["n_restored"] > 0
    assert second["timings"]["n_prefilled"] + second["timings"]["n_restored"] == second["n_prompt_tokens"]
    pil = Image.open(image).convert("RGB")
    assert first["tokens"] == second["tokens"] == reference_run(ckpt, first["prompt"], [pil])[1]
    no_cache = _cli(*args, "--no-cache", cache=cache)
    assert no_cache["timings"]["n_restored"] == 0 and no_cache["tokens"] == first["tokens"]

    info = {row["cache"]: row for row in _cli("cache", "info", "--json", cache=cache)}
    assert info["prompt KV states"]["entries"] == 1 and info["image features"]["entries"] == 1
    cleared = _cli("cache", "clear", cache=cache)["stdout"]
    assert "prompt KV states: removed 1 entries" in cleared
    info = {row["cache"]: row for row in _cli("cache", "info", "--json", cache=cache)}
    assert info["prompt KV states"]["entries"] == 0 and info["image features"]["entries"] == 0
