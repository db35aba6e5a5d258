"""Seconds per CLIP-L/336 tile for every vision encoder on the same mmproj, and how far each is from
the exact float32 NumPy encoder.

    python benchmarks/vision.py                 # CPU: NumPy, ggml, libmtmd; f32 and f16 mmproj
    python benchmarks/vision.py --gpu --json    # also ggml and libmtmd on the GPU (a CUDA / Metal build)

The mmproj is a random CLIP-L/336 tower (24 layers, 23 run) with LLaVA's mlp2x_gelu projector to a
4096-wide LLM, written by the converter; libmtmd gets a one-block stub LLM of that width. Times are
the median of ``--runs`` after one warm-up; ``--tiles`` tiles per call (5: a LLaVA 1.6 image).
``LLAVA_GGUF_GGML_LIB`` / ``LLAMA_CPP_LIB_PATH`` point at other builds (see benchmarks/gpu.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llava_gguf.convert.checkpoint import VisionConfig  # noqa: E402
from llava_gguf.convert.mmproj import MmprojType  # noqa: E402

CLIP_L = VisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=336, patch_size=14, layer_norm_eps=1e-5, hidden_act="quick_gelu", projection_dim=4096)


def timed(fn: Callable[[], np.ndarray], runs: int) -> tuple[float, np.ndarray]:
    out = fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def measure(kind: MmprojType, args: argparse.Namespace, scratch: Path) -> list[dict[str, Any]]:
    import llama_cpp

    from llava_gguf.vision.ggml_encoder import GgmlVisionEncoder
    from llava_gguf.vision.ggml_lib import GgmlUnavailable, load_ggml
    from llava_gguf.vision.mtmd_encoder import MtmdVisionEncoder, _llm_params, write_probe_llm, write_probe_mmproj
    from llava_gguf.vision.numpy_encoder import NumpyVisionEncoder

    mmproj, llm = scratch / f"clip-l.mmproj-{kind.value}.gguf", scratch / "stub-llm.gguf"
    write_probe_mmproj(mmproj, CLIP_L, kind, scale=0.03)
    if not llm.exists():
        write_probe_llm(llm, CLIP_L.projection_dim)
    tiles = np.random.default_rng(0).standard_normal((args.tiles, 3, 336, 336), dtype=np.float32) * 0.5
    rows: list[dict[str, Any]] = []

    def add(encoder: str, backend: str, seconds: float, features: np.ndarray, reference: np.ndarray | None) -> None:
        rel = None if reference is None else float(np.abs(features - reference).max() / np.abs(reference).max())
        rows.append({"mmproj": kind.value, "encoder": encoder, "backend": backend,
                     "s_per_tile": seconds / args.tiles, "max_rel_diff_vs_numpy": rel})
        print(f"  {kind.value:4} {encoder:6} {backend:5} {1e3 * seconds / args.tiles:9.1f} ms/tile"
              + ("" if rel is None else f"   max |diff| / max |ref| {rel:.2g}"), flush=True)

    numpy_encoder = NumpyVisionEncoder.from_gguf(mmproj)
    seconds, reference = timed(lambda e=numpy_encoder: e.encode(tiles), args.runs)
    add("numpy", "cpu", seconds, reference, None)
    del numpy_encoder
    gpus = [False]
    try:
        library = load_ggml()
        for gpu in ([False, True] if args.gpu else [False]):
            encoder = GgmlVisionEncoder.from_gguf(mmproj, use_gpu=gpu, n_threads=args.threads, library=library)
            seconds, features = timed(lambda e=encoder: e.encode(tiles), args.runs)
            add("ggml", "gpu" if gpu else "cpu", seconds, features, reference)
            encoder.close()
            gpus += [True] if gpu else []
    except GgmlUnavailable as e:
        print(f"  ggml unavailable: {e}")
    model = llama_cpp.llama_model_load_from_file(str(llm).encode(), _llm_params())
    try:
        for gpu in gpus:  # libmtmd on the GPU only where ggml found one
            mtmd = MtmdVisionEncoder(mmproj, model, n_threads=args.threads, use_gpu=gpu)
            pixels = np.random.default_rng(0).integers(0, 256, (args.tiles, 336, 336, 3), dtype=np.uint8)
            seconds, _ = timed(lambda e=mtmd, x=pixels: e.encode_pixels(x), args.runs)
            add("mtmd", "gpu" if gpu else "cpu", seconds, np.zeros(1), None)
            mtmd.close()
    finally:
        llama_cpp.llama_model_free(model)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tiles", type=int, default=1, help="tiles per call (5: a LLaVA 1.6 image)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--types", default="f32,f16", help="mmproj types, comma-separated (f32, f16, q8_0)")
    parser.add_argument("--gpu", action="store_true", help="also the GPU backends (a GPU build of ggml)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON at the end")
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads; "
          f"CLIP-L/336, 23 blocks, mlp2x_gelu to 4096; {args.tiles} tile(s) per call, median of {args.runs}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="llava-gguf-vision-bench-") as scratch:
        for kind in args.types.split(","):
            rows += measure(MmprojType(kind.strip()), args, Path(scratch))
    numpy_s = {r["mmproj"]: r["s_per_tile"] for r in rows if r["encoder"] == "numpy"}
    print("\nratios against NumPy on the same mmproj (time per tile):")
    for r in rows:
        if r["encoder"] != "numpy":
            print(f"  {r['mmproj']:4} {r['encoder']:6} {r['backend']:5} {r['s_per_tile'] / numpy_s[r['mmproj']]:.3f}x")
    if args.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
