"""Session fixtures: one trained SentencePiece model, tiny checkpoints cached per arguments."""

from __future__ import annotations

import math
import os
import shutil
import tempfile

# No network in tests, and no writes to the user's caches: set before anything imports huggingface_hub.
_CACHE_ROOT = tempfile.mkdtemp(prefix="llava-gguf-tests-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = os.path.join(_CACHE_ROOT, "hf")
os.environ["XDG_CACHE_HOME"] = os.path.join(_CACHE_ROOT, "xdg")
os.environ["LLAVA_GGUF_CACHE"] = os.path.join(_CACHE_ROOT, "llava-gguf")

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# tests/ has no __init__.py, so pytest's default "prepend" import mode puts it on sys.path.
from checkpoints import TinyCheckpoint, build_checkpoint, build_family_checkpoint, train_byte_level_bpe, train_tokenizer

FAMILIES = ("llama3", "phi3", "qwen2")


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained sentencepiece .model shared by every tiny checkpoint of the session."""
    return train_tokenizer(tmp_path_factory.mktemp("sentencepiece"))


@pytest.fixture(scope="session")
def tiny_checkpoint(
    tmp_path_factory: pytest.TempPathFactory, sp_model: Path
) -> Callable[..., TinyCheckpoint]:
    """Factory: ``tiny_checkpoint(llava_version="1.5", layout="llava-hf", llm="llama", **options)``; ``llm``
    "llama3", "phi3" or "qwen2" gives a llava-hf checkpoint of that LLM (``build_family_checkpoint``).

    Options are those of ``build_checkpoint`` (spelling, save_dtype, max_shard_size,
    tokenizer_files, seed). Builds are cached per argument tuple for the session, so
    treat the returned checkpoint (files and reference model) as read-only.
    """
    cache: dict[tuple[Any, ...], TinyCheckpoint] = {}

    bpe: list[Any] = []  # the byte-level BPE tokenizer, trained once when a Llama-3 checkpoint is asked for

    def make(llava_version: str = "1.5", layout: str = "llava-hf", llm: str = "llama",
             **options: Any) -> TinyCheckpoint:
        key = (llava_version, layout, llm, tuple(sorted(options.items(), key=lambda kv: kv[0])))
        if key not in cache:
            root = tmp_path_factory.mktemp(f"tiny-{layout}-{llava_version}-{llm}")
            if llm in FAMILIES:  # llava-hf checkpoints of the LLaVA family's other LLMs
                if llm == "llama3" and not bpe:
                    bpe.append(train_byte_level_bpe(tmp_path_factory.mktemp("byte-level-bpe")))
                cache[key] = build_family_checkpoint(root, family=llm, llava_version=llava_version,
                                                     sp_model_path=sp_model, bpe=bpe[0] if bpe else None, **options)
            else:
                cache[key] = build_checkpoint(root, llava_version=llava_version, layout=layout, llm=llm,
                                              sp_model_path=sp_model, **options)
        return cache[key]

    return make


_SESSION_CACHE = Path(os.environ["LLAVA_GGUF_CACHE"])


def seed_probe_cache(root: Path) -> None:
    """Give a fresh cache root the encoders' probe verdicts, computed once per session (each ggml
    probe runs a CLIP-L-wide block through two encoders, about a second), for the thread counts the
    tests use."""
    from llava_gguf.llm.repack import choose_repack
    from llava_gguf.vision.choose import probe_ggml
    from llava_gguf.vision.ggml_lib import load_ggml
    from llava_gguf.vision.mtmd_encoder import probe_mtmd

    probe_mtmd(_SESSION_CACHE)
    for threads in (None, 1, 2):  # cached even if the machine is busy (tests run beside other work)
        probe_ggml(load_ggml(), _SESSION_CACHE, n_threads=threads, busy_cores=math.inf)
        choose_repack(threads or os.cpu_count() or 2, _SESSION_CACHE, busy_cores=math.inf)
    root.mkdir(parents=True, exist_ok=True)
    for verdicts in _SESSION_CACHE.glob("*-probe.json"):
        shutil.copyfile(verdicts, root / verdicts.name)


@pytest.fixture(scope="session")
def f32_pair(tiny_checkpoint: Callable[..., TinyCheckpoint], tmp_path_factory: pytest.TempPathFactory):
    """Factory: ``f32_pair(llava_version, layout, llm)`` -> (checkpoint, LLM GGUF, mmproj GGUF), converted
    to F32 once per session (the exact comparisons' files)."""
    from llava_gguf.convert import ConvertOptions, MmprojType, Quant, convert_checkpoint

    cache: dict[tuple[str, str, str], tuple[TinyCheckpoint, Path, Path]] = {}

    def make(llava_version: str = "1.5", layout: str = "llava-hf", llm: str = "llama") -> tuple[TinyCheckpoint, Path, Path]:
        key = (llava_version, layout, llm)
        if key not in cache:
            ckpt = tiny_checkpoint(llava_version=llava_version, layout=layout, llm=llm)
            out = tmp_path_factory.mktemp(f"gguf-f32-{llava_version}-{layout}-{llm}")
            result = convert_checkpoint(ckpt.path, out, ConvertOptions(quant=Quant.F32, mmproj_type=MmprojType.F32))
            cache[key] = ckpt, result.llm, result.mmproj
        return cache[key]

    return make
