"""What each benchmark subprocess runs: one runner (ours, the stock llama-cpp-python handlers,
transformers, the converter) per process, so its peak RSS is its own.

Every worker takes a JSON-able spec and returns a dict of raw figures; times are lists of
per-run seconds (the caller takes medians). Images are random noise PNGs drawn per run, so no
feature cache or KV prefix is ever reused between runs.
"""

from __future__ import annotations

import base64
import ctypes
import io
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

Spec = dict[str, Any]


def timed(fn: Callable[[], Any], runs: int, warmup: int = 0) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def png_bytes(size_wh: tuple[int, int], seed: int) -> bytes:
    """A noise image of ``size_wh`` as PNG bytes (the same bytes reach every runner)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size_wh[1], size_wh[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _image_seed(size_wh: tuple[int, int], run: int) -> int:
    return 1000 * run + size_wh[0] + 7 * size_wh[1]


def _random_tokens(n: int, n_vocab: int, seed: int = 0) -> list[int]:
    # ids 3..min(n_vocab, 480): plain pieces of the small SentencePiece vocab
    return np.random.default_rng(seed).integers(3, min(n_vocab, 480), n).tolist()


# ---------------------------------------------------------------- converter


def run_convert(spec: Spec) -> dict[str, Any]:
    from llava_gguf.convert import ConvertOptions, MmprojType, Quant, convert_checkpoint

    options = ConvertOptions(quant=Quant(spec["quant"]), mmproj_type=MmprojType(spec["mmproj_type"]),
                             threads=spec["threads"])
    start = time.perf_counter()
    result = convert_checkpoint(spec["source"], spec["out_dir"], options)
    return {"wall_s": time.perf_counter() - start, "llm": str(result.llm), "mmproj": str(result.mmproj)}


# ---------------------------------------------------------------- ours


def _ours_model(llm: str, mmproj: str, spec: Spec, kv: str = "f16", prompt_cache_dir: str | None = None) -> Any:
    """The runtime as the CLI runs it; the prompt cache only where a figure is about it (elsewhere a
    restored prefix would stand in for the prefill being measured)."""
    from llava_gguf.llm.llama import KVCacheType, LlamaOptions
    from llava_gguf.model import LlavaModel, RuntimeOptions

    llama = LlamaOptions(n_ctx=spec["n_ctx"], n_threads=spec["threads"], kv_cache_type=KVCacheType(kv),
                         flash_attn=spec["flash_attn"] or kv != "f16")  # a quantized V cache needs it
    options = RuntimeOptions(llama=llama, prompt_cache=prompt_cache_dir is not None,
                             prompt_cache_dir=Path(prompt_cache_dir) if prompt_cache_dir else None)
    return LlavaModel(llm, mmproj, options)


def _ours_answer(model: Any, question: str, images: list[bytes], max_tokens: int) -> dict[str, Any]:
    from llava_gguf.llm.sampling import SamplingOptions
    from llava_gguf.model import GenerationOptions

    model.runtime.truncate(0)  # no KV prefix reuse between runs
    options = GenerationOptions(max_tokens=max_tokens, sampling=SamplingOptions(temperature=0))
    start = time.perf_counter()
    for _ in model.chat().send(question, images, options):
        pass
    wall = time.perf_counter() - start
    t = model.timings
    return {"wall_s": wall, "vision_s": t.vision_encode_s, "prefill_s": t.prefill_s, "decode_s": t.decode_s,
            "n_image_tokens": sum(t.n_image_tokens), "n_prompt_tokens": t.n_prompt_tokens,
            "n_generated": t.n_generated, "n_restored": t.n_restored}


def _ours_prefill(model: Any, n: int, embeddings: bool) -> float:
    rt = model.runtime
    rt.ensure_context(n)
    rt.truncate(0)
    if embeddings:
        rows = np.random.default_rng(n).standard_normal((n, rt.n_embd), dtype=np.float32) * 0.02
        start = time.perf_counter()
        rt.decode_embeddings(rows)
    else:
        tokens = _random_tokens(n, rt.n_vocab, n)
        start = time.perf_counter()
        rt.decode_tokens(tokens)
    return time.perf_counter() - start


def run_ours(spec: Spec) -> dict[str, Any]:
    runs, question = spec["runs"], spec["question"]
    out: dict[str, Any] = {}
    model = _ours_model(spec["llm15"], spec["mmproj15"], spec)
    out["repack"] = model.runtime.repack_reason
    # warm-up: one small chat (loads pages, allocates compute buffers)
    _ours_answer(model, question, [png_bytes((64, 64), 1)], 2)
    tile = np.random.default_rng(0).standard_normal((1, 3, spec["image_size"], spec["image_size"]), dtype=np.float32)
    out["vision_tile_s"] = timed(lambda: model.encoder.encode(tile), runs)
    out["ttft_15"] = [_ours_answer(model, question, [png_bytes(spec["size15"], _image_seed(spec["size15"], r))], 1)
                      for r in range(runs)]
    out["pp"] = {str(n): [_ours_prefill(model, n, embeddings=False) for _ in range(runs)] for n in spec["pp_tokens"]}
    out["pp_embd"] = {str(n): [_ours_prefill(model, n, embeddings=True) for _ in range(runs)]
                      for n in spec["pp_image_tokens"]}
    out["tg"] = [_ours_answer(model, spec["tg_prompt"], [], spec["tg"]) for _ in range(runs)]
    out["e2e"] = [_ours_answer(model, question, [png_bytes(spec["e2e_size"], _image_seed(spec["e2e_size"], r))],
                               spec["e2e_tokens"]) for r in range(runs)]
    model.close()
    del model
    model = _ours_model(spec["llm16"], spec["mmproj16"], spec)
    _ours_answer(model, question, [png_bytes((64, 64), 1)], 2)
    out["ttft_16"] = {f"{w}x{h}": [_ours_answer(model, question, [png_bytes((w, h), _image_seed((w, h), r))], 1)
                                   for r in range(runs)] for w, h in spec["sizes16"]}
    model.close()
    return out


def run_ours_ask(spec: Spec) -> dict[str, Any]:
    """One `ask` about the cache figure's image in this new process, with the prompt cache in
    ``spec["prompt_cache_dir"]``: the first run saves the prefix, the next one restores it."""
    directory = Path(spec["prompt_cache_dir"])
    start = time.perf_counter()
    model = _ours_model(spec["llm16"], spec["mmproj16"], spec, prompt_cache_dir=str(directory))
    load_s = time.perf_counter() - start
    size = tuple(spec["cache_size"])
    out = _ours_answer(model, spec["question"], [png_bytes(size, _image_seed(size, 0))], 1)
    model.close()
    entries = list(directory.glob("*.kv"))
    return {**out, "load_s": load_s, "entry_bytes": sum(p.stat().st_size for p in entries), "entries": len(entries)}


def run_ours_chat(spec: Spec) -> dict[str, Any]:
    """One LLaVA 1.6 chat with one image, for peak RSS (the KV cache type is the spec's)."""
    model = _ours_model(spec["llm16"], spec["mmproj16"], spec, kv=spec["kv_rss"])
    w, h = spec["rss_size"]
    return _ours_answer(model, spec["question"], [png_bytes((w, h), 5)], spec["rss_tokens"])


# ---------------------------------------------------------------- stock llama-cpp-python


class _CountingMtmd:
    """The mtmd_cpp module, recording each image chunk's token count and evaluation time."""

    def __init__(self, module: Any) -> None:
        self._module = module
        self.image_tokens: list[int] = []
        self.image_eval_s: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def mtmd_helper_eval_chunk_single(self, ctx: Any, lctx: Any, chunk: Any, *args: Any) -> int:
        m = self._module
        if m.mtmd_input_chunk_get_type(chunk) != m.MTMD_INPUT_CHUNK_TYPE_TEXT:
            self.image_tokens.append(int(m.mtmd_input_chunk_get_n_tokens(chunk)))
            start = time.perf_counter()
            result = m.mtmd_helper_eval_chunk_single(ctx, lctx, chunk, *args)
            self.image_eval_s.append(time.perf_counter() - start)
            return result
        return m.mtmd_helper_eval_chunk_single(ctx, lctx, chunk, *args)


def _stock_defaults(spec: Spec) -> str:
    """llama.cpp's defaults for the stock Llama, except where its repacked kernels crash (AMX, llama.cpp
    issue 20824): there repacking is off, the one way the stock Llama runs at all (``Llama`` has no
    option for it, so the default parameters it starts from are changed). Says which."""
    from llama_cpp import llama_cpp as bindings  # where Llama takes its default parameters from

    if not spec.get("repack_crashes"):
        return "llama.cpp's defaults"
    default_params = bindings.llama_model_default_params

    def without_repacking() -> Any:
        params = default_params()
        params.use_extra_bufts = False
        return params

    bindings.llama_model_default_params = without_repacking
    return "llama.cpp's defaults but repacking off (it crashes on this CPU)"


def _stock_llama(llm: str, mmproj: str, version: str, spec: Spec, kv: str = "f16") -> tuple[Any, Any, _CountingMtmd]:
    import llama_cpp

    _stock_defaults(spec)
    from llama_cpp.llama_chat_format import Llava15ChatHandler, Llava16ChatHandler

    handler_cls = Llava15ChatHandler if version == "1.5" else Llava16ChatHandler
    handler = handler_cls(clip_model_path=mmproj, verbose=False)
    counter = _CountingMtmd(handler._mtmd_cpp)
    handler._mtmd_cpp = counter
    kv_type = int(getattr(llama_cpp, f"GGML_TYPE_{kv.upper()}"))
    llama = llama_cpp.Llama(model_path=llm, chat_handler=handler, n_ctx=spec["n_ctx"], n_batch=512,
                            n_threads=spec["threads"], n_threads_batch=spec["threads"],
                            flash_attn=bool(spec["flash_attn"]) or kv != "f16", type_k=kv_type, type_v=kv_type, verbose=False)
    return llama, handler, counter


def _stock_answer(llama: Any, counter: _CountingMtmd, question: str, image: bytes, max_tokens: int) -> dict[str, Any]:
    uri = "data:image/png;base64," + base64.b64encode(image).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                             {"type": "text", "text": question}]}]
    counter.image_tokens.clear()
    counter.image_eval_s.clear()
    start = time.perf_counter()
    first = None
    n = 0
    for chunk in llama.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0, stream=True):
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content") is not None and first is None:
            first = time.perf_counter() - start
        n += 1
    wall = time.perf_counter() - start
    return {"wall_s": wall, "first_s": first if first is not None else wall,
            "n_image_tokens": sum(counter.image_tokens), "image_eval_s": sum(counter.image_eval_s),
            "n_prompt_tokens": int(llama.n_tokens), "n_chunks": n}


