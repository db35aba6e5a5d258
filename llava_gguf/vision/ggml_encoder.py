"""The reference CLIP tower and LLaVA projector as a ggml graph, on the CPU or a GPU backend.

The graph is transformers' ``LlavaModel.get_image_features``, op for op in float32: patch embedding
as a matrix product (``ggml_conv_2d`` would run im2col in f16), class token first with its position
embedding, pre-layernorm, exactly the stored / selected blocks, the select strategy, then linear_1,
exact GELU (``ggml_gelu_erf``: ``ggml_gelu`` goes through an f16 table on the CPU), linear_2. CLIP's
quick GELU is x * sigmoid(1.702 x). Weights are uploaded as float32 (f16 and quantized files are
converted once, as the NumPy encoder converts them per use), so the CPU never rounds activations to
f16; every product asks for f32 accumulation (``ggml_prec_set_acc``), which GPU backends honour.

The class token enters through the input: each tile's patch matrix gets a leading row of zeros, whose
embedding is exactly zero, and the position table's first row carries ``class_embedding +
position[0]`` (the same single float32 addition the reference makes).

A SigLIP tower (`TowerSpec`) adds the patch bias, has no class token (no zero row) and no
pre-layernorm, and its MLP's tanh GELU is built from elementary f32 ops (``ggml_gelu`` is an f16
table on the CPU): 0.5 x + 0.5 x tanh(sqrt(2 / pi) (x + 0.044715 x^3)).
"""

from __future__ import annotations

import ctypes
import math
import os
from collections.abc import Callable, Mapping

import numpy as np

from llava_gguf.errors import ImageError, ModelLoadError
from llava_gguf.metadata import SelectStrategy, VisionSettings
from llava_gguf.vision.encoder import TileCallback, TowerShapes
from llava_gguf.vision.ggml_lib import (
    DEVICE_TYPE_GPU,
    DEVICE_TYPE_IGPU,
    GGML_PREC_F32,
    GGML_STATUS_SUCCESS,
    GGML_TYPE_F32,
    LIB_ENV,
    GgmlLib,
    GgmlUnavailable,
    ggml_backend_buffer_t,
    ggml_backend_t,
    ggml_context_p,
    ggml_gallocr_t,
    ggml_init_params,
    ggml_tensor_p,
    load_ggml,
)
from llava_gguf.vision.weights import TowerLayout, VisionTowerConfig, read_tower

_F32 = np.float32
GRAPH_SIZE = 8192  # nodes; a CLIP-L tower with 23 blocks needs about 800, SigLIP-so400m's 27 about 1200
QUICK_GELU_SCALE = 1.702
TANH_GELU_BETA = math.sqrt(2.0 / math.pi)
TANH_GELU_KAPPA = 0.044715


