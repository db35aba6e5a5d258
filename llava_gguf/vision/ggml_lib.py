"""ctypes bindings for the part of ggml the vision encoder uses: contexts, tensors, the ops of a CLIP
graph, backends, graph allocation.

The library is llama-cpp-python's own (``llama_cpp/lib/libggml*``), or the one in
``$LLAVA_GGUF_GGML_LIB`` (a directory holding ``libggml.so`` / ``libggml.dylib`` / ``ggml.dll``, e.g. a
CUDA build made apart). Every handle is an opaque pointer; the one struct passed by value,
``ggml_init_params``, is mirrored, and ``GgmlLib`` checks what the mirror and the enum values assume
against what the library reports (tensor overhead, type names and sizes) before anything runs. A
library it does not understand raises ``GgmlUnavailable`` with the reason.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llava_gguf.errors import LlavaGGUFError

LIB_ENV = "LLAVA_GGUF_GGML_LIB"

# ggml.h: enum ggml_type (the values the encoder creates tensors of)
GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1
# ggml.h: enum ggml_prec
GGML_PREC_F32 = 10
# ggml-backend.h: enum ggml_backend_dev_type
DEVICE_TYPE_CPU = 0
DEVICE_TYPE_GPU = 1
DEVICE_TYPE_IGPU = 2  # an integrated GPU (Jetson, Apple's unified memory...)
# ggml.h: enum ggml_status
GGML_STATUS_SUCCESS = 0
# ggml_tensor_overhead() = sizeof(struct ggml_object) + sizeof(struct ggml_tensor) in the ggml versions
# whose API these bindings mirror (0.25.x: 32 + 336)
KNOWN_TENSOR_OVERHEADS = (368,)
_TYPE_NAMES = {GGML_TYPE_F32: (b"f32", 4), GGML_TYPE_F16: (b"f16", 2)}


class GgmlUnavailable(LlavaGGUFError):
    """ggml cannot run the encoder here: no library, a missing symbol, an ABI it does not know."""


class ggml_init_params(ctypes.Structure):  # noqa: N801  (ggml's name)
    # struct ggml_init_params { size_t mem_size; void * mem_buffer; bool no_alloc; };
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class ggml_context_p(ctypes.c_void_p):  # noqa: N801
    pass


class ggml_tensor_p(ctypes.c_void_p):  # noqa: N801
    pass


class ggml_cgraph_p(ctypes.c_void_p):  # noqa: N801
    pass


class ggml_backend_t(ctypes.c_void_p):  # noqa: N801
    pass


class ggml_backend_buffer_t(ctypes.c_void_p):  # noqa: N801
    pass


class ggml_backend_buffer_type_t(ctypes.c_void_p):  # noqa: N801
    pass


class ggml_gallocr_t(ctypes.c_void_p):  # noqa: N801
    pass


_i64, _sz, _f, _i, _b = ctypes.c_int64, ctypes.c_size_t, ctypes.c_float, ctypes.c_int, ctypes.c_bool
_ctx, _t, _g = ggml_context_p, ggml_tensor_p, ggml_cgraph_p

# name -> (restype, argtypes), with the C declaration beside each
SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    # size_t ggml_tensor_overhead(void);
    "ggml_tensor_overhead": (_sz, []),
    # size_t ggml_graph_overhead_custom(size_t size, bool grads);
    "ggml_graph_overhead_custom": (_sz, [_sz, _b]),
    # const char * ggml_type_name(enum ggml_type type);
    "ggml_type_name": (ctypes.c_char_p, [_i]),
    # size_t ggml_type_size(enum ggml_type type);
    "ggml_type_size": (_sz, [_i]),
    # struct ggml_context * ggml_init(struct ggml_init_params params);
    "ggml_init": (_ctx, [ggml_init_params]),
    # void ggml_free(struct ggml_context * ctx);
    "ggml_free": (None, [_ctx]),
    # struct ggml_tensor * ggml_new_tensor(struct ggml_context * ctx, enum ggml_type type, int n_dims, const int64_t * ne);
    "ggml_new_tensor": (_t, [_ctx, _i, _i, ctypes.POINTER(_i64)]),
    # struct ggml_tensor * ggml_set_name(struct ggml_tensor * tensor, const char * name);
    "ggml_set_name": (_t, [_t, ctypes.c_char_p]),
    # void ggml_set_input(struct ggml_tensor * tensor);  void ggml_set_output(struct ggml_tensor * tensor);
    "ggml_set_input": (None, [_t]),
    "ggml_set_output": (None, [_t]),
    # size_t ggml_nbytes(const struct ggml_tensor * tensor);
    "ggml_nbytes": (_sz, [_t]),
    # struct ggml_tensor * ggml_mul_mat(struct ggml_context * ctx, struct ggml_tensor * a, struct ggml_tensor * b);
    "ggml_mul_mat": (_t, [_ctx, _t, _t]),
    # bool ggml_prec_set_acc(struct ggml_tensor * a, enum ggml_prec prec);
    "ggml_prec_set_acc": (_b, [_t, _i]),
    # struct ggml_tensor * ggml_add / ggml_mul (struct ggml_context * ctx, struct ggml_tensor * a, struct ggml_tensor * b);
    "ggml_add": (_t, [_ctx, _t, _t]),
    "ggml_mul": (_t, [_ctx, _t, _t]),
    # struct ggml_tensor * ggml_scale(struct ggml_context * ctx, struct ggml_tensor * a, float s);
    "ggml_scale": (_t, [_ctx, _t, _f]),
    # struct ggml_tensor * ggml_norm(struct ggml_context * ctx, struct ggml_tensor * a, float eps);
    "ggml_norm": (_t, [_ctx, _t, _f]),
    # struct ggml_tensor * ggml_soft_max_ext(ctx, a, struct ggml_tensor * mask, float scale, float max_bias);
    "ggml_soft_max_ext": (_t, [_ctx, _t, _t, _f, _f]),
    # struct ggml_tensor * ggml_gelu_erf / ggml_sigmoid / ggml_cont (struct ggml_context * ctx, struct ggml_tensor * a);
    "ggml_gelu_erf": (_t, [_ctx, _t]),
    # struct ggml_tensor * ggml_tanh(struct ggml_context * ctx, struct ggml_tensor * a);  (tanhf per element)
    "ggml_tanh": (_t, [_ctx, _t]),
    "ggml_sigmoid": (_t, [_ctx, _t]),
    "ggml_cont": (_t, [_ctx, _t]),
    # struct ggml_tensor * ggml_reshape_3d(ctx, a, int64_t ne0, int64_t ne1, int64_t ne2);
    "ggml_reshape_3d": (_t, [_ctx, _t, _i64, _i64, _i64]),
    # struct ggml_tensor * ggml_reshape_4d(ctx, a, int64_t ne0, int64_t ne1, int64_t ne2, int64_t ne3);
    "ggml_reshape_4d": (_t, [_ctx, _t, _i64, _i64, _i64, _i64]),
    # struct ggml_tensor * ggml_permute(ctx, a, int axis0, int axis1, int axis2, int axis3);
    "ggml_permute": (_t, [_ctx, _t, _i, _i, _i, _i]),
    # struct ggml_tensor * ggml_view_3d(ctx, a, int64_t ne0, int64_t ne1, int64_t ne2, size_t nb1, size_t nb2, size_t offset);
    "ggml_view_3d": (_t, [_ctx, _t, _i64, _i64, _i64, _sz, _sz, _sz]),
    # struct ggml_tensor * ggml_view_4d(ctx, a, int64_t ne0, int64_t ne1, int64_t ne2, int64_t ne3,
    #                                   size_t nb1, size_t nb2, size_t nb3, size_t offset);
    "ggml_view_4d": (_t, [_ctx, _t, _i64, _i64, _i64, _i64, _sz, _sz, _sz, _sz]),
    # struct ggml_cgraph * ggml_new_graph_custom(struct ggml_context * ctx, size_t size, bool grads);
    "ggml_new_graph_custom": (_g, [_ctx, _sz, _b]),
    # void ggml_build_forward_expand(struct ggml_cgraph * cgraph, struct ggml_tensor * tensor);
    "ggml_build_forward_expand": (None, [_g, _t]),
    # ggml_backend_t ggml_backend_cpu_init(void);
    "ggml_backend_cpu_init": (ggml_backend_t, []),
    # void ggml_backend_cpu_set_n_threads(ggml_backend_t backend_cpu, int n_threads);
    "ggml_backend_cpu_set_n_threads": (None, [ggml_backend_t, _i]),
    # ggml_backend_t ggml_backend_init_by_type(enum ggml_backend_dev_type type, const char * params);
    "ggml_backend_init_by_type": (ggml_backend_t, [_i, ctypes.c_char_p]),
    # void ggml_backend_load_all_from_path(const char * dir_path);
    "ggml_backend_load_all_from_path": (None, [ctypes.c_char_p]),
    # const char * ggml_backend_name(ggml_backend_t backend);
    "ggml_backend_name": (ctypes.c_char_p, [ggml_backend_t]),
    # void ggml_backend_free(ggml_backend_t backend);
    "ggml_backend_free": (None, [ggml_backend_t]),
    # ggml_backend_buffer_type_t ggml_backend_get_default_buffer_type(ggml_backend_t backend);
    "ggml_backend_get_default_buffer_type": (ggml_backend_buffer_type_t, [ggml_backend_t]),
    # struct ggml_backend_buffer * ggml_backend_alloc_ctx_tensors(struct ggml_context * ctx, ggml_backend_t backend);
    "ggml_backend_alloc_ctx_tensors": (ggml_backend_buffer_t, [_ctx, ggml_backend_t]),
    # void ggml_backend_buffer_free(ggml_backend_buffer_t buffer);
    "ggml_backend_buffer_free": (None, [ggml_backend_buffer_t]),
    # void ggml_backend_tensor_set(struct ggml_tensor * tensor, const void * data, size_t offset, size_t size);
    "ggml_backend_tensor_set": (None, [_t, ctypes.c_void_p, _sz, _sz]),
    # void ggml_backend_tensor_get(const struct ggml_tensor * tensor, void * data, size_t offset, size_t size);
    "ggml_backend_tensor_get": (None, [_t, ctypes.c_void_p, _sz, _sz]),
    # enum ggml_status ggml_backend_graph_compute(ggml_backend_t backend, struct ggml_cgraph * cgraph);
    "ggml_backend_graph_compute": (_i, [ggml_backend_t, _g]),
    # ggml_gallocr_t ggml_gallocr_new(ggml_backend_buffer_type_t buft);
    "ggml_gallocr_new": (ggml_gallocr_t, [ggml_backend_buffer_type_t]),
    # bool ggml_gallocr_alloc_graph(ggml_gallocr_t galloc, struct ggml_cgraph * graph);
    "ggml_gallocr_alloc_graph": (_b, [ggml_gallocr_t, _g]),
    # void ggml_gallocr_free(ggml_gallocr_t galloc);
    "ggml_gallocr_free": (None, [ggml_gallocr_t]),
}


def _library_file(directory: Path) -> Path:
    names = {"darwin": "libggml.dylib", "win32": "ggml.dll"}
    return directory / names.get(sys.platform, "libggml.so")


def default_library_dir() -> Path:
    """llama-cpp-python's ``lib`` directory (found without importing llama_cpp's heavy modules)."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise GgmlUnavailable("llama-cpp-python is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


