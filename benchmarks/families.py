"""The LLaVA family's other LLMs at their real shapes: convert, then one image and an N-token answer.

    python benchmarks/families.py                               # phi3-mini, then llama3-8b
    python benchmarks/families.py --shape phi3-mini --runs 2
    python benchmarks/families.py --shape phi3-tiny --shape llama3-tiny   # seconds, for checking
    python benchmarks/families.py --shape onevision-0.5b --size 1000x700 --quant Q4_K_M --quant Q8_0 \
        --mmproj-type f16 --mmproj-type q8_0 --low-memory both       # every pairing, asked both ways

For each shape (synth.py: random f16 weights, llava-hf layout, LLaVA 1.5): build the checkpoint,
convert it (each --quant LLM with each --mmproj-type mmproj, default Q4_K_M and f16) in a fresh
process, delete the checkpoint (unless --keep-checkpoints), then ask about one --size noise image
(default 336x336) for --tokens greedy tokens, each run a fresh process (bench.py's child runner: peak RSS is the worker's own VmHWM, and the machine's load
is sampled while it runs). Time to first token is the call's time less the decode's (image decode,
vision, prefill); decode tok/s is the answer's tokens over the decode's time; "tiles" is what the
vision tower encoded (LLaVA-OneVision: the base view plus the anyres tiles). The runtime runs with
the Python API's defaults (context sized to the request, f16 KV cache, `--repack auto`) except
flash attention, off as in bench.py; `--low-memory` runs it as the CLI's `--low-memory` does (q8_0 KV
cache with flash attention, no repacking, RuntimeOptions(low_memory=True)), `--low-memory both` asks
both ways in turn. Converted GGUFs are kept under --workdir/<shape>/gguf/<quant>-<mmproj> and reused
(--reconvert to measure the conversion again).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bench
import synth
from runners import median

from llava_gguf.machine_load import LoadMeter, cpu_model

QUESTION = "Describe this image in detail."
SIZE = (336, 336)  # --size's default
MB = 1 << 20
DEFAULT_SHAPES = ("phi3-mini", "llama3-8b")


def combos(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(LLM quant, mmproj type) pairs to convert and ask about."""
    return [(q, m) for q in args.quant or ["Q4_K_M"] for m in args.mmproj_type or ["f16"]]


