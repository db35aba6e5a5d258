"""`llava-gguf batch`: one row per (image, prompt), answers equal `ask`'s, bad images as error rows,
resuming after a SIGKILL with every row exactly once, sidecars, and the same rows from Ray Data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import seed_probe_cache
from test_runtime import EXACT, random_image

from llava_gguf.batch import JsonlOutput, collect_tasks, run_batch
from llava_gguf.cli import main
from llava_gguf.llm.sampling import SamplingOptions
from llava_gguf.model import GenerationOptions, LlavaModel

EXACT_ARGS = ["--kv-cache-type", "f32", "--flash-attn", "off", "-t", "1", "--temp", "0", "-n", "8",
              "--encoder", "numpy"]
PROMPTS = ["What is in the picture?", "What colour is it?"]


@pytest.fixture(scope="module")
def pair(f32_pair) -> tuple[Path, Path]:
    _, llm, mmproj = f32_pair("1.5", "llava-hf", "llama")
    return llm, mmproj


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """Odd sizes, a corrupt PNG, a non-image, and a duplicate under another name in a subdirectory."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for i, (w, h) in enumerate([(90, 50), (1, 1), (33, 200), (57, 57)]):
        random_image(w, h, seed=70 + i).save(root / f"img{i}.png")
    (root / "sub" / "copy-of-img0.png").write_bytes((root / "img0.png").read_bytes())
    (root / "broken.png").write_bytes((root / "img2.png").read_bytes()[:60])
    (root / "notes.jpg").write_text("not an image")
    return root


def batch(pair, *args: str, env: dict | None = None):
    llm, mmproj = pair
    return CliRunner().invoke(main, ["batch", *args, "--llm", str(llm), "--mmproj", str(mmproj), *EXACT_ARGS, "-q"],
                              env=env)


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_folder_gives_every_row_once_errors_recorded_answers_as_ask(pair, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    result = batch(pair, str(folder), "-p", PROMPTS[0], "-p", PROMPTS[1], "-o", str(out))
    assert result.exit_code == 0, result.output
    rows = rows_of(out)
    images = sorted(p for p in folder.rglob("*") if p.is_file())
    assert sorted((r["path"], r["prompt"]) for r in rows) == sorted((str(p), q) for p in images for q in PROMPTS)
    errors = {Path(r["path"]).name for r in rows if "error" in r}
    assert errors == {"broken.png", "notes.jpg"}
    assert all("\n" not in r["error"] for r in rows if "error" in r)
    copies = [r for r in rows if r.get("duplicate_of")]
    assert {Path(r["path"]).name for r in copies} == {"copy-of-img0.png"}
    llm, mmproj = pair
    for row in rows:
        if "error" in row or row.get("duplicate_of"):
            continue
        ask = CliRunner().invoke(main, ["ask", "--llm", str(llm), "--mmproj", str(mmproj), "-i", row["path"],
                                        *EXACT_ARGS, "--json", row["prompt"]])
        assert ask.exit_code == 0, ask.output
        assert json.loads(ask.stdout)["tokens"] == row["tokens"]
        assert row["n_prompt_tokens"] > row["n_image_tokens"][0] and row["model"]["llm"] == llm.name
    # a rerun answers nothing again: a renamed file is known by its content, its rows copied from the old name's
    (folder / "img1.png").rename(folder / "renamed.png")
    again = batch(pair, str(folder), "-p", PROMPTS[0], "-p", PROMPTS[1], "-o", str(out))
    assert again.exit_code == 0, again.output
    after = rows_of(out)
    assert after[: len(rows)] == rows
    renamed = {r["prompt"]: r for r in rows if r["path"] == str(folder / "img1.png")}
    assert after[len(rows):] == [{**renamed[q], "path": str(folder / "renamed.png"),
                                  "duplicate_of": str(folder / "img1.png")} for q in PROMPTS]
    assert batch(pair, str(folder), "-p", PROMPTS[0], "-p", PROMPTS[1], "-o", str(out)).exit_code == 0
    assert rows_of(out) == after


def test_the_python_api_is_an_iterator_of_rows(pair, folder: Path) -> None:
    llm, mmproj = pair
    model = LlavaModel(llm, mmproj, EXACT)
    tasks = collect_tasks([folder / "img0.png", folder / "sub"], [PROMPTS[0]])
    rows = list(run_batch(model, tasks, GenerationOptions(8, sampling=SamplingOptions(temperature=0))))
    assert [r["path"] for r in rows] == [str(folder / "img0.png"), str(folder / "sub" / "copy-of-img0.png")]
    assert rows[1]["duplicate_of"] == rows[0]["path"] and rows[1]["tokens"] == rows[0]["tokens"]


def test_a_killed_run_resumes_with_each_row_once(pair, folder: Path, tmp_path: Path) -> None:
    llm, mmproj = pair
    out = tmp_path / "killed.jsonl"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(["Describe it.", "What is in the picture?", "What colour is it?", "Is it big?"]))
    cache = tmp_path / "cache"
    seed_probe_cache(cache)
    env = {**os.environ, "LLAVA_GGUF_CACHE": str(cache)}
    command = [sys.executable, "-m", "llava_gguf.cli", "batch", str(folder), "--prompts", str(prompts), "-o", str(out),
               "--llm", str(llm), "--mmproj", str(mmproj), *EXACT_ARGS, "-q"]
    command[command.index("-n") + 1] = "200"  # slow enough to be killed midway
    process = subprocess.Popen(command, env=env)
    deadline = time.monotonic() + 120
    while (not out.exists() or out.read_text().count("\n") < 4) and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = out.read_bytes()
    assert 4 <= partial.count(b"\n") < 7 * 4  # killed midway
    assert process.returncode == -signal.SIGKILL
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = rows_of(out)
    keys = [(r["path"], r["prompt"]) for r in rows]
    assert len(keys) == len(set(keys)) == 7 * 4  # every (image, prompt) once, no partial line
    assert out.read_bytes().endswith(b"\n")


