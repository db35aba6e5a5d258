"""Benchmark llava-gguf against the stock llama-cpp-python LLaVA handlers and transformers.

    python benchmarks/bench.py                      # the ~1B shape, 3 runs per figure
    python benchmarks/bench.py --shape 7b --runs 1  # Vicuna-7B shape (13.5 GB of f16 weights on disk)
    python benchmarks/bench.py --quick --json       # tiny shape, 1 run, raw figures as JSON

Synthetic checkpoints at real shapes (random weights: the speed is real, the answers are not)
are built and converted once under --workdir and reused. Each runner (the converter, our
runtime, the stock handlers, transformers) runs in its own subprocess so its peak RSS is its
own. Every time is the median of --runs runs after a warm-up. Targets are reported, not asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import runners
import synth
from runners import median

from llava_gguf.machine_load import BUSY_CORES, LoadMeter, MachineLoad

QUESTION = "What is in this image? Describe it briefly."
TG_PROMPT = "USER: Write a long story about a cat. ASSISTANT:"
E2E_SIZE = (640, 480)  # (width, height)
SIZES16 = [(336, 336), (672, 672), (1000, 700)]
CACHE_SIZE = (672, 672)  # the second-ask figure: a LLaVA 1.6 image with nothing to unpad
MB = 1 << 20


# ---------------------------------------------------------------- machine


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem / 2**30, 1),
            "available_gb": round(_available_bytes() / 2**30, 1), "platform": platform.platform()}


def _available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("llama-cpp-python", "transformers", "torch", "numpy", "gguf"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def copy_bandwidth(nbytes: int, runs: int = 5, threads: int | None = None) -> float:
    """Bytes/s of a copy on every core (read + write counted, as STREAM's Copy), median of ``runs``.

    One NumPy copy runs on one core and understates what a multi-threaded decode can read, so
    each thread copies its own slice (NumPy releases the GIL while copying).
    """
    from concurrent.futures import ThreadPoolExecutor

    threads = threads or os.cpu_count() or 1
    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    bounds = np.linspace(0, len(src), threads + 1, dtype=np.int64)
    slices = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
    with ThreadPoolExecutor(threads) as pool:
        def copy() -> None:
            list(pool.map(lambda sl: np.copyto(dst[sl], src[sl]), slices))

        copy()
        times = runners.timed(copy, runs)
    return 2 * src.nbytes / median(times)


# ---------------------------------------------------------------- subprocesses


@dataclass
class Child:
    result: dict[str, Any]
    max_rss_bytes: int
    load: MachineLoad  # other processes' use of the machine while the child ran

    @property
    def wall_s(self) -> float:
        return self.load.wall_s

    @property
    def other_cpu_s(self) -> float:
        return self.load.other_cpu_s or 0.0

    @property
    def disturbed(self) -> bool:
        """Other processes took more than a tenth of a core on average: the figures are not the machine's."""
        return self.load.busy(DISTURBED_FRACTION)


DISTURBED_FRACTION = BUSY_CORES  # of a core, on average (llava_gguf.machine_load says why)


def run_child(worker: str, spec: dict[str, Any], workdir: Path) -> Child:
    """Run ``worker`` in a fresh interpreter; its own peak RSS comes from wait4's rusage."""
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        with open(logs / f"{worker}.log", "w") as log:
            meter = LoadMeter()  # this process's own CPU time counts the child once it is reaped
            proc = subprocess.Popen([sys.executable, __file__, "--worker", worker, "--spec", str(spec_path),
                                     "--out", str(out_path)], stdout=log, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)
            load = meter.stop()
        code = os.waitstatus_to_exitcode(status)
        if code != 0 or not out_path.exists():
            tail = (logs / f"{worker}.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"worker {worker} exited with {code}:\n{tail}")
        result = json.loads(out_path.read_text())
        # ru_maxrss would include the parent's RSS at fork time (Linux copies the high-water mark);
        # the worker's own VmHWM counts only after exec.
        return Child(result, result.pop("vm_hwm_bytes", None) or usage.ru_maxrss * 1024, load)


def merge_results(a: Any, b: Any) -> Any:
    """Two repetitions' results as one: lists concatenated, dicts merged key by key, else the first."""
    if a is None:
        return b
    if isinstance(a, list) and isinstance(b, list):
        return a + b
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: merge_results(a.get(k), b.get(k)) if k in a and k in b else a.get(k, b.get(k))
                for k in {**a, **b}}
    return a


def vm_hwm_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def worker_main(name: str, spec_path: Path, out_path: Path) -> None:
    result = runners.WORKERS[name](json.loads(spec_path.read_text()))
    out_path.write_text(json.dumps({**result, "vm_hwm_bytes": vm_hwm_bytes()}))


# ---------------------------------------------------------------- preparation


def convert_all(ckpts: synth.Checkpoints, workdir: Path, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Convert (or reuse) both checkpoints; returns per-version paths and convert figures."""
    out: dict[str, dict[str, Any]] = {}
    for version, source in (("1.5", ckpts.llava15), ("1.6", ckpts.llava16)):
        dest = workdir / "gguf" / source.name
        record = dest / "convert.json"
        if record.exists() and not args.reconvert:
            out[version] = json.loads(record.read_text())
            continue
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        child = run_child("convert", {"source": str(source), "out_dir": str(dest), "quant": args.quant,
                                      "mmproj_type": "f16", "threads": args.threads}, workdir)
        out[version] = {**child.result, "max_rss_bytes": child.max_rss_bytes,
                        "checkpoint_bytes": ckpts.size_bytes, "largest_tensor_bytes": ckpts.largest_tensor_bytes,
                        "largest_tensor": ckpts.largest_tensor}
        record.write_text(json.dumps(out[version], indent=2))
    return out


def llm_stats(path: Path) -> dict[str, Any]:
    """Bytes a decode step reads (weights without the token embedding, which is only gathered)
    and the KV bytes per position for an f16 cache."""
    import gguf

    reader = gguf.GGUFReader(path)
    weights = sum(int(t.n_bytes) for t in reader.tensors if not t.name.startswith("token_embd"))
    arch = str(reader.fields["general.architecture"].contents())

    def field(key: str) -> int:
        return int(reader.fields[f"{arch}.{key}"].contents())

    n_layer, n_embd = field("block_count"), field("embedding_length")
    n_head, n_head_kv = field("attention.head_count"), field("attention.head_count_kv")
    kv_per_pos = 2 * n_layer * n_head_kv * (n_embd // n_head) * 2  # K and V, f16
    return {"weights_bytes": weights, "file_bytes": path.stat().st_size, "kv_bytes_per_position": kv_per_pos}


def image_token_counts(mmproj: Path, sizes_wh: list[tuple[int, int]]) -> list[int]:
    from llava_gguf.metadata import VisionSettings, read_gguf
    from llava_gguf.packing import count_image_tokens

    settings = VisionSettings.read(read_gguf(mmproj))
    return [count_image_tokens((h, w), settings) for w, h in sizes_wh]


# ---------------------------------------------------------------- figures


def rate(n: float, seconds: list[float]) -> float:
    return n / median(seconds)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def prompt_cache_rows(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """The second ask about an image in a new process against the first (the prompt cache)."""
    first, second = raw["ask_first"], raw["ask_second"]
    size = "x".join(map(str, raw["spec"]["cache_size"]))
    restore_s = second["prefill_s"]  # the restore plus the question's few tokens
    return [
        {"figure": f"TTFT 2nd ask 1.6 {size}, new process", "unit": "s", "ours": second["wall_s"],
         "peer": first["wall_s"], "peer_name": "1st ask (no cache)", "ratio": ratio(second["wall_s"], first["wall_s"]),
         "target": "<= 0.05", "note": f"{second['n_restored']} of {second['n_prompt_tokens']} positions restored"},
        {"figure": "prompt cache entry", "unit": "MiB", "ours": first["entry_bytes"] / MB, "peer": None,
         "peer_name": "", "ratio": None, "target": "", "note": f"{first['n_prompt_tokens']} positions, f16 KV"},
        {"figure": "prompt cache restore", "unit": "s", "ours": restore_s, "peer": first["prefill_s"],
         "peer_name": "prefill it replaces", "ratio": ratio(restore_s, first["prefill_s"]), "target": "",
         "note": f"1st ask: vision {first['vision_s']:.2f}s + prefill {first['prefill_s']:.2f}s"},
    ]


def summarize(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows: figure, unit, ours, peer, peer name, ours/peer, target and a note."""
    rows: list[dict[str, Any]] = []

    def row(figure: str, unit: str, ours: float | None, peer: float | None, peer_name: str, target: str = "",
            note: str = "") -> None:
        rows.append({"figure": figure, "unit": unit, "ours": ours, "peer": peer, "peer_name": peer_name,
                     "ratio": ratio(ours, peer), "target": target, "note": note})

    for version, c in raw["convert"].items():
        limit = 1.5 * c["largest_tensor_bytes"] + 300 * MB
        row(f"convert {version} wall", "s", c["wall_s"], None, "",
            note=f"checkpoint {c['checkpoint_bytes'] / 2**30:.2f} GiB f16")
        row(f"convert {version} peak RSS", "MiB", c["max_rss_bytes"] / MB, limit / MB, "1.5x largest+300MB",
            "<= 1.0", f"largest tensor {c['largest_tensor']} {c['largest_tensor_bytes'] / MB:.0f} MiB")
    ours, stock, hf = raw["ours"], raw["stock"], raw.get("transformers")
    row("vision", "s/tile", median(ours["vision_tile_s"]), median(stock["vision_tile_s"]), "libmtmd",
        note="ours: NumPy float32 exact encoder")
    o15, s15 = ours["ttft_15"], stock["ttft_15"]
    row("TTFT 1.5 640x480", "s", median([r["wall_s"] for r in o15]), median([r["wall_s"] for r in s15]),
        "Llava15ChatHandler",
        note=f"vision {median([r['vision_s'] for r in o15]):.2f}s + prefill {median([r['prefill_s'] for r in o15]):.2f}s")
    row("image tokens 1.5 640x480", "tokens", o15[0]["n_image_tokens"], s15[0]["n_image_tokens"], "libmtmd")
    for size, o in ours["ttft_16"].items():
        s = stock["ttft_16"][size]
        row(f"TTFT 1.6 {size}", "s", median([r["wall_s"] for r in o]), median([r["wall_s"] for r in s]),
            "Llava16ChatHandler", "<= 0.8",
            f"vision {median([r['vision_s'] for r in o]):.2f}s + prefill {median([r['prefill_s'] for r in o]):.2f}s")
        row(f"image tokens 1.6 {size}", "tokens", o[0]["n_image_tokens"], s[0]["n_image_tokens"], "libmtmd")
    for n, times in ours["pp"].items():
        row(f"prefill pp{n}", "tok/s", rate(int(n), times), rate(int(n), stock["pp"][n]), "Llama.eval")
    for n, times in ours["pp_embd"].items():
        row(f"prefill {n} image rows", "tok/s", rate(int(n), times), rate(int(n), stock["pp"][n]),
            "Llama.eval (tokens)", note="ours: embedding rows")
    ours_tg = median([r["n_generated"] / r["decode_s"] for r in ours["tg"]])
    stock_tg = median([r["n_generated"] / r["decode_s"] for r in stock["tg"]])
    n_tg = raw["spec"]["tg"]
    row(f"decode tg{n_tg}", "tok/s", ours_tg, stock_tg, "Llama.generate", ">= 0.9",
        note=f"ours generated {ours['tg'][0]['n_generated']} (EOS ends early)")
    stats, bw = raw["llm"], raw["bandwidth_bytes_per_s"]
    context = ours["tg"][0]["n_prompt_tokens"] + n_tg / 2
    bound = bw / (stats["weights_bytes"] + context * stats["kv_bytes_per_position"])
    row("decode / bandwidth bound", "fraction", ours_tg / bound, stock_tg / bound, "stock", "ours >= 0.8",
        f"bound {bound:.1f} tok/s = {bw / 1e9:.1f} GB/s / {stats['weights_bytes'] / MB:.0f} MiB weights + KV")
    n_e2e = raw["spec"]["e2e_tokens"]
    ours_e2e = median([r["wall_s"] for r in ours["e2e"]])
    stock_e2e = median([r["wall_s"] for r in stock["e2e"]])
    row(f"end to end 1.5, {n_e2e} tokens", "s", ours_e2e, stock_e2e, "Llava15ChatHandler",
        note=f"ours generated {median([r['n_generated'] for r in ours['e2e']]):.0f}")
    if hf is not None:
        row(f"end to end 1.5, {n_e2e} tokens", "s", ours_e2e, median(hf["e2e_s"]), "transformers f32", "<= 0.1")
    else:
        row(f"end to end 1.5, {n_e2e} tokens", "s", ours_e2e, None, "transformers f32", "<= 0.1",
            raw.get("transformers_skipped", "skipped"))
    rss = raw["rss"]
    row("peak RSS, benchmark runner", "MiB", rss["ours"] / MB, rss["stock"] / MB, "stock runner",
        note="each loads 1.5 then 1.6")
    if "transformers" in rss:
        row("peak RSS, 1.5 end to end", "MiB", rss["ours"] / MB, rss["transformers"] / MB, "transformers f32")
    kv = raw["spec"]["kv_rss"]
    w, h = raw["spec"]["rss_size"]
    row(f"peak RSS, 1.6 chat {w}x{h} {kv} KV", "MiB", rss["ours_chat"] / MB, rss["stock_chat"] / MB,
        "Llava16ChatHandler", "7b: ours <= 5632 MiB")
    rows += prompt_cache_rows(raw)
    return rows


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    a = abs(x)
    return f"{x:.3g}" if a < 100 else f"{x:.0f}"


def print_table(raw: dict[str, Any], rows: list[dict[str, Any]], file: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    m, v = raw["machine"], raw["versions"]
    title = (f"llava-gguf benchmark, shape {raw['shape']['name']}, {raw['spec']['quant']}, {raw['date']}\n"
             f"{m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; threads {raw['threads']}; "
             f"copy bandwidth {raw['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s; runs {raw['spec']['runs']} (median)\n"
             + ", ".join(f"{k} {x}" for k, x in v.items()))
    table = Table(title=title, title_justify="left")
    for col in ("figure", "unit", "ours", "peer", "ours/peer", "target", "vs", "note"):
        table.add_column(col, justify="right" if col in ("ours", "peer", "ours/peer") else "left")
    for r in rows:
        table.add_row(r["figure"], r["unit"], fmt(r["ours"]), fmt(r["peer"]), fmt(r["ratio"]), r["target"],
                      r["peer_name"], r["note"])
    Console(file=file, width=200).print(table)
    for note in raw["notes"]:
        print(f"- {note}", file=file)
    for worker, entry in raw.get("load", {}).items():
        state = f"DISTURBED in {entry['disturbed_runs']} run(s)" if entry["disturbed_runs"] else "idle machine"
        print(f"- load while {worker} ran: other processes used {entry['other_cpu_s']:.1f} CPU-s over "
              f"{entry['wall_s']:.0f} s ({state})", file=file)


# ---------------------------------------------------------------- the LLM alone, by repack setting

REPACK_SETTINGS = (("llm_ours", "auto"), ("llm_ours", "off"), ("llm_ours", "on"), ("llm_stock", "stock"))


def repack_crashes(threads: int) -> bool:
    from llava_gguf.llm.repack import choose_repack

    return choose_repack(threads).crashed


def repack_rows(spec: dict[str, Any], runs: int, workdir: Path, log: Any) -> list[dict[str, Any]]:
    """Each setting in its own process, the settings alternating round by round; every round's
    figures kept (the table gives their range), with the machine's load while each ran."""
    spec = {**spec, "runs": 2, "repack_pp": REPACK_PP, "repack_tg": REPACK_TG}
    settings = [(w, s) for w, s in REPACK_SETTINGS if not (spec["repack_crashes"] and s == "on")]
    rows = {setting: {"setting": setting, "rounds": []} for _, setting in settings}
    for repetition in range(runs):
        for worker, setting in settings:
            print(f"[bench] LLM alone, {setting} ({repetition + 1}/{runs})", file=log, flush=True)
            child = run_child(worker, {**spec, "repack": setting}, workdir)
            rows[setting]["rounds"].append({**child.result, "peak_rss_bytes": child.max_rss_bytes,
                                            "wall_s": child.wall_s, "other_cpu_s": child.other_cpu_s,
                                            "disturbed": child.disturbed})
    return list(rows.values())


REPACK_PP, REPACK_TG = 256, 64  # the conditions: a 256-token prefill, 64 tokens decoded one at a time


def print_repack_table(raw: dict[str, Any], rows: list[dict[str, Any]], file: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    m = raw["machine"]
    title = (f"the {raw['shape']['name']} {raw['spec']['quant']} LLM alone, {REPACK_PP}-token prefill, {REPACK_TG}-token "
             f"decode, {raw['date']}\n{m['cpu']}, {m['cores']} cores; threads {raw['threads']}; each round in its "
             "own process, the settings alternating")
    table = Table(title=title, title_justify="left")
    for col in ("runtime", "repack", "mmap", "prefill tok/s", "decode tok/s", "peak RSS MiB", "load s", "load"):
        table.add_column(col, justify="left" if col in ("runtime", "repack", "mmap", "load") else "right")

    def span(values: list[float]) -> str:
        lo, hi = min(values), max(values)
        return fmt(lo) if fmt(lo) == fmt(hi) else f"{fmt(lo)}-{fmt(hi)}"

    stock = next(r for r in rows if r["setting"] == "stock")
    for r in rows:
        rounds = r["rounds"]
        name = "stock llama_cpp.Llama" if r["setting"] == "stock" else f"ours, --repack {r['setting']}"
        disturbed = sum(x["disturbed"] for x in rounds)
        table.add_row(name, "on" if rounds[0]["repack"] else "off", "yes" if rounds[0]["mapped"] else "no",
                      span([x["prefill_tok_s"] for x in rounds]), span([x["decode_tok_s"] for x in rounds]),
                      span([x["peak_rss_bytes"] / MB for x in rounds]), span([x["load_s"] for x in rounds]),
                      f"DISTURBED in {disturbed} round(s)" if disturbed else "idle")
    Console(file=file, width=200).print(table)
    for r in rows:
        if r["setting"] == "stock":
            continue
        ratios = {key: statistics.median(x[key] for x in r["rounds"]) / statistics.median(x[key] for x in stock["rounds"])
                  for key in ("prefill_tok_s", "decode_tok_s", "peak_rss_bytes")}
        print(f"- ours --repack {r['setting']} / stock (medians): prefill {ratios['prefill_tok_s']:.2f}x, decode "
              f"{ratios['decode_tok_s']:.2f}x, peak RSS {ratios['peak_rss_bytes']:.2f}x", file=file)
    print(f"- auto: {rows[0]['rounds'][0]['reason']}", file=file)
    if raw["spec"]["repack_crashes"]:
        print("- llama.cpp's repacked kernels crash on this CPU (AMX, llama.cpp issue 20824): ours --repack on is "
              "refused and left out, the stock Llama runs with repacking off (its default crashes)", file=file)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shape, 1 run (seconds; for the test)")
    p.add_argument("--shape", choices=["1b", "7b"], default="1b")
    p.add_argument("--json", action="store_true", help="print the raw figures as JSON (the table goes to stderr)")
    p.add_argument("--runs", type=int, default=None, help="runs per figure (default 3, --quick 1)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "llava-gguf-bench")
    p.add_argument("--quant", default="Q4_K_M")
    p.add_argument("--flash-attn", action="store_true", help="flash attention on for both runners (default off, "
                   "llama-cpp-python's default)")
    p.add_argument("--e2e-tokens", type=int, default=None, help="new tokens end to end (default 32, --quick 4)")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--reconvert", action="store_true", help="convert again even when the GGUFs are cached")
    p.add_argument("--delete-checkpoints", action="store_true",
                   help="delete the f16 safetensors after converting (transformers then needs a rebuild)")
    p.add_argument("--only", choices=["prompt-cache", "repack"],
                   help="measure only these rows (the rest of the table stays as the last full run left it); "
                   "repack: the LLM alone under each weight-repacking setting against the stock Llama")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.spec, args.out)
        return 0
    shape = synth.SHAPES["tiny" if args.quick else args.shape]
    runs = args.runs or (1 if args.quick else 3)
    workdir = args.workdir.expanduser() / shape.name
    workdir.mkdir(parents=True, exist_ok=True)
    log = sys.stderr
    notes: list[str] = []

    print(f"[bench] building checkpoints ({shape.name}) under {workdir}", file=log, flush=True)
    start = time.perf_counter()
    ckpts = synth.build_checkpoints(workdir / "checkpoints", shape)
    print(f"[bench] checkpoints ready in {time.perf_counter() - start:.1f}s; converting", file=log, flush=True)
    converted = convert_all(ckpts, workdir, args)
    paths = {v: (Path(c["llm"]), Path(c["mmproj"])) for v, c in converted.items()}
    if args.delete_checkpoints:
        shutil.rmtree(workdir / "checkpoints")
    stats = llm_stats(paths["1.5"][0])
    n_img15, *n_img16 = image_token_counts(paths["1.6"][1], [E2E_SIZE, *SIZES16])
    n_img15 = image_token_counts(paths["1.5"][1], [E2E_SIZE])[0]
    spec: dict[str, Any] = {
        "runs": runs, "threads": args.threads, "n_ctx": 4096, "flash_attn": bool(args.flash_attn),
        "quant": args.quant, "question": QUESTION, "tg_prompt": TG_PROMPT, "tg": 128,
        "pp_tokens": [512], "pp_image_tokens": sorted({n_img15, max(n_img16)}),
        "image_size": shape.vision.image_size, "size15": E2E_SIZE, "sizes16": SIZES16, "e2e_size": E2E_SIZE,
        "e2e_tokens": args.e2e_tokens or (4 if args.quick else 32), "hf_runs": runs,
        "llm15": str(paths["1.5"][0]), "mmproj15": str(paths["1.5"][1]),
        "llm16": str(paths["1.6"][0]), "mmproj16": str(paths["1.6"][1]),
        "kv_rss": "q8_0", "rss_size": (672, 672), "rss_tokens": 16, "source15": str(ckpts.llava15),
        "cache_size": CACHE_SIZE, "prompt_cache_dir": str(workdir / "prompt-cache"),
        # llama.cpp's repacked kernels crash on some CPUs (AMX, llama.cpp issue 20824): the stock Llama's
        # default then cannot run, so it runs with repacking off and ours' --repack on is left out
        "repack_crashes": repack_crashes(args.threads),
    }
    print("[bench] measuring copy bandwidth", file=log, flush=True)
    bandwidth = copy_bandwidth((256 if args.quick else 1024) * MB)
    raw: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(), "versions": versions(),
        "threads": args.threads, "shape": asdict(shape), "spec": spec, "convert": converted, "llm": stats,
        "bandwidth_bytes_per_s": bandwidth, "notes": notes,
    }
    if args.only == "repack":
        print_repack_table(raw, repack_rows(spec, runs, workdir, log), sys.stdout)
        return 0
    rss: dict[str, int] = {}
    shutil.rmtree(spec["prompt_cache_dir"], ignore_errors=True)
    for name in ("ask_first", "ask_second"):  # two processes in a row: the second restores the image's prefix
        print(f"[bench] running ours, {name.replace('_', ' ')} (prompt cache)", file=log, flush=True)
        raw[name] = run_child("ours_ask", spec, workdir).result
    if args.only == "prompt-cache":
        rows = prompt_cache_rows(raw)
        print_table(raw, rows, sys.stdout)
        return 0
    load: dict[str, dict[str, Any]] = {}
    raw["load"] = load
    # the compared runners alternate, one repetition each in turn, so both see the same conditions
    for pair in (("ours", "stock"), ("ours_chat", "stock_chat")):
        for repetition in range(runs):
            for worker in pair:
                print(f"[bench] running {worker} ({repetition + 1}/{runs})", file=log, flush=True)
                child = run_child(worker, {**spec, "runs": 1}, workdir)
                raw[worker] = merge_results(raw.get(worker), child.result)
                rss[worker] = max(rss.get(worker, 0), child.max_rss_bytes)
                entry = load.setdefault(worker, {"wall_s": 0.0, "other_cpu_s": 0.0, "disturbed_runs": 0})
                entry["wall_s"] += child.wall_s
                entry["other_cpu_s"] += child.other_cpu_s
                entry["disturbed_runs"] += child.disturbed
                mark = "  DISTURBED" if child.disturbed else ""
                print(f"[bench] {worker} done in {child.wall_s:.1f}s; other processes used "
                      f"{child.other_cpu_s:.1f} CPU-s{mark}", file=log, flush=True)
    f32_bytes = 2 * ckpts.size_bytes  # the checkpoint is f16
    if args.skip_transformers:
        raw["transformers_skipped"] = "skipped (--skip-transformers)"
    elif f32_bytes + 2 * 2**30 > _available_bytes():
        raw["transformers_skipped"] = (f"skipped: float32 weights need {f32_bytes / 2**30:.1f} GiB, "
                                       f"{_available_bytes() / 2**30:.1f} GiB available")
    elif not ckpts.llava15.exists():
        raw["transformers_skipped"] = "skipped: checkpoints deleted (--delete-checkpoints)"
    else:
        print("[bench] running transformers", file=log, flush=True)
        child = run_child("transformers", spec, workdir)
        raw["transformers"] = child.result
        rss["transformers"] = child.max_rss_bytes
    if "transformers_skipped" in raw:
        notes.append(f"transformers {raw['transformers_skipped']}")
    raw["rss"] = rss
    notes += [
        "weights are random: the speed is real, the answers are not; images are noise PNGs, new per run",
        "TTFT = call to first sampled token (max_tokens=1), image decode + vision + prefill included",
        "stock image tokens come from libmtmd's image chunks; ours from the packed (unpadded) features",
        "decode bound: bytes read per token = LLM weights (no token_embd) + f16 KV at the mean position",
        f"ours: {raw['ours'].get('repack', 'weight repacking: not reported')}; stock: llama.cpp's defaults "
        "(repacking on, mmap)",
        "ours and the stock runner alternate, one repetition each in turn; a run is DISTURBED when other "
        f"processes used more than {DISTURBED_FRACTION:g} of a core on average while it ran",
    ]
    rows = summarize(raw)
    raw["rows"] = rows
    print_table(raw, rows, sys.stderr if args.json else sys.stdout)
    if args.json:
        json.dump(raw, sys.stdout, indent=1, default=float)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
