"""Without network and without HF_HUB_OFFLINE, a Hub model that is not cached fails at once: one quick
check of the endpoint, no huggingface_hub retries, one line on stderr. Only loopback sockets: one port
where nothing listens (refused) and one that accepts connections and never answers (hangs)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import seed_probe_cache
from PIL import Image

LIMIT_S = 15.0
CLI = Path(sys.executable).with_name("llava-gguf")  # the entry point a user runs


@pytest.fixture
def refused() -> Iterator[str]:
    """An endpoint on a loopback port where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield f"http://127.0.0.1:{port}"


@pytest.fixture
def hangs() -> Iterator[str]:
    """An endpoint that accepts connections (the kernel completes them from the backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def ask_offline(endpoint: str, tmp_path: Path, repo: str = "some-org/some-repo",
                *options: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """`llava-gguf ask -m REPO` with the Hub at ``endpoint``, HF_HUB_OFFLINE unset; (result, seconds)."""
    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "LLAVA_GGUF_MODEL")}
    env |= {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"), "LLAVA_GGUF_CACHE": str(tmp_path / "cache"),
            "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    start = time.monotonic()
    result = subprocess.run([str(CLI), "ask", "-m", repo, "-i", str(image), *options, "q"], env=env,
                            capture_output=True, text=True, timeout=300)
    return result, time.monotonic() - start


@pytest.mark.parametrize("endpoint", ["refused", "hangs"])
def test_an_unreachable_hub_fails_fast_in_one_line(endpoint: str, request: pytest.FixtureRequest,
                                                    tmp_path: Path) -> None:
    result, seconds = ask_offline(request.getfixturevalue(endpoint), tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Retrying" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "some-org/some-repo" in lines[0] and "cannot be reached" in lines[0], lines[0]
    assert "hf download some-org/some-repo" in lines[0] and "HF_HUB_OFFLINE" not in lines[0], lines[0]
    assert seconds < LIMIT_S, f"took {seconds:.1f} s"


def test_an_unreachable_hub_uses_the_cached_files(f32_pair, refused: str, tmp_path: Path) -> None:
    """A Hub repo of GGUF pairs already in the Hugging Face cache runs as with HF_HUB_OFFLINE=1."""
    _, llm, mmproj = f32_pair()
    repo_dir = tmp_path / "hf" / "hub" / "models--someone--tiny-llava-gguf"
    commit = "0" * 40
    (repo_dir / "snapshots" / commit).mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    for path, name in ((llm, "tiny-F32.gguf"), (mmproj, "mmproj-tiny-f32.gguf")):
        os.symlink(path, repo_dir / "snapshots" / commit / name)
    seed_probe_cache(tmp_path / "cache")
    result, _ = ask_offline(refused, tmp_path, "someone/tiny-llava-gguf", "--temp", "0", "-n", "4", "-t", "1",
                            "--json")
    assert result.returncode == 0, result.stderr
    assert "Retrying" not in result.stderr
    used = json.loads(result.stdout)["model"]
    assert used["llm"].endswith("tiny-F32.gguf") and used["mmproj"].endswith("mmproj-tiny-f32.gguf")