@pytest.fixture()
def copies_first(tmp_path: Path) -> Path:
    """An image whose copies sort before and after it, and other images between."""
    root = tmp_path / "dups"
    root.mkdir()
    random_image(40, 30, seed=90).save(root / "x.png")
    for name in ("copy_of_x.png", "z_third_x.png"):
        (root / name).write_bytes((root / "x.png").read_bytes())
    for i in range(3):
        random_image(30 + i, 20, seed=91 + i).save(root / f"img{i}.png")
    return root


def test_a_duplicate_never_holds_rows_back(pair, copies_first: Path) -> None:
    """Each row comes as its answer does: the copies of an image follow its row at once, whichever name
    sorts first (copy_of_x < img0..2 < x < z_third_x)."""
    llm, mmproj = pair
    model = LlavaModel(llm, mmproj, EXACT)
    rows = run_batch(model, collect_tasks([copies_first], [PROMPTS[0]]),
                     GenerationOptions(4, sampling=SamplingOptions(temperature=0)))
    first, second, third = next(rows), next(rows), next(rows)
    assert model.cache.misses == 1  # one image encoded so far: no row waited for the others
    x = str(copies_first / "copy_of_x.png")
    assert [first["path"], second["path"], third["path"]] == [
        x, str(copies_first / "x.png"), str(copies_first / "z_third_x.png")]
    assert second["duplicate_of"] == third["duplicate_of"] == x and second["tokens"] == first["tokens"]
    rest = list(rows)
    assert [Path(r["path"]).name for r in rest] == ["img0.png", "img1.png", "img2.png"]
    assert model.cache.misses == 4 and not any("duplicate_of" in r for r in rest)


@pytest.mark.parametrize("mode", [[], ["--parallel", "2"]], ids=["sequential", "parallel"])
def test_a_run_killed_early_keeps_its_rows_with_a_duplicate_first(pair, copies_first: Path, tmp_path: Path,
                                                                  mode: list[str]) -> None:
    llm, mmproj = pair
    out = tmp_path / "killed.jsonl"
    for i in range(3, 9):  # more work behind the first answers
        random_image(50, 40 + i, seed=100 + i).save(copies_first / f"img{i}.png")
    cache = tmp_path / "cache"
    seed_probe_cache(cache)
    env = {**os.environ, "LLAVA_GGUF_CACHE": str(cache)}
    command = [sys.executable, "-m", "llava_gguf.cli", "batch", str(copies_first), "-p", PROMPTS[0], "-o", str(out),
               "--llm", str(llm), "--mmproj", str(mmproj), *EXACT_ARGS, "-q", *mode]
    command[command.index("-n") + 1] = "100"
    process = subprocess.Popen(command, env=env)
    deadline = time.monotonic() + 120
    while process.poll() is None and (not out.exists() or out.read_text().count("\n") < 3) and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before any row was written"
    kept = rows_of(out)
    assert 3 <= len(kept) < 12 and {Path(r["path"]).name for r in kept[:3]} >= {"copy_of_x.png", "x.png"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = rows_of(out)
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in copies_first.iterdir())  # every task once
    assert rows[: len(kept)] == kept and out.read_bytes().endswith(b"\n")


