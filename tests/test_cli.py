"""The command line against the reference (transformers) and against the library's own API."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import checkpoints
import pytest
from checkpoints import TinyCheckpoint, build_checkpoint
from click.testing import CliRunner, Result
from conftest import seed_probe_cache
from PIL import Image
from test_runtime import random_image, reference_run

from llava_gguf.cli import main
from llava_gguf.convert import ConvertOptions, MmprojType, Quant, convert_checkpoint
from llava_gguf.errors import ImageError, ModelLoadError
from llava_gguf.llm.llama import KVCacheType, LlamaOptions
from llava_gguf.llm.sampling import SamplingOptions
from llava_gguf.llm.sequence import IMAGE_TOKEN_INDEX
from llava_gguf.llm.templates import Message, Role, user_text
from llava_gguf.model import GenerationOptions, LlavaModel, RuntimeOptions
from llava_gguf.sources import pick_gguf_files

EXACT_ARGS = ["--kv-cache-type", "f32", "--flash-attn", "off", "-t", "1"]
EXACT = RuntimeOptions(llama=LlamaOptions(kv_cache_type=KVCacheType.F32, flash_attn=False, n_threads=1))
QUESTION = "What is in the picture?"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "llava-gguf-cache"
    seed_probe_cache(root)
    monkeypatch.setenv("LLAVA_GGUF_CACHE", str(root))
    monkeypatch.delenv("LLAVA_GGUF_MODEL", raising=False)
    return root


def run(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=input, env=env)


def json_of(result: Result) -> dict[str, Any]:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def one_error_line(result: Result, code: int = 1) -> str:
    """The failure is one line on stderr (the last; a memory estimate may come before), no traceback."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], result.stderr
    return lines[-1]


class Converted:
    """A tiny checkpoint, its F32 GGUF pair and the library model loaded like the CLI's exact run."""

    def __init__(self, ckpt: TinyCheckpoint, out: Path) -> None:
        result = convert_checkpoint(ckpt.path, out, ConvertOptions(quant=Quant.F32, mmproj_type=MmprojType.F32))
        self.ckpt, self.dir, self.llm, self.mmproj = ckpt, out, result.llm, result.mmproj
        self.model = LlavaModel(result.llm, result.mmproj, EXACT)

    def prompt(self, question: str, n_images: int) -> str:
        return self.model.render([Message(Role.USER, user_text(question, n_images))])


@pytest.fixture(scope="module")
def converted(tiny_checkpoint: Callable[..., TinyCheckpoint], tmp_path_factory: pytest.TempPathFactory):
    cache: dict[str, Converted] = {}

    def make(version: str) -> Converted:
        if version not in cache:
            ckpt = tiny_checkpoint(llava_version=version, layout="llava-hf", llm="llama")
            cache[version] = Converted(ckpt, tmp_path_factory.mktemp(f"gguf-{version}"))
        return cache[version]

    return make


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("images")
    paths = []
    for i, size in enumerate([(90, 50), (40, 100)]):
        path = root / f"image{i}.png"
        random_image(*size, seed=i + 1).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def narrow_mmproj(tmp_path_factory: pytest.TempPathFactory, sp_model: Path) -> Path:
    """An mmproj projecting to width 32, from a checkpoint whose LLM is 32 wide (the others are 64)."""
    original = checkpoints.text_config

    def narrow(llm: str, vocab_size: int, pad_token_id: int | None, rope_theta: float | None = None) -> Any:
        config = original(llm, vocab_size, pad_token_id, rope_theta)
        return type(config)(**{**config.to_dict(), "hidden_size": 32, "head_dim": 8})

    root = tmp_path_factory.mktemp("narrow")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoints, "text_config", narrow)
        ckpt = build_checkpoint(root, llava_version="1.5", layout="llava-hf", sp_model_path=sp_model)
    result = convert_checkpoint(ckpt.path, root / "gguf", ConvertOptions(quant=Quant.F32, mmproj_type=MmprojType.F32))
    return result.mmproj


# ---------------------------------------------------------------- ask


