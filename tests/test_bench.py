"""The benchmark script end to end at its tiny shape: every figure present and sane (no timing asserted)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"

FIGURES = [
    "convert 1.5 wall", "convert 1.5 peak RSS", "convert 1.6 wall", "convert 1.6 peak RSS", "vision",
    "TTFT 1.5 640x480", "image tokens 1.5 640x480",
    "TTFT 1.6 336x336", "TTFT 1.6 672x672", "TTFT 1.6 1000x700",
    "image tokens 1.6 336x336", "image tokens 1.6 672x672", "image tokens 1.6 1000x700",
    "prefill pp512", "decode tg128", "decode / bandwidth bound", "end to end 1.5, 4 tokens",
    "peak RSS, benchmark runner", "peak RSS, 1.5 end to end", "peak RSS, 1.6 chat 672x672 q8_0 KV",
    "TTFT 2nd ask 1.6 672x672, new process", "prompt cache entry", "prompt cache restore",
]


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quick_json_has_every_figure(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", "--runs", "1", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    raw = json.loads(proc.stdout)
    for key in ("date", "machine", "versions", "threads", "bandwidth_bytes_per_s", "convert", "ours", "stock",
                "ours_chat", "stock_chat", "transformers", "rss", "rows", "ask_first", "ask_second"):
        assert key in raw, key
    assert raw["machine"]["cores"] >= 1 and raw["machine"]["cpu"]
    assert {"python", "llama-cpp-python", "transformers", "torch", "numpy"} <= raw["versions"].keys()
    assert _positive(raw["bandwidth_bytes_per_s"])
    assert set(raw["rss"]) == {"ours", "stock", "ours_chat", "stock_chat", "transformers"}
    assert all(_positive(v) for v in raw["rss"].values())

    rows = {r["figure"]: r for r in raw["rows"]}
    missing = [f for f in FIGURES if f not in rows]
    assert not missing, missing
    prefill_rows = [f for f in rows if f.endswith("image rows")]
    assert prefill_rows, "no prefill row at the image token counts"
    e2e = [r for r in raw["rows"] if r["figure"].startswith("end to end")]
    assert {r["peer_name"] for r in e2e} == {"Llava15ChatHandler", "transformers f32"}
    for row in raw["rows"]:
        assert _positive(row["ours"]), row
        if row["peer"] is not None:
            assert _positive(row["peer"]), row
            assert _positive(row["ratio"]), row
    # image tokens are whole numbers; LLaVA 1.5 uses one tile's patches in both runners
    img15 = rows["image tokens 1.5 640x480"]
    assert img15["ours"] == img15["peer"] == (56 // 14) ** 2
    # each compared runner's machine load was sampled (alternating repetitions)
    assert set(raw["load"]) == {"ours", "stock", "ours_chat", "stock_chat"}
    assert all(entry["other_cpu_s"] >= 0 and entry["wall_s"] > 0 for entry in raw["load"].values())
    assert "weight repacking" in raw["ours"]["repack"] and "load while ours ran" in proc.stderr
    # the second ask in a new process restored the image's prefix the first one saved
    assert raw["ask_first"]["n_restored"] == 0 and raw["ask_second"]["n_restored"] > 0
    assert raw["ask_first"]["entries"] == raw["ask_second"]["entries"] == 1

    # the table went to stderr with the machine line and the ratios
    assert "ours/peer" in proc.stderr and "threads" in proc.stderr


def test_quick_repack_table(tmp_path: Path) -> None:
    """``--only repack``: the four settings, each honoured (ours on = repacked without mmap), with
    their figures, load marks and ratios to the stock Llama."""
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--only", "repack", "--runs", "1", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
             for line in proc.stdout.splitlines() if line.startswith("│")}
    # where llama.cpp's repacked kernels crash (AMX, llama.cpp issue 20824) ours' "on" is refused and left
    # out, and the stock Llama runs with repacking off, said under the table
    crashes = "crash on this CPU" in proc.stdout
    expected = {"ours, --repack auto", "ours, --repack off", "stock llama_cpp.Llama"} | (
        set() if crashes else {"ours, --repack on"})
    assert set(lines) == expected
    assert lines["ours, --repack off"][:2] == ["off", "yes"]
    assert crashes or lines["ours, --repack on"][:2] == ["on", "no"]
    assert lines["stock llama_cpp.Llama"][:2] == ["off" if crashes else "on", "yes"]
    for cells in lines.values():
        assert all(_positive(float(c.split("-")[0])) for c in cells[2:6]), cells
        assert cells[6] in ("idle", "DISTURBED in 1 round(s)")
    assert proc.stdout.count("/ stock (medians): prefill") == len(expected) - 1
    assert "auto: weight repacking" in proc.stdout