def test_a_copy_cut_off_by_a_kill_is_written_on_resume(pair, copies_first: Path, tmp_path: Path) -> None:
    """A kill between an answer's row and its copy's: the rerun copies the row without answering again."""
    out = tmp_path / "out.jsonl"
    assert batch(pair, str(copies_first), "-p", PROMPTS[0], "-o", str(out)).exit_code == 0
    rows = rows_of(out)
    cut = [r for r in rows if Path(r["path"]).name != "z_third_x.png"]
    out.write_text("".join(json.dumps(r) + "\n" for r in cut))
    again = batch(pair, str(copies_first), "-p", PROMPTS[0], "-o", str(out))
    assert again.exit_code == 0, again.output
    assert rows_of(out) == cut + [r for r in rows if Path(r["path"]).name == "z_third_x.png"]


def test_a_partial_last_line_is_dropped(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"path": "a.png", "sha256": "aa", "prompt": "q", "answer": "x"}) + "\n"
                   + '{"path": "b.png", "sha256": "bb", "pro')
    output = JsonlOutput(out)
    assert output.done == {("aa", "q")} and out.read_text().count("\n") == 1 and out.read_text().endswith("\n")


def test_sidecars(pair, folder: Path) -> None:
    result = batch(pair, str(folder / "img0.png"), str(folder / "img2.png"), "-p", PROMPTS[0], "--sidecar")
    assert result.exit_code == 0, result.output
    caption = (folder / "img0.txt").read_text()
    assert caption.strip() and (folder / "img2.txt").exists()
    (folder / "img0.txt").write_text("mine\n")
    batch(pair, str(folder / "img0.png"), "-p", PROMPTS[0], "--sidecar")
    assert (folder / "img0.txt").read_text() == "mine\n"  # kept without --overwrite
    batch(pair, str(folder / "img0.png"), "-p", PROMPTS[0], "--sidecar", "--overwrite")
    assert (folder / "img0.txt").read_text() == caption
    assert not list(folder.glob(".*.partial"))
    usage = batch(pair, str(folder), "-p", "a", "-p", "b", "--sidecar")
    assert usage.exit_code == 2 and "one prompt" in usage.output


def test_ray_gives_the_local_rows(pair, folder: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="the ray extra is not installed: pip install '.[ray]'")
    llm, mmproj = pair
    local, on_ray = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    assert batch(pair, str(folder), "-p", PROMPTS[0], "-o", str(local)).exit_code == 0
    cache = tmp_path / "cache"
    seed_probe_cache(cache)
    env = {**os.environ, "LLAVA_GGUF_CACHE": str(cache), "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    command = [sys.executable, "-m", "llava_gguf.cli", "batch", str(folder), "-p", PROMPTS[0], "-o", str(on_ray),
               "--llm", str(llm), "--mmproj", str(mmproj), *EXACT_ARGS, "-q", "--ray", "--workers", "2"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    def comparable(path: Path) -> dict:
        return {(r["path"], r["prompt"]): (r.get("tokens"), r.get("error"), r.get("duplicate_of"))
                for r in rows_of(path)}

    assert comparable(on_ray) == comparable(local)
    # resumed the same way: nothing left to do
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and comparable(on_ray) == comparable(local) and len(rows_of(on_ray)) == len(rows_of(local))


def test_parallel_answers_equal_one_at_a_time(pair, folder: Path, tmp_path: Path) -> None:
    one, four = tmp_path / "one.jsonl", tmp_path / "four.jsonl"
    args = [str(folder), "-p", PROMPTS[0], "-p", PROMPTS[1]]
    assert batch(pair, *args, "-o", str(one)).exit_code == 0
    result = batch(pair, *args, "-o", str(four), "--parallel", "4")
    assert result.exit_code == 0, result.output

    def answers(path: Path) -> dict:
        return {(r["path"], r["prompt"]): (r.get("answer"), r.get("tokens"), r.get("n_prompt_tokens"), "error" in r)
                for r in rows_of(path)}

    assert answers(four) == answers(one)
    # a stop string cuts the answers the same way
    stop_one, stop_four = tmp_path / "s1.jsonl", tmp_path / "s4.jsonl"
    llm, mmproj = pair
    model = LlavaModel(llm, mmproj, EXACT)
    tasks = collect_tasks([folder], [PROMPTS[0]])
    options = GenerationOptions(16, stop=(" ", "e"), sampling=SamplingOptions(temperature=0))
    sequential = {r["path"]: (r.get("answer"), r.get("tokens")) for r in run_batch(model, tasks, options)}
    together = {r["path"]: (r.get("answer"), r.get("tokens")) for r in run_batch(model, tasks, options, parallel=3)}
    assert together == sequential and stop_one != stop_four  # rows come as answers end: compared by path
