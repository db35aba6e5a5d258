"""An exact NumPy vision tower (CLIP or SigLIP) plus LLaVA projector, reading its weights from an mmproj GGUF.

llama.cpp's libmtmd places LLaVA's class token after the patches while filling the position
embeddings as if it came first, so its image features differ from the reference. This encoder
computes what transformers' ``LlavaModel.get_image_features`` computes, in float32:
patch embedding, class token first, position embeddings, pre-layernorm, the blocks up to the
selected hidden state, the select strategy, then the projector (linear_1, GELU, linear_2). A SigLIP
tower (`TowerSpec`) has a patch bias and neither class token nor pre-layernorm, and its MLP uses
torch's tanh GELU.

An image's tiles run through the tower together, one layer at a time, so each float16 or
quantized weight is converted to float32 once per image (not once per tile) and only one layer's
converted weights are held, plus a bounded cache of converted weights kept between images. Once
converted, a stored tensor's mapped pages leave resident memory (the page cache keeps them), so
the file is not resident beside its float32 copy.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import numpy as np

from llava_gguf.errors import ImageError
from llava_gguf.metadata import SelectStrategy, VisionSettings
from llava_gguf.vision.encoder import TowerShapes
from llava_gguf.vision.weights import GGUFTensors, TowerLayout, VisionTowerConfig, read_tower

# Upcast float16 / dequantized weights kept between images; 512 MiB holds about ten CLIP-L blocks.
# Each image converts the rest once (CLIP-L in float16: about 0.5 s for the whole tower here).
DEFAULT_CACHE_BYTES = 512 * 2**20

_F32 = np.float32


class NumpyVisionEncoder(TowerShapes):
    """CLIP tiles to LLaVA image features, exactly as transformers computes them, in float32."""

    def __init__(
        self,
        tensors: Mapping[str, np.ndarray],
        config: VisionTowerConfig,
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        source: str = "mmproj",
    ) -> None:
        self.config = config
        self.layout = TowerLayout(tensors, config, source)
        self._tensors = tensors
        self._cache: dict[str, np.ndarray] = {}
        self._scope: dict[str, np.ndarray] | None = None  # this layer's converted weights, while it runs
        self._cache_bytes = cache_bytes
        self._cache_left = cache_bytes

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str], *, cache_bytes: int = DEFAULT_CACHE_BYTES,
                  settings: VisionSettings | None = None) -> NumpyVisionEncoder:
        """``settings``: the file's, already read (or overridden), else read from it."""
        tensors, layout = read_tower(path, settings)
        return cls(tensors, layout.config, cache_bytes=cache_bytes, source=layout.source)

    def release_memory(self) -> None:
        """Forget the float32 weight copies and drop the mapped weights from resident memory.

        For low-memory runs, between images: the next tile reads the weights again from the page cache.
        """
        self._cache.clear()
        self._cache_left = self._cache_bytes
        if isinstance(self._tensors, GGUFTensors):
            self._tensors.release_pages()

    # -- weights ------------------------------------------------------------------------------

    def _weight(self, name: str) -> np.ndarray:
        """A float32 tensor: a view when stored so, else converted once and kept in the cache while
        room is left, else for the rest of the current layer (``_layer``)."""
        cached = self._cache.get(name)
        if cached is None and self._scope is not None:
            cached = self._scope.get(name)
        if cached is not None:
            return cached
        stored = self._tensors[name]
        converted = stored.dtype != _F32 or (
            isinstance(self._tensors, GGUFTensors) and self._tensors.is_quantized(name)
        )
        if not converted:
            return stored
        out = np.asarray(stored, dtype=_F32)
        if isinstance(self._tensors, GGUFTensors):
            self._tensors.release_tensor(name)  # the stored copy is not read again for this image
        if out.nbytes <= self._cache_left:
            self._cache[name] = out
            self._cache_left -= out.nbytes
        elif self._scope is not None:
            self._scope[name] = out
        return out

    @contextmanager
    def _layer(self) -> Iterator[None]:
        """Converted weights outside the cache are kept until the block ends, for every tile.
        (An encoder runs one image at a time: the model's callers serialize.)"""
        outer, self._scope = self._scope, {}
        try:
            yield
        finally:
            self._scope = outer

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        # x: [T, in] @ W.T: [in, out] -> [T, out]
        y = x @ self._weight(name + ".weight").T
        bias = name + ".bias"
        if bias in self._tensors:
            y += self._weight(bias)
        return y

    def _layer_norm(self, x: np.ndarray, name: str) -> np.ndarray:
        mean = x.mean(axis=-1, keepdims=True)  # [T, 1]
        xc = x - mean
        var = np.mean(xc * xc, axis=-1, keepdims=True)  # [T, 1]
        xc *= 1.0 / np.sqrt(var + _F32(self.config.layer_norm_eps))
        xc *= self._weight(name + ".weight")
        xc += self._weight(name + ".bias")
        return xc

    # -- forward ------------------------------------------------------------------------------

    def encode(
        self,
        tiles: np.ndarray,
        on_tile: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """tiles [n_tiles, 3, S, S] (normalized pixels) -> features [n_tiles, n_tokens, llm_hidden].

        The tiles go through the tower together, a layer at a time (each tile's products alone:
        faster than a batch here). ``on_tile(done, total)`` counts the work done in tiles' worth.
        """
        s = self.config.image_size
        if tiles.ndim != 4 or tiles.shape[1:] != (3, s, s):
            raise ImageError(f"tiles have shape {tuple(tiles.shape)}, expected (n, 3, {s}, {s})")
        n = tiles.shape[0]
        n_blocks = self.config.vision_feature_layer
        progress = _TileProgress(on_tile, n, n_blocks + 1)  # the blocks, then the projector
        with self._layer():
            hidden = [self.embed(np.asarray(tiles[i], dtype=_F32)) for i in range(n)]  # n x [T, H]
        with np.errstate(over="ignore"):  # exp overflow in quick_gelu gives the right limit
            for layer in range(n_blocks):
                with self._layer():
                    hidden = [self._block(h, layer) for h in hidden]
                progress.step()
            out = np.empty((n, self.n_tokens, self.llm_hidden_size), dtype=_F32)
            with self._layer():
                for i in range(n):
                    h = hidden[i]
                    if self.config.vision_feature_select_strategy == SelectStrategy.DEFAULT:
                        h = h[1:]  # [T, H] -> [T - 1, H]: drop position 0 (CLIP's class token)
                    out[i] = self.project(h)
            progress.step()
        return out

    def embed(self, tile: np.ndarray) -> np.ndarray:
        """tile [3, S, S] -> hidden_states[0]: the embeddings [T, H] (T = 1 + n_patches with a class token),
        pre-layernormed where the tower has one."""
        cfg, spec = self.config, self.config.spec
        p, g = cfg.patch_size, cfg.image_size // cfg.patch_size
        # the stride-p conv drops the last S - g*p rows and columns (SigLIP 384/14: 6)
        tile = tile[:, : g * p, : g * p]  # [3, g*p, g*p]
        # [3, g*p, g*p] -> [3, g, p, g, p] -> [g, g, 3, p, p] -> [g*g, 3*p*p]; rows in raster order
        patches = tile.reshape(3, g, p, g, p).transpose(1, 3, 0, 2, 4).reshape(g * g, 3 * p * p)
        # conv weight [H, 3, p, p] -> [H, 3*p*p]
        w = self._weight(self.layout.patch + ".weight").reshape(cfg.hidden_size, -1)
        x = patches @ w.T  # [g*g, H]
        if spec.patch_bias:
            x += self._weight(self.layout.patch + ".bias")  # [H]
        if spec.class_token:
            cls = self._weight(self.layout.class_embedding)  # [H]
            x = np.concatenate([cls[None, :], x], axis=0)  # [1 + g*g, H]: class token first
        x += self._weight(self.layout.position + ".weight")  # [T, H]
        if spec.pre_layernorm:
            x = self._layer_norm(x, self.layout.pre_layernorm)
        return x

    def _block(self, x: np.ndarray, i: int) -> np.ndarray:
        """One pre-LN encoder layer (CLIP's and SigLIP's): x [T, H] -> [T, H]."""
        cfg = self.config
        t, hidden = x.shape
        nh = cfg.num_attention_heads
        hd = hidden // nh
        names = self.layout.blocks[i]
        y = self._layer_norm(x, names.ln1)
        q = self._linear(y, names.q)
        q *= _F32(hd**-0.5)
        k = self._linear(y, names.k)
        v = self._linear(y, names.v)
        # One head at a time: its [T, T] scores stay in cache (measured faster than a batched matmul).
        attn = np.empty((t, hidden), dtype=_F32)  # [T, nh * hd]
        scores = np.empty((t, t), dtype=_F32)
        row = np.empty((t, 1), dtype=_F32)
        for head in range(nh):
            cols = slice(head * hd, (head + 1) * hd)  # [T, H] -> [T, hd] of this head
            np.matmul(q[:, cols], k[:, cols].T, out=scores)  # [T, hd] @ [hd, T] -> [T, T]
            np.max(scores, axis=-1, keepdims=True, out=row)
            scores -= row
            np.exp(scores, out=scores)
            np.sum(scores, axis=-1, keepdims=True, out=row)
            scores /= row
            np.matmul(scores, v[:, cols], out=attn[:, cols])  # [T, T] @ [T, hd] -> [T, hd]
        x = x + self._linear(attn, names.out)
        y = self._layer_norm(x, names.ln2)
        y = self._linear(y, names.fc1)  # [T, ffn]
        y = _ACTIVATIONS[cfg.hidden_act](y)
        x += self._linear(y, names.fc2)  # [T, H]
        return x

    def project(self, h: np.ndarray) -> np.ndarray:
        """Selected features [T, H] -> [T, llm_hidden]: linear_1, activation, linear_2."""
        names = self.layout.projector
        y = self._linear(h, names[0])
        for name in names[1:]:
            y = _ACTIVATIONS[self.config.projector_hidden_act](y)
            y = self._linear(y, name)
        return y


class _TileProgress:
    """Reports ``on_tile(tiles' worth done, tiles)`` when a whole tile's worth more is done."""

    def __init__(self, on_tile: Callable[[int, int], None] | None, n_tiles: int, n_steps: int) -> None:
        self.on_tile, self.n_tiles, self.n_steps = on_tile, n_tiles, n_steps
        self.steps = self.reported = 0

    def step(self) -> None:
        self.steps += 1
        done = self.n_tiles * self.steps // self.n_steps
        if self.on_tile is not None and done > self.reported:
            self.reported = done
            self.on_tile(done, self.n_tiles)


# -- activations ------------------------------------------------------------------------------


def quick_gelu(x: np.ndarray) -> np.ndarray:
    """CLIP's x * sigmoid(1.702 x), in place on x (float32)."""
    s = np.multiply(x, _F32(-1.702))
    np.exp(s, out=s)  # overflows to inf for very negative x: x / inf = -0, the limit
    s += _F32(1.0)
    x /= s
    return x


# erfc(z) = t * exp(-z^2 + P(u)) for z in [0, _ERFC_ZMAX], t = 2 / (2 + z), u = t mapped to [-1, 1]
# (Numerical Recipes' form). P: Chebyshev series fitted by least squares at 4000 Chebyshev nodes
# against math.erfc; relative error of erfc below 2e-11 on the whole range.
_ERFC_ZMAX = 10.0  # beyond it, x * Phi(x) for x = -z * sqrt(2) is below float32's smallest denormal
_ERFC_TMIN = 2.0 / (2.0 + _ERFC_ZMAX)
_ERFC_CHEB = (
    -0.5511712503141009, 0.5502563182397052, 0.007267847232713544, -0.006366320664966412,
    -0.00015938484563135665, 0.00018099070171155273, -2.5158306729221364e-06, -6.4200789860739e-06,
    5.681936730951404e-07, 2.1429783914502808e-07, -4.464017522991154e-08, -4.607167992502642e-09,
    2.4929776801811594e-09, -9.625134988343929e-11, -9.923740153873736e-11,
)  # fmt: skip


_GELU_CHUNK = 1 << 14  # elements per pass: the float64 temporaries stay in cache


def gelu(x: np.ndarray) -> np.ndarray:
    """torch.nn.GELU(): x * Phi(x) with the exact erf, computed in float64, returned as float32.

    Phi(-|x|) = erfc(|x| / sqrt 2) / 2 keeps its relative accuracy in the negative tail; the
    result is within float32 rounding of the exact value (about 1e-6 from torch, which rounds
    1 + erf to float32).
    """
    flat = x.reshape(-1)  # [N]
    out = np.empty(flat.shape, dtype=_F32)
    bufs = [np.empty(min(_GELU_CHUNK, flat.size)) for _ in range(7)]
    for start in range(0, flat.size, _GELU_CHUNK):
        stop = min(start + _GELU_CHUNK, flat.size)
        _gelu_chunk(flat[start:stop], out[start:stop], *(b[: stop - start] for b in bufs))
    return out.reshape(x.shape)


def _gelu_chunk(
    x32: np.ndarray,
    out: np.ndarray,
    x: np.ndarray,
    z: np.ndarray,
    t: np.ndarray,
    u2: np.ndarray,
    b1: np.ndarray,
    b2: np.ndarray,
    tmp: np.ndarray,
) -> None:
    """out = gelu(x32) through float64 scratch buffers of the same length."""
    x[...] = x32
    np.abs(x, out=z)
    z *= math.sqrt(0.5)
    np.minimum(z, _ERFC_ZMAX, out=z)  # past it |x * Phi(x)| < 2e-44 |x| for x < 0, and x for x > 0
    np.add(z, 2.0, out=t)
    np.divide(2.0, t, out=t)  # t = 2 / (2 + z)
    np.multiply(t, 4.0 / (1.0 - _ERFC_TMIN), out=u2)
    u2 -= 2.0 * (1.0 + _ERFC_TMIN) / (1.0 - _ERFC_TMIN)  # 2u, u in [-1, 1]
    b1.fill(_ERFC_CHEB[-1])
    b2.fill(0.0)
    for c in _ERFC_CHEB[-2:0:-1]:  # Clenshaw: b_k = 2u b_{k+1} - b_{k+2} + c_k
        np.multiply(u2, b1, out=tmp)
        tmp -= b2
        tmp += c
        b1, b2, tmp = tmp, b1, b2
    np.multiply(u2, b1, out=tmp)
    tmp *= 0.5
    tmp -= b2
    tmp += _ERFC_CHEB[0]  # P(u) = u b_1 - b_2 + c_0
    np.multiply(z, z, out=b2)
    tmp -= b2
    np.exp(tmp, out=tmp)
    tmp *= t
    tmp *= 0.5  # erfc(z) / 2 = Phi(-|x|)
    tmp *= x  # x Phi(-|x|): the result for x < 0
    np.subtract(x, tmp, out=b2)  # x (1 - Phi(-|x|)): the result for x >= 0
    np.copyto(b2, tmp, where=x < 0)
    out[...] = b2


_TANH_GELU_BETA = math.sqrt(2.0 / math.pi)
_TANH_GELU_KAPPA = 0.044715


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """torch's GELU(approximate="tanh") (transformers' gelu_pytorch_tanh, SigLIP's MLP):
    0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), computed in float64, returned as float32."""
    flat = x.reshape(-1)  # [N]
    out = np.empty(flat.shape, dtype=_F32)
    for start in range(0, flat.size, _GELU_CHUNK):
        v = flat[start : start + _GELU_CHUNK].astype(np.float64)
        inner = v * v
        inner *= _TANH_GELU_KAPPA * v
        inner += v
        inner *= _TANH_GELU_BETA
        np.tanh(inner, out=inner)
        inner += 1.0
        inner *= v
        inner *= 0.5
        out[start : start + v.size] = inner
    return out.reshape(x.shape)


_ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "quick_gelu": quick_gelu,
    "gelu": gelu,
    "gelu_pytorch_tanh": gelu_tanh,
}