def convert(shape: synth.Shape, workdir: Path, args: argparse.Namespace) -> dict[tuple[str, str], dict[str, Any]]:
    """Build ``shape``'s checkpoint once and convert it for each of `combos` in a fresh process (or reuse
    the GGUFs); returns each pair's record."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    todo = []
    for quant, mmproj in combos(args):
        record = workdir / "gguf" / f"{quant}-{mmproj}" / "convert.json"
        if record.exists() and not args.reconvert:
            out[quant, mmproj] = json.loads(record.read_text())
        else:
            todo.append((quant, mmproj))
    if not todo:
        return out
    start = time.perf_counter()
    ckpts = synth.build_checkpoints(workdir / "checkpoints", shape, versions=("1.5",))
    build_s = time.perf_counter() - start
    print(f"[families] {shape.name}: checkpoint written in {build_s:.0f}s", file=sys.stderr, flush=True)
    for quant, mmproj in todo:
        dest = workdir / "gguf" / f"{quant}-{mmproj}"
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        child = bench.run_child("convert", {"source": str(ckpts.llava15), "out_dir": str(dest), "quant": quant,
                                            "mmproj_type": mmproj, "threads": args.threads}, workdir)
        rec = {**child.result, "quant": quant, "mmproj_type": mmproj, "max_rss_bytes": child.max_rss_bytes,
               "checkpoint_bytes": ckpts.size_bytes, "largest_tensor": ckpts.largest_tensor,
               "largest_tensor_bytes": ckpts.largest_tensor_bytes, "build_s": build_s,
               "load": child.load.to_json(), "disturbed": child.disturbed,
               "llm_bytes": Path(child.result["llm"]).stat().st_size,
               "mmproj_bytes": Path(child.result["mmproj"]).stat().st_size}
        (dest / "convert.json").write_text(json.dumps(rec, indent=2))
        out[quant, mmproj] = rec
        mark = "  DISTURBED" if child.disturbed else ""
        print(f"[families] {shape.name} {quant}/{mmproj}: converted in {child.result['wall_s']:.0f}s, peak RSS "
              f"{child.max_rss_bytes / MB:.0f} MiB, {child.load.describe()}{mark}", file=sys.stderr, flush=True)
    if not args.keep_checkpoints:
        shutil.rmtree(workdir / "checkpoints")
    return out


# ---------------------------------------------------------------- the ask worker (a fresh interpreter)


def run_ask(spec: dict[str, Any]) -> dict[str, Any]:
    """One chat turn about one noise image, the runtime as the Python API (or the CLI's --low-memory) runs it;
    also counts the tiles the vision tower encoded."""
    from runners import _ours_answer, png_bytes

    from llava_gguf.llm.llama import KVCacheType, LlamaOptions, RepackPolicy
    from llava_gguf.model import LlavaModel, RuntimeOptions

    low = spec["low_memory"]
    llama = LlamaOptions(n_ctx=None, n_threads=spec["threads"], kv_cache_type=KVCacheType("q8_0" if low else "f16"),
                         flash_attn=low, repack=RepackPolicy.OFF if low else RepackPolicy.AUTO)
    model = LlavaModel(spec["llm"], spec["mmproj"], RuntimeOptions(llama=llama, prompt_cache=False, low_memory=low))
    tiles: list[int] = []
    encode = model.encoder.encode

    def counting(batch: Any, *a: Any, **k: Any) -> Any:
        tiles.append(len(batch))
        return encode(batch, *a, **k)

    model.encoder.encode = counting  # type: ignore[method-assign]
    w, h = spec["size"]
    out = _ours_answer(model, spec["question"], [png_bytes((w, h), 5)], spec["tokens"])
    return {**out, "n_tiles": sum(tiles), "repack": getattr(model.runtime, "repack_reason", None),
            "encoder": model.encoder_name, "encoder_reason": model.encoder_reason}


def run_child(spec: dict[str, Any], workdir: Path) -> bench.Child:
    """bench.run_child for this file's ask worker: a fresh interpreter, its own VmHWM, the machine's load."""
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        with open(logs / "ask.log", "w") as log:
            meter = LoadMeter()
            proc = subprocess.Popen([sys.executable, __file__, "--worker", str(spec_path), str(out_path)],
                                    stdout=log, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)
            load = meter.stop()
        code = os.waitstatus_to_exitcode(status)
        if code != 0 or not out_path.exists():
            raise RuntimeError(f"ask worker exited with {code}:\n{(logs / 'ask.log').read_text(errors='replace')[-3000:]}")
        result = json.loads(out_path.read_text())
        return bench.Child(result, result.pop("vm_hwm_bytes", None) or usage.ru_maxrss * 1024, load)


def ask(converted: dict[str, Any], workdir: Path, args: argparse.Namespace, low_memory: bool,
        save: Any = lambda runs: None) -> list[dict[str, Any]]:
    """``args.runs`` fresh processes, each one chat turn about one --size image (`run_ask`); ``save(runs)``
    after each."""
    spec = {"llm": converted["llm"], "mmproj": converted["mmproj"], "threads": args.threads, "question": QUESTION,
            "size": list(args.size), "tokens": args.tokens, "low_memory": low_memory}
    runs = []
    for r in range(args.runs):
        child = run_child(spec, workdir)
        res = child.result
        runs.append({**res, "ttft_s": res["wall_s"] - res["decode_s"],
                     "decode_tok_s": res["n_generated"] / res["decode_s"] if res["decode_s"] else None,
                     "peak_rss_bytes": child.max_rss_bytes, "load": child.load.to_json(),
                     "other_cores": child.load.other_cores, "disturbed": child.disturbed,
                     "vision_per_tile_s": res["vision_s"] / res["n_tiles"] if res.get("n_tiles") else None})
        save(runs)
        mark = "  DISTURBED" if child.disturbed else ""
        print(f"[families] ask {r + 1}/{args.runs}{' (low memory)' if low_memory else ''}: {res['n_generated']} "
              f"tokens, {res['n_tiles']} tiles, TTFT {runs[-1]['ttft_s']:.1f}s (vision {res['vision_s']:.1f}s, prefill "
              f"{res['prefill_s']:.1f}s), decode {runs[-1]['decode_tok_s'] or 0:.2f} tok/s, peak RSS "
              f"{child.max_rss_bytes / MB:.0f} MiB, {res.get('encoder')} encoder, "
              f"{child.load.describe()}{mark}", file=sys.stderr, flush=True)
    return runs


def _load_mark(entries: list[dict[str, Any]]) -> str:
    cores = [e["load"]["other_cpu_s"] / e["load"]["wall_s"] for e in entries if e["load"]["other_cpu_s"] is not None]
    n = sum(e["disturbed"] for e in entries)
    span = f"others {max(cores):.2f} cores" if cores else "load unknown"
    return f"DISTURBED {n}/{len(entries)} ({span})" if n else f"idle ({span})"


def print_table(results: dict[str, dict[str, Any]], args: argparse.Namespace, file: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    m = bench.machine()
    w, h = args.size
    title = (f"LLaVA family LLMs, one {w}x{h} noise image, {args.tokens}-token greedy answer, "
             f"{time.strftime('%Y-%m-%d %H:%M %Z')}\n{cpu_model()}, {m['cores']} cores, {m['memory_gb']} GB; "
             f"threads {args.threads}; {args.runs} fresh process(es) per ask (median)")
    table = Table(title=title, title_justify="left")
    cols = ("shape", "LLM", "mmproj", "memory", "ckpt GiB", "convert s", "convert RSS MiB", "LLM MiB", "mmproj MiB",
            "tiles", "image tok", "prompt tok", "TTFT s", "vision s", "s/tile", "prefill s", "decode tok/s",
            "answer tok", "peak RSS MiB", "convert load", "ask load")
    left = ("shape", "LLM", "mmproj", "memory", "convert load", "ask load")
    for c in cols:
        table.add_column(c, justify="left" if c in left else "right")
    for r in results.values():
        c, runs = r["convert"], r["ask"]
        if not runs:
            continue

        def med(key: str, runs: list[dict[str, Any]] = runs) -> float:
            return median([x[key] for x in runs])

        n_gen = [x["n_generated"] for x in runs]
        answer = str(min(n_gen)) + ("" if min(n_gen) == args.tokens else " (EOS early)")
        table.add_row(r["shape"], c["quant"], c["mmproj_type"], "low" if r["low_memory"] else "default",
                      f"{c['checkpoint_bytes'] / 2**30:.2f}", f"{c['wall_s']:.0f}", f"{c['max_rss_bytes'] / MB:.0f}",
                      f"{c['llm_bytes'] / MB:.0f}", f"{c['mmproj_bytes'] / MB:.0f}", str(runs[0]["n_tiles"]),
                      str(runs[0]["n_image_tokens"]), str(runs[0]["n_prompt_tokens"]), f"{med('ttft_s'):.2f}",
                      f"{med('vision_s'):.2f}", f"{med('vision_per_tile_s'):.2f}", f"{med('prefill_s'):.2f}",
                      f"{med('decode_tok_s'):.2f}", answer, f"{med('peak_rss_bytes') / MB:.0f}",
                      _load_mark([c]), _load_mark(runs))
    Console(file=file, width=260).print(table)
    print("- weights are random (the speed is real, the answers are not); the end-of-turn ids' output rows are "
          "zero, so every answer runs the full length", file=file)
    print("- memory: default = the Python API's defaults (f16 KV, --repack auto, flash attention off); low = the "
          "CLI's --low-memory (q8_0 KV with flash attention, no repacking, RuntimeOptions(low_memory=True))", file=file)
    print(f"- a run is DISTURBED when other processes used over {bench.DISTURBED_FRACTION:g} of a core on average "
          "while it ran", file=file)


def _size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", action="append", choices=[s for s in synth.SHAPES if synth.SHAPES[s].text.family != "llama"],
                   help=f"repeatable (default: {', '.join(DEFAULT_SHAPES)})")
    p.add_argument("--runs", type=int, default=1, help="fresh processes per ask (default 1)")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--quant", action="append", help="LLM file type, repeatable (default Q4_K_M)")
    p.add_argument("--mmproj-type", action="append", choices=["f16", "q8_0", "f32"],
                   help="mmproj type, repeatable (default f16)")
    p.add_argument("--size", type=_size, default=SIZE, help="the image, WxH (default 336x336)")
    p.add_argument("--low-memory", nargs="?", const="on", default="off", choices=["off", "on", "both"],
                   help="ask as the CLI's --low-memory runs (on), as the Python API's defaults (off), or both")
    p.add_argument("--no-ask", action="store_true", help="convert only")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "llava-gguf-bench")
    p.add_argument("--reconvert", action="store_true")
    p.add_argument("--keep-checkpoints", action="store_true")
    p.add_argument("--json", type=Path, help="also write the raw figures here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 4 and sys.argv[1] == "--worker":  # run_child's fresh interpreter
        result = run_ask(json.loads(Path(sys.argv[2]).read_text()))
        Path(sys.argv[3]).write_text(json.dumps({**result, "vm_hwm_bytes": bench.vm_hwm_bytes()}))
        return 0
    args = parse_args(argv)
    results: dict[str, dict[str, Any]] = {}

    def save() -> None:
        if args.json:  # after every run: a long benchmark cut short keeps what it measured
            args.json.write_text(json.dumps({"machine": bench.machine(), "versions": bench.versions(),
                                             "threads": args.threads, "size": list(args.size), "results": results},
                                            indent=1, default=float))

    modes = {"off": [False], "on": [True], "both": [False, True]}[args.low_memory]
    for name in args.shape or DEFAULT_SHAPES:
        shape = synth.SHAPES[name]
        workdir = args.workdir.expanduser() / name
        workdir.mkdir(parents=True, exist_ok=True)
        converted = convert(shape, workdir, args)
        for (quant, mmproj), conv in converted.items():
            for low in modes:
                key = f"{name} {quant} {mmproj}" + (" low-memory" if low else "")
                results[key] = {"shape": name, "low_memory": low, "convert": conv, "ask": []}
                save()
                if args.no_ask:
                    continue

                def save_runs(runs: list[dict[str, Any]], key: str = key) -> None:
                    results[key]["ask"] = runs
                    save()

                ask(conv, workdir, args, low, save_runs)
    print_table(results, args, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
