"""The server under load, `--parallel 1` against the default (and `--parallel 4` when the default differs),
in one run: requests per minute, generated tokens per second in aggregate, p50/p95 time to the first and
to the last token, for 1, 4 and 8 concurrent clients each asking about a new image, and for 4 clients
asking text-only follow-up turns (decode-bound); then the first turn's and a follow-up turn's time to first
token, and peak RSS over many requests.

    python benchmarks/server.py --shape tiny          # seconds
    python benchmarks/server.py --shape 1b --json     # minutes: a TinyLlama-shaped LLM with CLIP-L/336

The model is the synthetic LLaVA 1.5 checkpoint of ``benchmarks/synth.py`` (random weights, real shapes),
converted once (Q4_K_M, f16 mmproj) and served in this process by the real app under uvicorn on a loopback
port; clients are the `openai` package in threads, streaming (the first token's time is the first text
chunk's). Each image request asks about a new noise image (nothing cached helps), ``--tokens`` new tokens
at temperature 0. Every figure carries the other processes' CPU use over its span (``machine_load``): a
row marked DISTURBED was measured while others used more than a tenth of a core.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import openai  # noqa: E402
import synth  # noqa: E402
import uvicorn  # noqa: E402
from runners import converted_llava15, png_bytes  # noqa: E402

from llava_gguf.llm.llama import LlamaOptions  # noqa: E402
from llava_gguf.llm.sizing import default_sequences  # noqa: E402
from llava_gguf.machine_load import BUSY_CORES, LoadMeter  # noqa: E402
from llava_gguf.model import LlavaModel, RuntimeOptions  # noqa: E402
from llava_gguf.server.app import create_app  # noqa: E402
from llava_gguf.server.service import ChatService, ServiceOptions  # noqa: E402

NAME = "bench"
QUESTION = "What is in the picture?"
# a text-only conversation: each client's follow-up turn decodes its answer (decode-bound)
TALK = [{"role": "user", "content": "Tell me about the sea."},
        {"role": "assistant", "content": "The sea is large and blue."}]


def serve(model: LlavaModel, parallel: int, max_queue: int) -> tuple[uvicorn.Server, ChatService, str]:
    service = ChatService(model, ServiceOptions(name=NAME, parallel=parallel, max_queue=max_queue))
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return server, service, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1"


def image_part(size: tuple[int, int], seed: int) -> dict[str, Any]:
    data = base64.b64encode(png_bytes(size, seed)).decode()
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}


def streamed(url: str, messages: list[dict[str, Any]], max_tokens: int) -> dict[str, float]:
    """One streamed request: seconds to the first token and to the end (the client's clock), and the tokens
    generated. Random weights often write tokens with no text (a lone byte, a control token), so the first
    token's time is the end less the server's decoding time from the first token (``timings``)."""
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=1200)
    start = time.perf_counter()
    tokens, decoding_s = 0, 0.0
    for chunk in client.chat.completions.create(model=NAME, temperature=0, max_tokens=max_tokens, messages=messages,
                                                stream=True, stream_options={"include_usage": True}):
        spent = (chunk.model_extra or {}).get("timings")
        if spent is not None:
            decoding_s = spent["predicted_ms"] / 1e3
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    last = time.perf_counter() - start
    return {"first_s": last - decoding_s, "last_s": last, "tokens": tokens}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def load(url: str, clients: int, requests: int, make_messages, max_tokens: int) -> dict[str, Any]:
    meter = LoadMeter()
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: streamed(url, make_messages(i), max_tokens), range(requests)))
    wall = time.perf_counter() - start
    machine = meter.stop()
    firsts, lasts = [r["first_s"] for r in results], [r["last_s"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": requests, "wall_s": wall, "requests_per_min": 60 * requests / wall,
            "generated_tokens": tokens, "tokens_per_s": tokens / wall,
            "first_p50_s": statistics.median(firsts), "first_p95_s": percentile(firsts, 0.95),
            "last_p50_s": statistics.median(lasts), "last_p95_s": percentile(lasts, 0.95),
            "other_cores": machine.other_cores, "disturbed": machine.busy(BUSY_CORES)}


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def show(label: str, row: dict[str, Any]) -> None:
    flag = "  DISTURBED" if row["disturbed"] else ""
    print(f"  {label:34} {row['requests']:2d} req in {row['wall_s']:6.1f} s  {row['requests_per_min']:5.1f}/min  "
          f"{row['tokens_per_s']:6.1f} tok/s  first p50 {row['first_p50_s']:5.2f} p95 {row['first_p95_s']:5.2f} s  "
          f"last p50 {row['last_p50_s']:5.2f} p95 {row['last_p95_s']:5.2f} s  "
          f"(others {row['other_cores'] or 0:.2f} cores){flag}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", "1b"], default="tiny")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "llava-gguf-bench")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per answer (default 128)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8], help="image loads (default 1 4 8)")
    parser.add_argument("--per-client", type=int, default=1, help="image requests per client (default 1; 1 client: 2)")
    parser.add_argument("--parallel", type=int, nargs="+", default=None,
                        help="settings to compare (default: 1, the default, and 4 when the default differs)")
    parser.add_argument("--rss-requests", type=int, default=None, help="requests for the RSS figure (tiny: 200)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    shape = synth.SHAPES[args.shape]
    out = converted_llava15(shape, args.workdir)
    llm = next(p for p in out.glob("*.gguf") if "mmproj" not in p.name)
    mmproj = next(out.glob("*mmproj*.gguf"))
    options = RuntimeOptions(llama=LlamaOptions(n_threads=args.threads, n_ctx=2048), prompt_cache=False)
    model = LlavaModel(llm, mmproj, options)
    default, why = default_sequences(0, args.threads)
    settings = args.parallel or sorted({1, default, 4})
    size = (shape.vision.image_size, shape.vision.image_size)
    report: dict[str, Any] = {"shape": shape.name, "threads": args.threads, "image": size, "tokens": args.tokens,
                              "cpu": os.cpu_count(), "default_parallel": default, "default_why": why, "runs": []}
    print(f"{shape.name} shape, {args.threads} threads, new {size[0]}x{size[1]} image per request, {args.tokens}-token "
          f"answers; default --parallel {default} ({why})", flush=True)
    seed = 1000
    try:
        for parallel in settings:
            server, service, url = serve(model, parallel, max_queue=16)
            label = f"--parallel {parallel}" + (" (default)" if parallel == default else "")
            print(label, flush=True)
            run: dict[str, Any] = {"parallel": parallel, "default": parallel == default, "loads": []}
            try:
                streamed(url, [{"role": "user", "content": [image_part(size, 1), {"type": "text", "text": QUESTION}]}],
                         4)  # warm-up
                for clients in args.clients:
                    n = clients * (2 if clients == 1 else 1) * args.per_client
                    base = seed
                    row = load(url, clients, n, lambda i, base=base: [{"role": "user", "content": [
                        image_part(size, base + i), {"type": "text", "text": QUESTION}]}], args.tokens)
                    seed += n
                    row["kind"] = "new image"
                    run["loads"].append(row)
                    show(f"{clients} client(s), a new image each", row)
                row = load(url, 4, 4, lambda i: [*TALK, {"role": "user", "content": f"And fish number {i}?"}],
                           args.tokens)
                row["kind"] = "text-only follow-up"
                run["loads"].append(row)
                show("4 clients, text-only follow-ups", row)
                messages = [{"role": "user", "content": [image_part(size, 7 + parallel),
                                                         {"type": "text", "text": QUESTION}]}]
                first = streamed(url, messages, 8)
                client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
                answer = client.chat.completions.create(model=NAME, temperature=0, max_tokens=8,
                                                        messages=messages).choices[0].message.content
                follow = streamed(url, [*messages, {"role": "assistant", "content": answer},
                                        {"role": "user", "content": "And what colour is it?"}], 8)
                run["ttft_first_s"], run["ttft_follow_up_s"] = first["first_s"], follow["first_s"]
                print(f"  time to first token: first turn {first['first_s']:.2f} s, follow-up turn "
                      f"{follow['first_s']:.2f} s ({follow['first_s'] / first['first_s']:.3f}x)", flush=True)
                if args.rss_requests or args.shape == "tiny":
                    n_rss = args.rss_requests or 200
                    marks = []
                    for i in range(n_rss):
                        streamed(url, [{"role": "user", "content": [image_part(size, 50_000 + i),
                                                                    {"type": "text", "text": QUESTION}]}], 8)
                        if i in (n_rss // 10, n_rss // 2, n_rss - 1):
                            marks.append((i + 1, rss_mib()))
                    run["peak_rss_mib"] = marks
                    print("  peak RSS after " + ", ".join(f"{n} requests {mib:.0f} MiB" for n, mib in marks), flush=True)
            finally:
                server.should_exit = True
                service.close()
            report["runs"].append(run)
        base_run = next(r for r in report["runs"] if r["parallel"] == 1)
        print("against --parallel 1 (same load): aggregate tok/s, p95 time to first token", flush=True)
        for run in report["runs"]:
            if run is base_run:
                continue
            for row, base_row in zip(run["loads"], base_run["loads"]):
                what = f"{row['clients']} client(s), {row['kind']}"
                print(f"  --parallel {run['parallel']}: {what:34} {row['tokens_per_s'] / base_row['tokens_per_s']:5.2f}x "
                      f"tok/s, first-token p95 {row['first_p95_s']:.2f} s vs {base_row['first_p95_s']:.2f} s", flush=True)
    finally:
        model.close()
    if args.json:
        print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
