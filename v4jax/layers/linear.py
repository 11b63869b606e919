"""The weight primitives every layer is built from: `Projection` (every weight matmul), `RMSNorm`, `Embed`.

`Projection` owns the dtype policy of a matmul (weights stored in `cfg.param_dtype`, computed in
`cfg.dtype`, accumulated in float32) and is where quantised weights will plug in; no layer calls
`jnp.einsum` on a weight directly.

    Projection:  y = einsum(eqn, x, W)        e.g. 'BTD,DQ->BTQ'
    RMSNorm:     y = x / sqrt(mean(x²) + eps) · scale      (float32 inside)
    Embed:       y[B, T, D] = E[tokens]

Decoding's inference layout fuses the projections that read one input into one kernel
(`fuse_projections`), applied by `fused_projection`: x·[W_1 | W_2 | ...] in one product, split after.
On CPU a product of 2 rows runs as one matrix-vector product per row (`by_rows`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn

from v4jax import sharding as shd
from v4jax.config import ModelConfig


def normal_init(stddev: float) -> nn.initializers.Initializer:
    return nn.initializers.normal(stddev=stddev)


class Projection(nn.Module):
    """A weight of `shape` with logical `axes`, applied by an einsum given at the call site."""

    cfg: ModelConfig
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]

    def setup(self):
        if len(self.shape) != len(self.axes):
            raise ValueError(f"{self.name}: shape {self.shape} and axes {self.axes} differ in rank")
        self.kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(normal_init(self.cfg.initializer_range), self.axes),
            self.shape,
            self.cfg.weight_dtype,
        )

    def __call__(self, eqn: str, x: jax.Array, columns: tuple[int, int] | None = None) -> jax.Array:
        """einsum(eqn, x, W); `columns=(a, b)` uses only W[..., a:b] (one part of a fused weight)."""
        kernel = self.kernel if columns is None else self.kernel[..., columns[0] : columns[1]]
        return project(eqn, x, kernel, self.cfg.compute_dtype)

    def weight(self) -> jax.Array:
        """W as the products use it (in the compute dtype), for a caller that runs its own kernel on it."""
        return self.kernel.astype(self.cfg.compute_dtype)


def project(eqn: str, x: jax.Array, kernel: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """einsum(eqn, x, kernel) in `dtype` with float32 accumulation, returned in `dtype`."""
    eqn, x, kernel = merged_contraction(eqn, x, kernel)
    kernel = kernel.astype(dtype)

    def product(rows: jax.Array) -> jax.Array:
        return jnp.einsum(eqn, rows, kernel, preferred_element_type=jnp.float32)

    return by_rows(product, x.astype(dtype), _leading_free_axes(eqn)).astype(dtype)


# Products of at most this many rows run on CPU as one matrix-vector product per row: XLA:CPU emits a 1-row
# product as inline code but sends 2 rows to Eigen's matrix-matrix path, at several times the cost for a small
# weight (tiny_v4 in the speculative decoding loop: [2, 192] 9.6 µs against [1, 192] 1.5 µs). More rows read a
# large weight too often (small_v4 decoding at batch 4: 17.1 -> 18.4 ms a step; batch 2: 14.1 -> 13.5).
ROWS_AS_VECTORS = 2


def by_rows(product: Callable[[jax.Array], jax.Array], x: jax.Array, rows: int) -> jax.Array:
    """product(x), where product maps the `rows` leading axes of x to the leading axes of its result, computed
    one row at a time (a concatenation of product(x_i)) for 2..ROWS_AS_VECTORS rows on an unsharded CPU."""
    count = math.prod(x.shape[:rows])
    if not 1 < count <= ROWS_AS_VECTORS or jax.default_backend() != "cpu" or not jax.sharding.get_abstract_mesh().empty:
        return product(x)
    parts = [product(row) for row in x.reshape(count, *((1,) * rows), *x.shape[rows:])]
    return jnp.concatenate(parts, axis=0).reshape(*x.shape[:rows], *parts[0].shape[rows:])


def _leading_free_axes(eqn: str) -> int:
    """How many leading axes of the product's input are rows: in the input and, also leading, in the output,
    not in the kernel; e.g. 2 for 'BTD,DQ->BTQ' and 'BTNH,NHC->BTNC'."""
    inputs, out = eqn.split("->")
    lhs, rhs = inputs.split(",")
    n = 0
    while n < min(len(lhs), len(out)) and lhs[n] not in rhs and out[n] == lhs[n]:
        n += 1
    return n


def merged_contraction(eqn: str, x: jax.Array, kernel: jax.Array) -> tuple[str, jax.Array, jax.Array]:
    """A product that contracts several trailing axes of x with the same leading axes of the kernel, e.g. Wo's
    'BTNA,NAD->BTD', as the matmul over one merged axis ('BTF,FD->BTD' on x [B,T,N·A], W [N·A, D]); other
    equations unchanged. The same numbers, but XLA:CPU otherwise copied the [N, A, D] weight into the layout of
    x on every call (a transposed copy of each layer's Wo in every decoding step)."""
    inputs, out = eqn.split("->")
    lhs, rhs = inputs.split(",")
    n = sum(1 for a in lhs if a in rhs and a not in out)  # contracted axes
    if n < 2 or lhs[-n:] != rhs[:n] or out != lhs[:-n] + rhs[n:]:
        return eqn, x, kernel
    f = next(a for a in "FGHIJKLMOPQRSUVWXYZ" if a not in eqn)  # the merged axis: any letter eqn does not use
    merged = f"{lhs[:-n]}{f},{f}{rhs[n:]}->{out}"
    return merged, x.reshape(*x.shape[:-n], -1), kernel.reshape(-1, *kernel.shape[n:])


FUSED_INPUTS = "x_proj"  # the param name of an attention module's fused input projections (inference layout)


def fuse_projections(tree: dict[str, Any], name: str, members: Sequence[str]) -> dict[str, Any]:
    """A module's params `tree` in the inference layout: the kernels of the Projections at `members` (paths
    under the module, e.g. 'wq_a', 'compressor/wkv'), which all read one input and contract its last axis
    with their first, replaced by one param `name` [K, ΣN_i] (each kernel [K, *N_i] flattened to [K, N_i],
    side by side in order), read back by `fused_projection`.

    Why: a decoding step runs one small matrix-vector product per projection, and XLA:CPU streams a small
    weight at a fraction of the bandwidth of a wide one (`benchmarks/matvec.py`): one product instead of many.
    """
    out = _copy_dicts(tree)
    kernels = [_pop_kernel(out, member.split("/")) for member in members]
    if len({k.shape[0] for k in kernels}) != 1:
        raise ValueError(f"{name}: members {list(members)} contract inputs of different widths")
    out[name] = jnp.concatenate([k.reshape(k.shape[0], -1) for k in kernels], axis=1)
    return out


def _copy_dicts(tree: Any) -> Any:
    return {k: _copy_dicts(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def _pop_kernel(tree: dict[str, Any], path: list[str]) -> jax.Array:
    """Remove and return the kernel of the Projection at `path` in `tree`, dropping subtrees left empty."""
    head, *rest = path
    kernel = _pop_kernel(tree[head], rest) if rest else tree[head].pop("kernel")
    if not tree[head]:
        del tree[head]
    return kernel


def fused_projection(
    module: nn.Module, name: str, x: jax.Array, members: Sequence[str], dtype: jnp.dtype
) -> list[jax.Array]:
    """x [B, T, K] through the module's fused kernel `name` [K, ΣN_i] (`fuse_projections` of the Projections at
    `members` under the module) in one product -> [x·W_i [B, T, *N_i] for each member, in order]."""
    if not module.has_variable("params", name):
        raise ValueError(
            f"{'/'.join(module.path)}: no fused kernel {name!r}: decoding runs on the inference parameter layout "
            "(v4jax.sampling.engine.inference_params)"
        )
    outputs = [_submodule(module, member).shape[1:] for member in members]
    kernel = module.get_variable("params", name)
    widths = [math.prod(shape) for shape in outputs]
    chex.assert_shape(kernel, (x.shape[-1], sum(widths)))
    y = project("BTD,DF->BTF", x, kernel, dtype)
    parts = jnp.split(y, list(itertools.accumulate(widths))[:-1], axis=-1)
    return [part.reshape(*x.shape[:-1], *shape) for part, shape in zip(parts, outputs, strict=True)]


def _submodule(module: nn.Module, path: str) -> Projection:
    """The submodule of `module` at `path` ('compressor/wkv'), by attribute (setup-defined submodules)."""
    for attribute in path.split("/"):
        module = getattr(module, attribute)
    return module


class RMSNorm(nn.Module):
    """RMS normalisation over the last axis with a learned scale; computed in float32."""

    cfg: ModelConfig
    dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.dim:
            raise ValueError(f"{self.name}: expected last dim {self.dim}, got shape {x.shape}")
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, (shd.NORM,)),
            (self.dim,),
            self.cfg.weight_dtype,
        )
        return rms_norm(x, scale, self.cfg.rms_norm_eps).astype(self.cfg.compute_dtype)


def rms_norm(x: jax.Array, scale: jax.Array | None, eps: float) -> jax.Array:
    """float32 RMSNorm of the last axis; `scale=None` gives the unweighted form."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return y if scale is None else y * scale.astype(jnp.float32)


class Embed(nn.Module):
    """Token embedding table E[V, D]."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        table = self.param(
            "embedding",
            nn.with_logical_partitioning(normal_init(self.cfg.initializer_range), (shd.VOCAB, shd.EMBED)),
            (self.cfg.vocab_size, self.cfg.hidden_size),
            self.cfg.weight_dtype,
        )
        return jnp.take(table, tokens, axis=0).astype(self.cfg.compute_dtype)


def swiglu(gate: jax.Array, up: jax.Array, limit: float | None = None) -> jax.Array:
    """silu(gate) · up, computed in float32 and returned in the input dtype.

    With `limit` L (V4 `swiglu_limit`) the pre-activations are clamped first, in float32, as in HF
    `DeepseekV4MLP` / `DeepseekV4Experts._apply_gate`: gate ← min(gate, L), up ← clip(up, −L, L).
    Used by every SwiGLU (dense MLP, shared and routed experts), so the clamp lives only here.
    """
    g, u = gate.astype(jnp.float32), up.astype(jnp.float32)
    if limit is not None:
        g, u = jnp.minimum(g, limit), jnp.clip(u, -limit, limit)
    return (jax.nn.silu(g) * u).astype(gate.dtype)