class GgmlVisionEncoder(TowerShapes):
    """CLIP tiles to LLaVA image features with ggml (CPU, or the GPU with ``use_gpu``), exactly as
    transformers computes them. ``tiles_per_run``: tiles per graph run (default: 1 on the CPU, where
    one at a time is fastest; 8 on a GPU, more than a LLaVA 1.6 image has)."""

    def __init__(
        self,
        tensors: Mapping[str, np.ndarray],
        layout: TowerLayout,
        *,
        use_gpu: bool = False,
        n_threads: int | None = None,
        tiles_per_run: int | None = None,
        library: GgmlLib | None = None,
    ) -> None:
        self.lib = library or load_ggml()
        self.layout = layout
        self.config: VisionTowerConfig = layout.config
        self._tensors = tensors
        self._ctx_w: ggml_context_p | None = None
        self._buffer: ggml_backend_buffer_t | None = None
        self._galloc: ggml_gallocr_t | None = None
        self._backend = self._init_backend(use_gpu, n_threads)
        try:
            self.backend_name = (self.lib.ggml_backend_name(self._backend) or b"?").decode()
            self.on_gpu = use_gpu
            self.tiles_per_run = tiles_per_run or (8 if use_gpu else 1)
            self._weights: dict[str, ggml_tensor_p] = {}
            self._upload_weights()
            self._galloc = self.lib.ggml_gallocr_new(self.lib.ggml_backend_get_default_buffer_type(self._backend))
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str], *, settings: VisionSettings | None = None,
                  use_gpu: bool = False, n_threads: int | None = None,
                  library: GgmlLib | None = None) -> GgmlVisionEncoder:
        tensors, layout = read_tower(path, settings)
        return cls(tensors, layout, use_gpu=use_gpu, n_threads=n_threads, library=library)

    # -- the VisionEncoder interface (the shapes come from TowerShapes) -----------------------

    def encode(self, tiles: np.ndarray, on_tile: TileCallback | None = None) -> np.ndarray:
        """tiles [n_tiles, 3, S, S] (normalized pixels) -> features [n_tiles, n_tokens, llm_hidden]."""
        s = self.config.image_size
        if tiles.ndim != 4 or tiles.shape[1:] != (3, s, s):
            raise ImageError(f"tiles have shape {tuple(tiles.shape)}, expected (n, 3, {s}, {s})")
        if self._ctx_w is None:
            raise ModelLoadError("the ggml vision encoder is closed")
        n = tiles.shape[0]
        out = np.empty((n, self.n_tokens, self.llm_hidden_size), dtype=_F32)
        for start in range(0, n, self.tiles_per_run):
            stop = min(n, start + self.tiles_per_run)
            out[start:stop] = self._run(np.asarray(tiles[start:stop], dtype=_F32))
            if on_tile is not None:
                on_tile(stop, n)
        return out

    def close(self) -> None:
        lib = self.lib
        if self._galloc is not None:
            lib.ggml_gallocr_free(self._galloc)
            self._galloc = None
        if self._buffer is not None:
            lib.ggml_backend_buffer_free(self._buffer)
            self._buffer = None
        if self._ctx_w is not None:
            lib.ggml_free(self._ctx_w)
            self._ctx_w = None
        if getattr(self, "_backend", None) is not None:
            lib.ggml_backend_free(self._backend)
            self._backend = None  # type: ignore[assignment]

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001  interpreter shutdown: the library may be gone
            pass

    # -- setup --------------------------------------------------------------------------------

    def _init_backend(self, use_gpu: bool, n_threads: int | None) -> ggml_backend_t:
        lib = self.lib
        if use_gpu:
            # backends built as loadable modules (GGML_BACKEND_DL) sit beside the library
            lib.ggml_backend_load_all_from_path(os.fsencode(lib.directory))
            for device_type in (DEVICE_TYPE_GPU, DEVICE_TYPE_IGPU):
                backend = lib.ggml_backend_init_by_type(device_type, None)
                if backend:
                    return backend
            raise GgmlUnavailable(
                f"the ggml in {lib.directory} has no GPU backend (a CPU-only build); install llama-cpp-python "
                f"with CMAKE_ARGS=-DGGML_CUDA=on (or Metal), or point {LIB_ENV} at a GPU build"
            )
        backend = lib.ggml_backend_cpu_init()
        if not backend:
            raise GgmlUnavailable("ggml's CPU backend did not start")
        lib.ggml_backend_cpu_set_n_threads(backend, n_threads or usable_cpus())
        return backend

    def _weight_specs(self) -> list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]:
        """(key, torch shape, producer) of every weight the graph reads; the producer gives it as float32
        (the patch conv as [H, 3*p*p], q/k/v fused), so only one converted tensor is held at a time."""
        layout, cfg = self.layout, self.config

        def f32(name: str) -> np.ndarray:
            return np.ascontiguousarray(self._tensors[name], dtype=_F32)

        def position() -> np.ndarray:
            table = f32(layout.position + ".weight").copy()  # [T, H]
            if cfg.spec.class_token:
                table[0] += f32(layout.class_embedding).reshape(-1)  # class token + its position, as the reference adds
            return table

        def patch() -> np.ndarray:
            return f32(layout.patch + ".weight").reshape(h, -1)  # [H, 3, p, p] -> [H, 3*p*p]

        def fused(parts: tuple[str, ...], suffix: str) -> Callable[[], np.ndarray]:
            return lambda: np.concatenate([f32(n + suffix) for n in parts])  # [3H, H] or [3H]

        def stored(key: str) -> Callable[[], np.ndarray]:
            return lambda: f32(key)

        h, t = cfg.hidden_size, cfg.num_positions
        specs: list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]] = [
            ("patch", (h, 3 * cfg.patch_size**2), patch),
            ("position", (t, h), position),
        ]
        if cfg.spec.patch_bias:
            specs.append(("patch.bias", (h,), stored(layout.patch + ".bias")))
        names = [layout.pre_layernorm, *layout.projector] if cfg.spec.pre_layernorm else [*layout.projector]
        for i, block in enumerate(layout.blocks):
            names += [block.ln1, block.out, block.ln2, block.fc1, block.fc2]
            # q, k and v as one product (one larger GEMM runs faster than three)
            parts = (block.q, block.k, block.v)
            specs.append((qkv_name(i) + ".weight", (3 * h, h), fused(parts, ".weight")))
            specs.append((qkv_name(i) + ".bias", (3 * h,), fused(parts, ".bias")))
        for name in names:
            for suffix in (".weight", ".bias"):
                if layout.has(name + suffix):
                    specs.append((name + suffix, layout.shape(name + suffix), stored(name + suffix)))
        return specs

    def _upload_weights(self) -> None:
        lib = self.lib
        specs = self._weight_specs()
        params = ggml_init_params(mem_size=lib.ggml_tensor_overhead() * (len(specs) + 1), mem_buffer=None, no_alloc=True)
        self._ctx_w = lib.ggml_init(params)
        if not self._ctx_w:
            self._ctx_w = None
            raise GgmlUnavailable("ggml_init failed for the weights' context")
        for key, shape, _ in specs:
            self._weights[key] = self._new_tensor(self._ctx_w, tuple(reversed(shape)))  # ggml's ne: innermost first
        self._buffer = lib.ggml_backend_alloc_ctx_tensors(self._ctx_w, self._backend)
        if not self._buffer:
            self._buffer = None
            raise GgmlUnavailable(f"{self.backend_name}: no memory for the vision weights; use --encoder numpy "
                                  "(or fewer GPU layers)")
        for key, shape, produce in specs:
            array = produce()
            if array.shape != shape:
                raise ModelLoadError(f"{self.layout.source}: {key} has shape {array.shape}, expected {shape}")
            lib.ggml_backend_tensor_set(self._weights[key], array.ctypes.data, 0, array.nbytes)

    def _new_tensor(self, ctx: ggml_context_p, ne: tuple[int, ...]) -> ggml_tensor_p:
        dims = (ctypes.c_int64 * len(ne))(*ne)
        return self.lib.ggml_new_tensor(ctx, GGML_TYPE_F32, len(ne), dims)

    # -- the graph ----------------------------------------------------------------------------

    def _run(self, tiles: np.ndarray) -> np.ndarray:
        """tiles [B, 3, S, S] -> features [B, n_tokens, llm_hidden], in one graph run."""
        lib, cfg = self.lib, self.config
        b = tiles.shape[0]
        p, g = cfg.patch_size, cfg.image_size // cfg.patch_size
        # the stride-p conv drops the last S - g*p rows and columns (SigLIP 384/14: 6)
        tiles = tiles[:, :, : g * p, : g * p]  # [B, 3, g*p, g*p]
        # [B, 3, g*p, g*p] -> [B, 3, g, p, g, p] -> [B, g, g, 3, p, p] -> [B, g*g, 3*p*p]; rows in raster order
        patches = tiles.reshape(b, 3, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, g * g, 3 * p * p)
        first = cfg.num_positions - g * g  # 1: row 0 is the class token's (zeros), 0: no class token
        rows = np.zeros((b, cfg.num_positions, 3 * p * p), dtype=_F32)  # [B, T, 3*p*p]
        rows[:, first:] = patches
        overhead = lib.ggml_tensor_overhead() * GRAPH_SIZE + lib.ggml_graph_overhead_custom(GRAPH_SIZE, False)
        ctx = lib.ggml_init(ggml_init_params(mem_size=overhead, mem_buffer=None, no_alloc=True))
        if not ctx:
            raise GgmlUnavailable("ggml_init failed for the graph's context")
        try:
            inp = self._new_tensor(ctx, (3 * p * p, cfg.num_positions, b))
            lib.ggml_set_input(inp)
            out = Graph(lib, ctx, self._weights, self.layout).features(inp, b)
            lib.ggml_set_output(out)
            graph = lib.ggml_new_graph_custom(ctx, GRAPH_SIZE, False)
            lib.ggml_build_forward_expand(graph, out)
            if not lib.ggml_gallocr_alloc_graph(self._galloc, graph):
                raise ModelLoadError(f"{self.backend_name}: no memory for the vision graph of {b} tile(s)")
            lib.ggml_backend_tensor_set(inp, rows.ctypes.data, 0, rows.nbytes)
            status = lib.ggml_backend_graph_compute(self._backend, graph)
            if status != GGML_STATUS_SUCCESS:
                raise ModelLoadError(f"{self.backend_name}: the vision graph failed (ggml status {status})")
            features = np.empty((b, self.n_tokens, self.llm_hidden_size), dtype=_F32)
            lib.ggml_backend_tensor_get(out, features.ctypes.data, 0, features.nbytes)
            return features
        finally:
            lib.ggml_free(ctx)