def _mtmd_tile_s(handler: Any, llama: Any, size: int) -> tuple[float, int]:
    """Encode one image with libmtmd (no LLM decode): seconds and the number of tiles it made."""
    m = handler._mtmd_cpp._module
    handler._init_mtmd_context(llama)
    bitmap = handler._create_bitmap_from_bytes(png_bytes((size, size), 3))
    chunks = m.mtmd_input_chunks_init()
    text = m.mtmd_input_text()
    raw = m.mtmd_default_marker()
    text.text, text.text_len, text.add_special, text.parse_special = raw, len(raw), False, True
    try:
        array = (m.mtmd_bitmap_p_ctypes * 1)(bitmap)
        if m.mtmd_tokenize(handler.mtmd_ctx, chunks, ctypes.byref(text), array, 1) != 0:
            raise RuntimeError("mtmd_tokenize failed")
        for i in range(m.mtmd_input_chunks_size(chunks)):
            chunk = m.mtmd_input_chunks_get(chunks, i)
            if m.mtmd_input_chunk_get_type(chunk) == m.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                n_tokens = m.mtmd_input_chunk_get_n_tokens(chunk)
                start = time.perf_counter()
                if m.mtmd_encode_chunk(handler.mtmd_ctx, chunk) != 0:
                    raise RuntimeError("mtmd_encode_chunk failed")
                return time.perf_counter() - start, n_tokens
        raise RuntimeError("no image chunk")
    finally:
        m.mtmd_input_chunks_free(chunks)
        m.mtmd_bitmap_free(bitmap)