@pytest.mark.parametrize(("version", "n_images"), [("1.5", 1), ("1.6", 2)])
def test_ask_json_matches_reference(converted, images, version: str, n_images: int) -> None:
    c = converted(version)
    paths = images[:n_images]
    args = ["ask", "-m", str(c.dir), *(a for p in paths for a in ("-i", str(p))), "--temp", "0", "-n", "16",
            *EXACT_ARGS, "--json", QUESTION]
    out = json_of(run(*args))
    prompt = c.prompt(QUESTION, n_images)
    assert out["prompt"] == prompt
    pil = [Image.open(p).convert("RGB") for p in paths]
    _, ref_tokens, counts = reference_run(c.ckpt, prompt, pil)
    assert out["tokens"] == ref_tokens
    assert out["n_image_tokens"] == counts == [c.model.count_image_tokens(p) for p in paths]
    assert out["prompt_tokens"].count(IMAGE_TOKEN_INDEX) == n_images
    assert out["n_prompt_tokens"] == len(out["prompt_tokens"]) - n_images + sum(counts)
    assert set(out["timings"]) == {"vision_encode_s", "prefill_s", "decode_s", "n_prefilled", "n_restored"}
    assert out["timings"]["n_prefilled"] + out["timings"]["n_restored"] == out["n_prompt_tokens"]
    assert all(v >= 0 for v in out["timings"].values())
    # the same answer as the library's own API
    chat = c.model.chat()
    answer = "".join(chat.send(QUESTION, paths, GenerationOptions(16, sampling=SamplingOptions(temperature=0))))
    assert out["answer"] == answer
    assert out["prompt_tokens"] == [t if isinstance(t, int) else IMAGE_TOKEN_INDEX for t in chat.last_items]


def test_ask_streams_the_librarys_answer(converted, images) -> None:
    c = converted("1.5")
    sampling = SamplingOptions(temperature=1.0, seed=7)
    expected = "".join(c.model.ask(QUESTION, [images[0]], GenerationOptions(40, sampling=sampling)))
    result = run("ask", "-m", str(c.dir), "-i", str(images[0]), "--temp", "1", "--seed", "7", "-n", "40",
                 *EXACT_ARGS, QUESTION)
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"
    assert "memory estimate" in result.stderr and "encoding image 1" in result.stderr
    quiet = run("ask", "-m", str(c.dir), "-i", str(images[0]), "--temp", "1", "--seed", "7", "-n", "40",
                *EXACT_ARGS, "--quiet", QUESTION)
    assert quiet.stdout == result.stdout and quiet.stderr == ""


def test_ask_raw_prompt(converted, images) -> None:
    c = converted("1.5")
    prompt = "USER: <image>\nDescribe the colours. ASSISTANT:"
    out = json_of(run("ask", "-m", str(c.dir), "-i", str(images[0]), "--raw", "--temp", "0", "-n", "12",
                      *EXACT_ARGS, "--json", prompt))
    assert out["prompt"] == prompt
    _, ref_tokens, _ = reference_run(c.ckpt, prompt, [Image.open(images[0]).convert("RGB")], max_new=12)
    assert out["tokens"] == ref_tokens
    # two placeholders, one image: a usage error, found before loading
    result = run("ask", "-m", str(c.dir), "-i", str(images[0]), "--raw", "<image><image> hi")
    assert result.exit_code == 2 and "2 <image> placeholder(s) but 1 image(s)" in result.stderr


def test_ask_question_from_stdin(converted, images) -> None:
    c = converted("1.5")
    args = ["ask", "-m", str(c.dir), "-i", str(images[0]), "--temp", "0", "-n", "4", "-t", "1", "--json"]
    assert json_of(run(*args, input=QUESTION + "\n"))["prompt"] == c.prompt(QUESTION, 1)


def test_model_given_as_files_dir_or_env(converted, images) -> None:
    c = converted("1.5")
    common = ["-i", str(images[0]), "--temp", "0", "-n", "8", "-t", "1", "--json", QUESTION]
    by_dir = json_of(run("ask", "-m", str(c.dir), *common))
    by_files = json_of(run("ask", "--llm", str(c.llm), "--mmproj", str(c.mmproj), *common))
    by_llm_file = json_of(run("ask", "-m", str(c.llm), *common))
    by_env = json_of(run("ask", *common, env={"LLAVA_GGUF_MODEL": str(c.dir)}))
    assert by_dir["tokens"] == by_files["tokens"] == by_llm_file["tokens"] == by_env["tokens"]
    assert by_files["model"] == {"llm": str(c.llm), "mmproj": str(c.mmproj), "llava_version": "1.5",
                                 "template": "llava_hf", "inferred": None,
                                 "vision_encoder": by_files["model"]["vision_encoder"]}
    assert by_files["model"]["vision_encoder"] in ("numpy", "ggml")  # auto: an exact one
    # --llm/--mmproj win over LLAVA_GGUF_MODEL
    assert json_of(run("ask", "--llm", str(c.llm), "--mmproj", str(c.mmproj), *common,
                       env={"LLAVA_GGUF_MODEL": "/nonexistent"}))["tokens"] == by_dir["tokens"]