class Graph:
    """Builds the reference graph's nodes in a context. Shapes in comments are ggml's ``ne``, innermost
    first: [H, T, B] is B tiles of T tokens of width H."""

    def __init__(self, lib: GgmlLib, ctx: ggml_context_p, weights: dict[str, ggml_tensor_p], layout: TowerLayout):
        self.lib, self.ctx, self.w, self.layout, self.cfg = lib, ctx, weights, layout, layout.config

    def linear(self, x: ggml_tensor_p, name: str) -> ggml_tensor_p:
        lib = self.lib
        y = lib.ggml_mul_mat(self.ctx, self.w[name + ".weight"], x)  # [in, out] x [in, T, B] -> [out, T, B]
        lib.ggml_prec_set_acc(y, GGML_PREC_F32)
        bias = self.w.get(name + ".bias")
        return lib.ggml_add(self.ctx, y, bias) if bias is not None else y

    def layer_norm(self, x: ggml_tensor_p, name: str) -> ggml_tensor_p:
        lib = self.lib
        y = lib.ggml_norm(self.ctx, x, self.cfg.layer_norm_eps)
        y = lib.ggml_mul(self.ctx, y, self.w[name + ".weight"])
        return lib.ggml_add(self.ctx, y, self.w[name + ".bias"])

    def activation(self, x: ggml_tensor_p, kind: str) -> ggml_tensor_p:
        lib, ctx = self.lib, self.ctx
        if kind == "gelu":
            return lib.ggml_gelu_erf(ctx, x)
        if kind == "gelu_pytorch_tanh":
            # 0.5 x + 0.5 x tanh(beta (x + kappa x^3)), every op in f32
            cube = lib.ggml_mul(ctx, lib.ggml_mul(ctx, x, x), x)
            inner = lib.ggml_add(ctx, x, lib.ggml_scale(ctx, cube, TANH_GELU_KAPPA))
            tanh = lib.ggml_tanh(ctx, lib.ggml_scale(ctx, inner, TANH_GELU_BETA))
            half = lib.ggml_scale(ctx, x, 0.5)
            return lib.ggml_add(ctx, half, lib.ggml_mul(ctx, half, tanh))
        # quick_gelu: x * sigmoid(1.702 x)
        return lib.ggml_mul(self.ctx, x, lib.ggml_sigmoid(self.ctx, lib.ggml_scale(self.ctx, x, QUICK_GELU_SCALE)))

    def features(self, inp: ggml_tensor_p, b: int) -> ggml_tensor_p:
        """inp [3*p*p, T, B] (row 0 of each tile zero with a class token) -> features [llm_hidden, n_tokens, B]."""
        lib, ctx, cfg = self.lib, self.ctx, self.cfg
        x = lib.ggml_mul_mat(ctx, self.w["patch"], inp)  # [3*p*p, H] x [3*p*p, T, B] -> [H, T, B]
        lib.ggml_prec_set_acc(x, GGML_PREC_F32)
        if cfg.spec.patch_bias:
            x = lib.ggml_add(ctx, x, self.w["patch.bias"])  # + [H]
        x = lib.ggml_add(ctx, x, self.w["position"])  # + [H, T], the class token (if any) in row 0
        if cfg.spec.pre_layernorm:
            x = self.layer_norm(x, self.layout.pre_layernorm)
        for i in range(cfg.vision_feature_layer):
            x = self.block(x, i, b)
        h, t = cfg.hidden_size, cfg.num_positions
        if cfg.vision_feature_select_strategy == SelectStrategy.DEFAULT:
            # [H, T, B] -> [H, T - 1, B]: drop position 0 (CLIP's class token)
            x = lib.ggml_cont(ctx, lib.ggml_view_3d(ctx, x, h, t - 1, b, 4 * h, 4 * h * t, 4 * h))
        names = self.layout.projector
        y = self.linear(x, names[0])
        for name in names[1:]:
            y = self.activation(y, cfg.projector_hidden_act)
            y = self.linear(y, name)
        return y

    def block(self, x: ggml_tensor_p, i: int, b: int) -> ggml_tensor_p:
        """One pre-LN encoder layer (CLIP's and SigLIP's): x [H, T, B] -> [H, T, B]."""
        lib, ctx, cfg = self.lib, self.ctx, self.cfg
        names = self.layout.blocks[i]
        h, t, nh = cfg.hidden_size, cfg.num_positions, cfg.num_attention_heads
        hd = h // nh
        y = self.layer_norm(x, names.ln1)
        qkv = self.linear(y, qkv_name(i))  # [3H, T, B]: q, k, v one after the other in each row

        def heads(part: int) -> ggml_tensor_p:  # [3H, T, B] -> the part's [hd, nh, T, B], a view
            return lib.ggml_view_4d(ctx, qkv, hd, nh, t, b, 4 * hd, 4 * 3 * h, 4 * 3 * h * t, 4 * h * part)

        q, k, v = heads(0), heads(1), heads(2)
        q = lib.ggml_permute(ctx, q, 0, 2, 1, 3)  # [hd, nh, T, B] -> [hd, T, nh, B]
        k = lib.ggml_permute(ctx, k, 0, 2, 1, 3)
        scores = lib.ggml_mul_mat(ctx, k, q)  # [T_k, T_q, nh, B]
        lib.ggml_prec_set_acc(scores, GGML_PREC_F32)
        probs = lib.ggml_soft_max_ext(ctx, scores, None, 1.0 / math.sqrt(hd), 0.0)  # softmax(scale * scores) over T_k
        v = lib.ggml_cont(ctx, lib.ggml_permute(ctx, v, 1, 2, 0, 3))  # [hd, nh, T, B] -> [T, hd, nh, B]
        attn = lib.ggml_mul_mat(ctx, v, probs)  # [T, hd, nh, B] x [T_k, T_q, nh, B] -> [hd, T_q, nh, B]
        lib.ggml_prec_set_acc(attn, GGML_PREC_F32)
        attn = lib.ggml_cont(ctx, lib.ggml_permute(ctx, attn, 0, 2, 1, 3))  # [hd, T, nh, B] -> [hd, nh, T, B]
        attn = lib.ggml_reshape_3d(ctx, attn, h, t, b)  # [hd, nh, T, B] -> [H, T, B]
        x = lib.ggml_add(ctx, x, self.linear(attn, names.out))
        y = self.layer_norm(x, names.ln2)
        y = self.activation(self.linear(y, names.fc1), cfg.hidden_act)  # [ffn, T, B]
        return lib.ggml_add(ctx, x, self.linear(y, names.fc2))


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, where the platform tells), else all."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def qkv_name(block: int) -> str:
    """The fused q/k/v projection of a block, in the encoder's own weights (not a GGUF name)."""
    return f"blk.{block}.qkv"