def _stock_prefill(llama: Any, n: int) -> float:
    tokens = _random_tokens(n, llama.n_vocab(), n)
    llama.reset()
    start = time.perf_counter()
    llama.eval(tokens)
    return time.perf_counter() - start


def _stock_decode(llama: Any, prompt: str, n: int) -> dict[str, Any]:
    tokens = llama.tokenize(prompt.encode(), add_bos=True, special=True)
    llama.reset()
    start = time.perf_counter()
    first = 0.0
    count = 0
    for _ in llama.generate(tokens, temp=0, top_k=1, reset=True):
        count += 1
        if count == 1:
            first = time.perf_counter()
        if count == n:
            break
    return {"decode_s": time.perf_counter() - first, "n_generated": count - 1,
            "prefill_s": first - start, "n_prompt_tokens": len(tokens)}


def run_stock(spec: Spec) -> dict[str, Any]:
    runs, question = spec["runs"], spec["question"]
    out: dict[str, Any] = {}
    llama, handler, counter = _stock_llama(spec["llm15"], spec["mmproj15"], "1.5", spec)
    _stock_answer(llama, counter, question, png_bytes((64, 64), 1), 2)
    tiles = [_mtmd_tile_s(handler, llama, spec["image_size"]) for _ in range(runs)]
    out["vision_tile_s"] = [s for s, _ in tiles]
    out["ttft_15"] = [_stock_answer(llama, counter, question, png_bytes(spec["size15"], _image_seed(spec["size15"], r)), 1)
                      for r in range(runs)]
    out["pp"] = {str(n): [_stock_prefill(llama, n) for _ in range(runs)]
                 for n in [*spec["pp_tokens"], *spec["pp_image_tokens"]]}
    out["tg"] = [_stock_decode(llama, spec["tg_prompt"], spec["tg"] + 1) for _ in range(runs)]
    out["e2e"] = [_stock_answer(llama, counter, question, png_bytes(spec["e2e_size"], _image_seed(spec["e2e_size"], r)),
                                spec["e2e_tokens"]) for r in range(runs)]
    llama.close()
    del llama, handler
    llama, handler, counter = _stock_llama(spec["llm16"], spec["mmproj16"], "1.6", spec)
    _stock_answer(llama, counter, question, png_bytes((64, 64), 1), 2)
    out["ttft_16"] = {f"{w}x{h}": [_stock_answer(llama, counter, question, png_bytes((w, h), _image_seed((w, h), r)), 1)
                                   for r in range(runs)] for w, h in spec["sizes16"]}
    llama.close()
    return out