def test_checkpoint_directory_is_converted_once(converted, images, isolated_cache: Path) -> None:
    c = converted("1.5")
    args = ["ask", "-m", str(c.ckpt.path), "--quant", "F32", "-i", str(images[0]), "--temp", "0", "-n", "8",
            *EXACT_ARGS, QUESTION]
    first = run(*args)
    assert first.exit_code == 0, first.output
    assert "converting" in first.stderr
    (out_dir,) = (isolated_cache / "models").iterdir()
    ggufs = sorted(out_dir.glob("*.gguf"))
    assert len(ggufs) == 2
    mtimes = [p.stat().st_mtime_ns for p in ggufs]
    second = run(*args)
    assert second.exit_code == 0, second.output
    assert "converting" not in second.stderr and f"using the converted model in {out_dir}" in second.stderr
    assert [p.stat().st_mtime_ns for p in ggufs] == mtimes
    assert list((isolated_cache / "models").iterdir()) == [out_dir]
    assert second.stdout == first.stdout
    # and the answer is the one of the F32 pair converted by hand (the mmproj is f16 here: same tokens
    # is not guaranteed, so compare with the library on the cached files instead)
    cached = LlavaModel(*[p for p in sorted(ggufs, key=lambda p: "mmproj" in p.name)], EXACT)
    expected = "".join(cached.ask(QUESTION, [images[0]], GenerationOptions(8, sampling=SamplingOptions(temperature=0))))
    assert first.stdout == expected + "\n"


def test_features_are_cached_on_disk(converted, images, isolated_cache: Path) -> None:
    c = converted("1.5")
    args = ["ask", "-m", str(c.dir), "-i", str(images[0]), "-n", "2", "-t", "1", "--json", QUESTION]
    json_of(run(*args))
    assert len(list((isolated_cache / "features").glob("*.npy"))) == 1
    json_of(run(*args))
    assert len(list((isolated_cache / "features").glob("*.npy"))) == 1
    json_of(run(*args, "--no-cache"))  # still works, writes nothing new
    assert len(list((isolated_cache / "features").glob("*.npy"))) == 1


# ---------------------------------------------------------------- convert and inspect


@pytest.mark.parametrize("quant", ["F32", "Q8_0"])
def test_convert_and_inspect(tiny_checkpoint, tmp_path: Path, quant: str) -> None:
    ckpt = tiny_checkpoint(llava_version="1.5", layout="llava-hf", llm="llama")
    result = run("convert", str(ckpt.path), "--out", str(tmp_path), "--quant", quant, "--mmproj-type", "f32",
                 "--quiet")
    assert result.exit_code == 0, result.output
    paths = json.loads(result.stdout)
    llm, mmproj = Path(paths["llm"]), Path(paths["mmproj"])
    assert llm.is_file() and mmproj.is_file() and llm.name.endswith(f".{quant}.gguf")

    info = json_of(run("inspect", str(llm), "--json"))
    assert info["architecture"] == "llama" and info["file_type"] == quant
    assert info["template"] and info["tokenizer"]["tokens"] == ckpt.model.config.text_config.vocab_size
    assert info["reference"].startswith("transformers")
    assert info["llava_gguf"]["llava_gguf.tokenizer.space_after_special"] is True  # tokenizer.json's Prepend
    assert json_of(run("inspect", str(mmproj), "--json"))["architecture"] == "clip"
    text = run("inspect", str(llm))
    assert text.exit_code == 0 and "architecture" in text.stdout and quant in text.stdout

    # the converted pair answers
    out = json_of(run("ask", "-m", str(tmp_path), "-n", "4", "-t", "1", "--json", "hello"))
    assert out["prompt_tokens"].count(IMAGE_TOKEN_INDEX) == 0 and out["n_image_tokens"] == []


# ---------------------------------------------------------------- errors


def test_image_errors(converted, images, tmp_path: Path) -> None:
    c = converted("1.5")
    line = one_error_line(run("ask", "-m", str(c.dir), "-i", str(tmp_path / "missing.png"), "hi"))
    assert "missing.png" in line and "No such file" in line
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    line = one_error_line(run("ask", "-m", str(c.dir), "-i", str(not_image), "hi"))
    assert "notes.png: not an image file" in line
    debug = run("--debug", "ask", "-m", str(c.dir), "-i", str(not_image), "hi")
    assert debug.exit_code == 1 and isinstance(debug.exception, ImageError)


def test_mismatched_pair(converted, images, narrow_mmproj: Path) -> None:
    c = converted("1.5")
    result = run("ask", "--llm", str(c.llm), "--mmproj", str(narrow_mmproj), "-i", str(images[0]), "hi")
    line = one_error_line(result)
    assert "width 32" in line and "width 64" in line and "do not belong together" in line
    debug = run("--debug", "ask", "--llm", str(c.llm), "--mmproj", str(narrow_mmproj), "-i", str(images[0]), "hi")
    assert isinstance(debug.exception, ModelLoadError)


