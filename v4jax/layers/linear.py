"""The weight primitives every layer is built from: `Projection` (every weight matmul), `RMSNorm`, `Embed`.

`Projection` owns the dtype policy of a matmul (weights stored in `cfg.param_dtype`, computed in
`cfg.dtype`, accumulated in float32) and is where quantised weights will plug in; no layer calls
`jnp.einsum` on a weight directly.

    Projection:  y = einsum(eqn, x, W)        e.g. 'BTD,DQ->BTQ'
    RMSNorm:     y = x / sqrt(mean(x²) + eps) · scale      (float32 inside)
    Embed:       y[B, T, D] = E[tokens]
"""

from __future__ import annotations

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

    @nn.compact
    def __call__(self, eqn: str, x: jax.Array, columns: tuple[int, int] | None = None) -> jax.Array:
        """einsum(eqn, x, W); `columns=(a, b)` uses only W[..., a:b] (one part of a fused weight)."""
        if len(self.shape) != len(self.axes):
            raise ValueError(f"{self.name}: shape {self.shape} and axes {self.axes} differ in rank")
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(normal_init(self.cfg.initializer_range), self.axes),
            self.shape,
            self.cfg.weight_dtype,
        )
        if columns is not None:
            kernel = kernel[..., columns[0] : columns[1]]
        return project(eqn, x, kernel, self.cfg.compute_dtype)


def project(eqn: str, x: jax.Array, kernel: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """einsum(eqn, x, kernel) in `dtype` with float32 accumulation, returned in `dtype`."""
    eqn, x, kernel = merged_contraction(eqn, x, kernel)
    y = jnp.einsum(eqn, x.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32)
    return y.astype(dtype)


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