def run_stock_chat(spec: Spec) -> dict[str, Any]:
    llama, _, counter = _stock_llama(spec["llm16"], spec["mmproj16"], "1.6", spec, kv=spec["kv_rss"])
    w, h = spec["rss_size"]
    return _stock_answer(llama, counter, spec["question"], png_bytes((w, h), 5), spec["rss_tokens"])


# ---------------------------------------------------------------- transformers


def run_transformers(spec: Spec) -> dict[str, Any]:
    """LLaVA 1.5 end to end in float32 on the CPU: image processor, prefill, N greedy tokens."""
    import sentencepiece as spm
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    torch.set_num_threads(spec["threads"])
    source = Path(spec["source15"])
    start = time.perf_counter()
    model = LlavaForConditionalGeneration.from_pretrained(str(source), dtype=torch.float32).eval()
    load_s = time.perf_counter() - start
    processor = AutoImageProcessor.from_pretrained(str(source))
    sp = spm.SentencePieceProcessor(model_file=str(source / "tokenizer.model"))
    image_id = int(model.config.image_token_id)
    n_image = int(model.config.image_seq_length)
    ids = [1, *sp.encode("USER: "), *[image_id] * n_image, *sp.encode("\n" + spec["question"] + " ASSISTANT:")]
    n = spec["e2e_tokens"]

    def answer(image: bytes) -> None:
        pixels = processor(Image.open(io.BytesIO(image)), return_tensors="pt")["pixel_values"]
        input_ids = torch.tensor([ids])
        with torch.inference_mode():
            model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixels,
                           max_new_tokens=n, min_new_tokens=n, do_sample=False)

    w, h = spec["e2e_size"]
    answer(png_bytes((64, 64), 1))
    times = [timed(lambda r=r: answer(png_bytes((w, h), _image_seed((w, h), r))), 1)[0] for r in range(spec["hf_runs"])]
    return {"e2e_s": times, "load_s": load_s, "n_generated": n, "n_prompt_tokens": len(ids)}


# ---------------------------------------------------------------- the LLM alone, by repack setting