def test_missing_model_files(tmp_path: Path, images) -> None:
    line = one_error_line(run("ask", "-m", str(tmp_path / "nowhere"), "hi"))
    assert "nowhere: no such file or directory" in line
    line = one_error_line(run("ask", "-m", str(tmp_path), "hi"))  # empty directory
    assert "neither GGUF files nor a Hugging Face checkpoint" in line
    line = one_error_line(run("ask", "--llm", str(tmp_path / "a.gguf"), "--mmproj", str(tmp_path / "b.gguf"), "hi"))
    assert "a.gguf: no such file" in line


def test_prompt_does_not_fit(converted, images) -> None:
    c = converted("1.5")
    line = one_error_line(run("ask", "-m", str(c.dir), "-i", str(images[0]), "-c", "32", "-n", "64", "hi"))
    assert "the context holds 32" in line


def test_offline_uncached_repo(images, tmp_path: Path) -> None:
    repo = "nobody-llava-gguf-test/not-cached-llava"
    result = run("ask", "-m", repo, "-i", str(images[0]), "hi",
                 env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    line = one_error_line(result)
    assert repo in line and "HF_HUB_OFFLINE" in line and f"hf download {repo}" in line


@pytest.mark.parametrize("args", [
    ["ask", "hi"],  # no model
    ["ask", "--llm", "x.gguf", "hi"],  # --llm without --mmproj
    ["ask", "-m", "x", "--llm", "a.gguf", "--mmproj", "b.gguf", "hi"],
    ["ask", "-m", "x", "--kv-cache-type", "q2", "hi"],
    ["ask", "-m", "x", "--template", "nope", "hi"],
    ["chat", "-m", "x", "--bogus"],
])
def test_usage_errors_exit_2(args: list[str]) -> None:
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


def test_help_has_examples() -> None:
    for command in ("ask", "chat", "convert", "inspect"):
        result = run(command, "--help")
        assert result.exit_code == 0 and "Example" in result.stdout


# ---------------------------------------------------------------- picking files of a Hub GGUF repo


def test_pick_gguf_files() -> None:
    names = ["llava-v1.6-Q4_K_M.gguf", "llava-v1.6-Q4_K_S.gguf", "llava-v1.6-Q8_0.gguf", "mmproj-model-f16.gguf",
             "README.md"]
    assert pick_gguf_files(names, None, "r") == ("llava-v1.6-Q4_K_M.gguf", "mmproj-model-f16.gguf")
    assert pick_gguf_files(names, "q8_0", "r") == ("llava-v1.6-Q8_0.gguf", "mmproj-model-f16.gguf")
    assert pick_gguf_files(names, "Q4_K_S", "r")[0] == "llava-v1.6-Q4_K_S.gguf"
    with pytest.raises(ModelLoadError, match="0 LLM file"):
        pick_gguf_files(names, "Q6_K", "r")
    with pytest.raises(ModelLoadError, match="several LLM files"):
        pick_gguf_files(["a.Q8_0.gguf", "a.Q6_K.gguf", "mmproj.gguf"], None, "r")
    with pytest.raises(ModelLoadError, match="found 1 and 0"):
        pick_gguf_files(["a.gguf"], None, "r")


def test_offline_hub_gguf_repo_from_the_cache(converted, images, tmp_path: Path, monkeypatch) -> None:
    """A Hub repo of GGUF pairs, already in the Hugging Face cache, used with HF_HUB_OFFLINE=1."""
    from huggingface_hub import constants

    c = converted("1.5")
    hub = tmp_path / "hub"
    repo_dir = hub / "models--someone--tiny-llava-gguf"
    commit = "0" * 40
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    for path, name in ((c.llm, "tiny-Q8_0.gguf"), (c.llm, "tiny-F32.gguf"), (c.mmproj, "mmproj-tiny-f32.gguf")):
        os.symlink(path, snapshot / name)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    common = ["-i", str(images[0]), "--temp", "0", "-n", "8", "-t", "1", "--json", QUESTION]
    out = json_of(run("ask", "-m", "someone/tiny-llava-gguf", "--quant", "F32", *common, env={"HF_HUB_OFFLINE": "1"}))
    assert out["model"]["llm"].endswith("tiny-F32.gguf") and out["model"]["mmproj"].endswith("mmproj-tiny-f32.gguf")
    assert out["tokens"] == json_of(run("ask", "-m", str(c.dir), *common))["tokens"]
    line = one_error_line(run("ask", "-m", "someone/tiny-llava-gguf", *common, env={"HF_HUB_OFFLINE": "1"}))
    assert "several LLM files" in line and "--quant" in line