class GgmlLib:
    """The ggml functions the encoder calls, declared and checked. ``GgmlUnavailable`` when they cannot be."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        where = os.environ.get(LIB_ENV) if directory is None else os.fspath(directory)
        self.directory = Path(where).expanduser() if where else default_library_dir()
        path = _library_file(self.directory)
        if not path.is_file():
            raise GgmlUnavailable(f"no ggml library at {path}" + (f" (from {LIB_ENV})" if where else ""))
        try:
            # RTLD_GLOBAL: ggml's backends (libggml-cpu, libggml-cuda) resolve against the same base
            self._cdll = ctypes.CDLL(str(path), mode=getattr(os, "RTLD_GLOBAL", 0) | getattr(os, "RTLD_NOW", 0))
        except OSError as e:
            raise GgmlUnavailable(f"{path} cannot be loaded ({e})") from e
        self.path = path
        names = tuple(SIGNATURES)
        missing = [name for name in names if not hasattr(self._cdll, name)]
        if missing:
            raise GgmlUnavailable(f"{path} lacks {', '.join(missing[:3])}{'...' if len(missing) > 3 else ''} "
                                  "(an older or different ggml)")
        for name in names:
            restype, argtypes = SIGNATURES[name]
            function = getattr(self._cdll, name)
            function.restype, function.argtypes = restype, argtypes
            setattr(self, name, function)
        self._check_abi()

    def __getattr__(self, name: str) -> Callable[..., Any]:  # declared functions only; for type checkers
        raise AttributeError(name)

    def _check_abi(self) -> None:
        overhead = self.ggml_tensor_overhead()
        if overhead not in KNOWN_TENSOR_OVERHEADS:
            raise GgmlUnavailable(
                f"{self.path}: ggml_tensor_overhead() is {overhead}, not {KNOWN_TENSOR_OVERHEADS} as in the ggml "
                "these bindings mirror; use the ggml of llama-cpp-python 0.3.x"
            )
        for value, (name, size) in _TYPE_NAMES.items():
            if self.ggml_type_name(value) != name or self.ggml_type_size(value) != size:
                raise GgmlUnavailable(f"{self.path}: ggml type {value} is not {name.decode()} here")
        used = _defining_file(self._cdll.ggml_init)
        if used is not None and used.resolve().parent != self.directory.resolve():
            # ggml-base of another build was loaded first (llama-cpp-python's, by libllama): the two would mix
            raise GgmlUnavailable(
                f"ggml's core comes from {used.parent}, not {self.directory}: llama-cpp-python loaded its own "
                f"first; set LLAMA_CPP_LIB_PATH and MTMD_CPP_LIB to {self.directory} too, so that one build runs"
            )


class _DlInfo(ctypes.Structure):
    # typedef struct { const char *dli_fname; void *dli_fbase; const char *dli_sname; void *dli_saddr; } Dl_info;
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p), ("dli_sname", ctypes.c_char_p),
                ("dli_saddr", ctypes.c_void_p)]


def _defining_file(function: Any) -> Path | None:
    """The shared library a loaded function lives in (``dladdr``), where the platform says."""
    if sys.platform == "win32":
        return None
    try:
        libc = ctypes.CDLL(None)
        dladdr = libc.dladdr
    except (OSError, AttributeError):
        return None
    dladdr.argtypes, dladdr.restype = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)], ctypes.c_int
    info = _DlInfo()
    if not dladdr(ctypes.cast(function, ctypes.c_void_p), ctypes.byref(info)) or not info.dli_fname:
        return None
    return Path(os.fsdecode(info.dli_fname))


_cached: dict[str, GgmlLib] = {}


def load_ggml(directory: str | os.PathLike[str] | None = None) -> GgmlLib:
    """The checked bindings (one per library directory and process)."""
    key = os.fspath(directory) if directory is not None else os.environ.get(LIB_ENV, "")
    if key not in _cached:
        _cached[key] = GgmlLib(directory)
    return _cached[key]
