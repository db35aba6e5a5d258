"""Images per minute of `llava-gguf batch` for the 1B shape: one at a time, `--parallel 4`, and on Ray
Data with 1 and 2 actors, each run a fresh `llava-gguf batch` process on the same new images.

    python benchmarks/batch.py                 # the 1B shape (minutes)
    python benchmarks/batch.py --shape tiny    # seconds

The model is the synthetic LLaVA 1.5 of ``benchmarks/synth.py`` (random weights, real shapes), Q4_K_M
with an f16 mmproj; every image is new noise (no cache helps), ``--tokens`` new tokens each at
temperature 0 (the answers of all runs are compared: they must be equal).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import synth  # noqa: E402
from runners import converted_llava15, png_bytes  # noqa: E402


def run(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", "1b"], default="1b")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "llava-gguf-bench")
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args()
    shape = synth.SHAPES[args.shape]
    models = converted_llava15(shape, args.workdir)
    scratch = Path(tempfile.mkdtemp(prefix="llava-gguf-batch-bench-"))
    images = scratch / "images"
    images.mkdir()
    side = shape.vision.image_size
    for i in range(args.images):
        (images / f"{i:03d}.png").write_bytes(png_bytes((side, side), 9000 + i))
    base = [sys.executable, "-m", "llava_gguf.cli", "batch", str(images), "-p", "Describe the picture.", "-m",
            str(models), "--temp", "0", "-n", str(args.tokens), "-q", "--encoder", "numpy"]
    half = max(1, args.threads // 2)
    # (name, options, threads per model): answers are compared with the sequential run of the same threads
    runs: list[tuple[str, list[str], int]] = [
        ("sequential", ["-t", str(args.threads)], args.threads),
        ("--parallel 4", ["-t", str(args.threads), "--parallel", "4"], args.threads),
    ]
    if not args.skip_ray:
        runs += [("Ray, 1 actor", ["-t", str(args.threads), "--ray", "--workers", "1"], args.threads),
                 (f"sequential, {half} thread(s)", ["-t", str(half)], half),
                 ("Ray, 2 actors", ["-t", str(half), "--ray", "--workers", "2"], half)]
    report: dict[str, Any] = {"shape": shape.name, "images": args.images, "tokens": args.tokens,
                              "cpus": os.cpu_count(), "runs": []}
    answers: dict[str, list] = {}
    reference_of: dict[int, str] = {}
    print(f"{args.images} new {side}x{side} images, {args.tokens} tokens each, {args.shape} shape, "
          f"{os.cpu_count()} CPUs; each run a new process (model load included)")
    for name, extra, threads in runs:
        out = scratch / f"{name.replace(' ', '_').replace(',', '')}.jsonl"
        env = {**os.environ, "LLAVA_GGUF_CACHE": str(scratch / f"cache-{out.stem}")}  # no cache shared between runs
        seconds = run([*base, *extra, "-o", str(out)], env)
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        answers[name] = sorted((r["path"], r.get("tokens")) for r in rows)
        reference_of.setdefault(threads, name)
        per_min = 60 * args.images / seconds
        report["runs"].append({"run": name, "seconds": seconds, "images_per_min": per_min})
        print(f"  {name:14} {seconds:7.1f} s  {per_min:6.2f} images/min", flush=True)
    report["same_answers"] = {name: answers[name] == answers[reference_of[threads]] for name, _, threads in runs}
    print("answers equal the sequential run's with the same threads: "
          + ", ".join(f"{k} {v}" for k, v in report["same_answers"].items()))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
