"""The server under load: requests per minute and p50/p95 latency with 1, 4 and 8 concurrent clients,
peak RSS over many requests, and the time to first token of a follow-up turn against the first turn.

    python benchmarks/server.py --shape tiny          # seconds
    python benchmarks/server.py --shape 1b --json     # minutes: a TinyLlama-shaped LLM with CLIP-L/336

The model is the synthetic LLaVA 1.5 checkpoint of ``benchmarks/synth.py`` (random weights, real
shapes), converted once (Q4_K_M, f16 mmproj) and served in this process by the real app under
uvicorn on a loopback port; clients are the `openai` package in threads. Each request asks about
a new noise image (nothing cached helps), 8 new tokens at temperature 0.
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
from llava_gguf.model import LlavaModel, RuntimeOptions  # noqa: E402
from llava_gguf.server.app import create_app  # noqa: E402
from llava_gguf.server.service import ChatService, ServiceOptions  # noqa: E402

NAME = "bench"
QUESTION = "What is in the picture?"


def serve(model: LlavaModel, max_queue: int) -> tuple[uvicorn.Server, str]:
    app = create_app(ChatService(model, ServiceOptions(name=NAME, max_queue=max_queue)))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return server, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1"


def image_part(size: tuple[int, int], seed: int) -> dict[str, Any]:
    data = base64.b64encode(png_bytes(size, seed)).decode()
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}


def ask(url: str, size: tuple[int, int], seed: int, max_tokens: int = 8) -> float:
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    start = time.perf_counter()
    client.chat.completions.create(model=NAME, temperature=0, max_tokens=max_tokens, messages=[
        {"role": "user", "content": [image_part(size, seed), {"type": "text", "text": QUESTION}]}])
    return time.perf_counter() - start


def load(url: str, clients: int, per_client: int, size: tuple[int, int], seed0: int) -> dict[str, Any]:
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(lambda i: ask(url, size, seed0 + i), range(clients * per_client)))
    wall = time.perf_counter() - start
    ordered = sorted(latencies)
    return {"clients": clients, "requests": len(latencies), "wall_s": wall,
            "requests_per_min": 60 * len(latencies) / wall, "p50_s": statistics.median(ordered),
            "p95_s": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]}


def ttft(url: str, messages: list[dict[str, Any]]) -> tuple[float, str]:
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    start = time.perf_counter()
    first = None
    text = ""
    for chunk in client.chat.completions.create(model=NAME, temperature=0, max_tokens=8, messages=messages,
                                                stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - start
            text += chunk.choices[0].delta.content
    return first or time.perf_counter() - start, text


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", "1b"], default="tiny")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "llava-gguf-bench")
    parser.add_argument("--per-client", type=int, default=None, help="requests per client (default 3; 1b: 2)")
    parser.add_argument("--rss-requests", type=int, default=None, help="requests for the RSS figure (tiny: 200)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    shape = synth.SHAPES[args.shape]
    out = converted_llava15(shape, args.workdir)
    llm = next(p for p in out.glob("*.gguf") if "mmproj" not in p.name)
    mmproj = next(out.glob("*mmproj*.gguf"))
    options = RuntimeOptions(llama=LlamaOptions(n_threads=args.threads, n_ctx=4096), prompt_cache=False)
    model = LlavaModel(llm, mmproj, options)
    size = (shape.vision.image_size, shape.vision.image_size)
    server, url = serve(model, max_queue=16)
    per_client = args.per_client or (2 if args.shape == "1b" else 3)
    report: dict[str, Any] = {"shape": shape.name, "threads": args.threads, "image": size, "max_tokens": 8,
                              "load": [], "cpu": os.cpu_count()}
    try:
        ask(url, size, 0)  # warm-up
        for i, clients in enumerate((1, 4, 8)):
            row = load(url, clients, per_client, size, 1000 * (i + 1))
            report["load"].append(row)
            print(f"{clients} client(s): {row['requests']} requests in {row['wall_s']:.1f} s, "
                  f"{row['requests_per_min']:.1f}/min, p50 {row['p50_s']:.2f} s, p95 {row['p95_s']:.2f} s", flush=True)
        messages = [{"role": "user", "content": [image_part(size, 7), {"type": "text", "text": QUESTION}]}]
        first_s, answer = ttft(url, messages)
        follow_s, _ = ttft(url, [*messages, {"role": "assistant", "content": answer},
                                 {"role": "user", "content": "And what colour is it?"}])
        report["ttft_first_s"], report["ttft_follow_up_s"] = first_s, follow_s
        print(f"time to first token: first turn {first_s:.2f} s, follow-up turn {follow_s:.2f} s "
              f"({follow_s / first_s:.3f}x)", flush=True)
        n_rss = args.rss_requests or (200 if args.shape == "tiny" else 20)
        marks = []
        for i in range(n_rss):
            ask(url, size, 5000 + i)
            if i in (n_rss // 10, n_rss // 2, n_rss - 1):
                marks.append((i + 1, rss_mib()))
        report["peak_rss_mib"] = marks
        print("peak RSS after " + ", ".join(f"{n} requests {mib:.0f} MiB" for n, mib in marks), flush=True)
    finally:
        server.should_exit = True
        model.close()
    if args.json:
        print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