def _llm_speeds(prefill: Callable[[list[int]], None], step: Callable[[int], None], n_vocab: int,
                spec: Spec) -> dict[str, Any]:
    """Prefill of ``repack_pp`` random tokens and decode of ``repack_tg`` more, one at a time (the
    best of ``runs`` after a warm-up each); the caller clears the context in ``prefill``."""
    n_pp, n_tg = spec["repack_pp"], spec["repack_tg"]
    tokens = _random_tokens(n_pp + n_tg, n_vocab, 7)
    pp, tg = [], []
    for _ in range(spec["runs"] + 1):
        start = time.perf_counter()
        prefill(tokens[:n_pp])
        middle = time.perf_counter()
        for token in tokens[n_pp:]:
            step(token)
        pp.append(middle - start)
        tg.append(time.perf_counter() - middle)
    return {"prefill_tok_s": n_pp / min(pp[1:]), "decode_tok_s": n_tg / min(tg[1:])}


def run_llm_ours(spec: Spec) -> dict[str, Any]:
    """Our LLM runtime alone, with ``spec["repack"]`` (auto, on, off)."""
    from llava_gguf.llm.llama import LlamaOptions, LlamaRuntime
    from llava_gguf.llm.repack import RepackPolicy, choose_repack

    if spec["repack"] == "auto":
        choose_repack(spec["threads"])  # the machine's verdict, measured now if not cached: not in the load time
    start = time.perf_counter()
    n_ctx = spec["repack_pp"] + spec["repack_tg"] + 8
    rt = LlamaRuntime(Path(spec["llm15"]), LlamaOptions(n_ctx=n_ctx, n_threads=spec["threads"],
                                                        flash_attn=spec["flash_attn"],  # as the stock Llama's
                                                        repack=RepackPolicy(spec["repack"])))
    load_s = time.perf_counter() - start
    rt.ensure_context(n_ctx)

    def prefill(tokens: list[int]) -> None:
        rt.truncate(0)
        rt.decode_tokens(tokens)

    out = _llm_speeds(prefill, lambda token: rt.decode_tokens([token]), rt.n_vocab, spec)
    out.update(load_s=load_s, repack=rt.repack, mapped=rt.mapped, reason=rt.repack_reason)
    rt.close()
    return out


def run_llm_stock(spec: Spec) -> dict[str, Any]:
    """llama-cpp-python's ``Llama`` alone, with its defaults (repacking on, mmap)."""
    import llama_cpp

    reason = _stock_defaults(spec)
    start = time.perf_counter()
    llama = llama_cpp.Llama(model_path=spec["llm15"], n_ctx=spec["repack_pp"] + spec["repack_tg"] + 8, n_batch=512,
                            n_threads=spec["threads"], n_threads_batch=spec["threads"],
                            flash_attn=bool(spec["flash_attn"]), verbose=False)
    load_s = time.perf_counter() - start

    def prefill(tokens: list[int]) -> None:
        llama.reset()
        llama.eval(tokens)

    out = _llm_speeds(prefill, lambda token: llama.eval([token]), llama.n_vocab(), spec)
    out.update(load_s=load_s, repack=not spec.get("repack_crashes"), mapped=True, reason=reason)
    llama.close()
    return out


WORKERS: dict[str, Callable[[Spec], dict[str, Any]]] = {
    "convert": run_convert,
    "ours": run_ours,
    "ours_chat": run_ours_chat,
    "ours_ask": run_ours_ask,
    "stock": run_stock,
    "stock_chat": run_stock_chat,
    "transformers": run_transformers,
    "llm_ours": run_llm_ours,
    "llm_stock": run_llm_stock,
}


def median(values: Iterator[float] | list[float]) -> float:
    return float(statistics.median(list(values)))


def converted_llava15(shape: Any, workdir: Path) -> Path:
    """The synthetic LLaVA 1.5 checkpoint of ``shape`` as Q4_K_M + f16 mmproj, built and converted once
    under ``workdir`` (the server and batch benchmarks' model)."""
    import synth

    from llava_gguf.convert import ConvertOptions, MmprojType, Quant, convert_checkpoint

    work = workdir.expanduser() / shape.name
    ckpts = synth.build_checkpoints(work / "checkpoints", shape)
    out = work / "gguf-server"
    if not any(out.glob("*.gguf")):
        convert_checkpoint(ckpts.llava15, out, ConvertOptions(quant=Quant.Q4_K_M, mmproj_type=MmprojType.F16))
    return out
