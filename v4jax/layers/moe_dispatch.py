"""Routed-expert dispatch: run each token through its K chosen experts and combine with the routing weights.

Letters (style table): T flattened tokens (B·T folded into one axis), D model width, E experts,
M expert hidden, K experts per token, X capacity slots per expert (also the rows of one matmul chunk in 'sorted').
Each of the T·K (token, slot) assignments is a *row*; an expert is SwiGLU over its rows:

    ragged (dropless):    rows sorted by expert, group sizes G[E]
        gate = ragged_dot(rows, W1, G), up = ragged_dot(rows, W3, G)     [T·K, D] x [E, D, M] -> [T·K, M]
        out  = ragged_dot(silu(gate) ⊙ up, W2, G)                        [T·K, M] x [E, M, D] -> [T·K, D]
    sorted (dropless):    rows sorted by expert into buf[nb·bs, D], each expert's group G_e padded with zero
                          rows to ceil(G_e / bs) blocks of bs rows; nb = (T·K + min(E, T·K)·(bs − 1)) // bs
                          bounds Σ_e ceil(G_e / bs) statically and blocks past that sum are never computed.
                          Expert e runs its consecutive blocks in chunks of X = c·bs rows, c in (4, 2, 1)
                          largest first, with its weights sliced once:
        out_chunk = swiglu('XD,DM->XM'(buf_chunk, W1[e]), 'XD,DM->XM'(buf_chunk, W3[e])) @ W2[e]   [X, D]
        backward (custom VJP, same loops): dW1[e] = Σ_chunks 'XD,XM->DM'(buf_chunk, dgate_chunk), likewise
        dW3 and dW2, accumulated per expert in a float32 [D, M] carry: no per-chunk weight-sized buffers
    gather (dropless, for few rows: decoding): each of the T·K rows through its own expert
        out[t, k] = swiglu('D,DM->M'(x[t], W1[e]), 'D,DM->M'(x[t], W3[e])) @ W2[e],   e = expert[t, k]
        reads only the chosen experts' weights instead of all E. On CPU (float32) a native kernel reads
        each chosen expert once, in place, for all its rows (`v4jax.kernels.cpu`), and 'auto' takes it up to
        T·K ≤ KERNEL_ROWS_PER_EXPERT · E (up to KERNEL_SHARED_TOKENS tokens with the MoE's shared expert in
        the same call); elsewhere it is an XLA scan over rows, which 'auto' takes for T·K ≤ E
    capacity (drops over-capacity rows): rows gathered into a padded buffer buf[E, X, D]
        h    = silu('EXD,EDM->EXM' with W1) ⊙ ('EXD,EDM->EXM' with W3)
        out  = 'EXM,EMD->EXD' with W2
    combine:              y = 'TKD,TK->TD'(out, weights)                 (float32)

Matmuls run in the dtype of `x` with float32 accumulation (the `Projection` policy); rows and the combine
stay float32. Expert ids outside [0, E) mark padding rows: they produce zero rows and use no capacity.
`swiglu_limit` L (V4) clamps the pre-activations of silu(gate) ⊙ up in float32, gate ≤ L and up ∈ [−L, L]
(`linear.swiglu`, as HF `DeepseekV4Experts`); None (V3) leaves them unclamped.

Expert parallelism (`routed_experts` under a mesh): the computation runs in `jax.shard_map` with tokens
x[T_batch, D], expert weights W1[E_expert, D, M_tensor], W2[E_expert, M_tensor, D] (D gathered over fsdp
on entry). Rows travel to the shard owning their expert by an all-to-all over the expert axes into a
worst-case (dropless) buffer [ep, T_local·K, D], are computed there by the local dispatch on E/ep
experts, travel back by the inverse all-to-all, are combined, and M-sharded partial sums are psum'd over
the expert-MLP axes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import PartitionSpec

from v4jax import sharding as shd
from v4jax.kernels import cpu as cpu_kernels
from v4jax.layers.linear import swiglu

# 'auto' is the dropless 'sorted' on every backend (AUTO_IMPL holds per-backend exceptions; none today).
# CPU: forward+backward (grads wrt x, weights, w1, w3, w2) of the routed experts at the `small` preset size
# (T = 2×512 tokens, D=512, E=64, K=6, M=256: 9·2·T·K·D·M = 14.5 GFLOP of useful work; uneven loads of
# 3..363 rows per expert) on the 2-core development CPU, `benchmarks/moe_dispatch.py`, with other jobs on the
# machine (process CPU time, all threads, which is steadier than wall time there):
#   ragged   (jax.lax.ragged_dot):        33.0 s   (XLA:CPU lowers ragged_dot to a masked dense dot over
#                                                   all E groups: E× the FLOPs; 16.6 s wall on an idle machine)
#   capacity (batched einsum, dropless):   5.79 s  (X = T slots: the buffer is E/K = 10.7× the real rows)
#   capacity (factor 2.0, drops rows):     1.16 s  (X = 192 slots: the buffer is 2× padded)
#   sorted   (block-sorted, dropless):     0.86 s  (17% padding rows at bs = 32; 0.70 s wall = 20.6 GFLOP/s,
#                                                   51% of the matmul peak measured alongside on one free core)
# (end to end on `small`: 148 tokens/s against 132 for capacity factor 2.0 and 40 for dropless capacity).
# H100 (jax 0.11.2; benchmarks/README.md): XLA:GPU has no grouped-matmul kernel for ragged_dot either. The same
# benchmark, float32: T=1024 ragged 7.6 ms, sorted 13.7 ms, dropless capacity 1.4 ms, capacity@2.0 0.6 ms;
# T=8192 ragged 55 ms, sorted 35 ms, dropless capacity 8.8 ms. A `small` training step, bf16, batch 32×512
# (16K tokens): ragged 1.02 s, sorted 0.46 s (2.2× faster), capacity@2.0 0.09 s (11×, but drops rows); on
# `small_v4` at that batch ragged ran out of memory (a 69.7 GiB buffer on the 80 GB card).
AUTO_IMPL: dict[str, str] = {}
DEFAULT_IMPL = "sorted"
IMPLS = ("ragged", "capacity", "sorted", "gather")
SORTED_BLOCK_SIZE = 32  # bs of 'sorted': each expert's rows are padded to whole blocks of bs rows
SORTED_CHUNKS = (4, 2, 1)  # blocks per matmul of 'sorted', largest first


# 'auto' with the CPU kernel: 'gather' up to 8 rows per expert. Forward of the routed experts at small_v4's
# sizes (E=64, K=6, D=512, M=256) on the 2-core CPU, kernel against 'sorted': T=1 0.59 vs 11.5 ms, T=16 4.9
# vs 32.6 ms, T=64 13.0 vs 39.3 ms (6.0 rows per expert), T=128 28.1 vs 39.1 ms (12.0), T=256 62.7 vs 39.8 ms.
KERNEL_ROWS_PER_EXPERT = 8


def resolve_impl(
    impl: str, num_rows: int | None = None, num_experts: int | None = None, cpu_kernel: bool = False
) -> str:
    """One of IMPLS for the configured `moe_impl`. 'auto' is 'gather' when the `num_rows` (token, slot) rows
    are at most the `num_experts` experts (decoding: reading the rows' experts beats reading all of them), or
    at most KERNEL_ROWS_PER_EXPERT per expert when `cpu_kernel` (`cpu_kernel_applies`) runs it; else the
    default backend's dispatch."""
    if impl == "auto":
        if num_rows is not None and num_experts is not None:
            if num_rows <= num_experts or (cpu_kernel and num_rows <= KERNEL_ROWS_PER_EXPERT * num_experts):
                return "gather"
        return AUTO_IMPL.get(jax.default_backend(), DEFAULT_IMPL)
    if impl not in IMPLS:
        raise ValueError(f"moe_impl={impl!r} is not one of {('auto', *IMPLS)}")
    return impl


def expert_capacity(num_rows: int, num_experts: int, capacity_factor: float | None, max_per_expert: int) -> int:
    """Slots per expert X in the capacity buffer: ceil(capacity_factor · rows / E), at least 1 and at most
    `max_per_expert` (the most rows one expert can receive: a token never picks an expert twice).
    `capacity_factor=None` is dropless: X = max_per_expert."""
    if capacity_factor is None:
        return max_per_expert
    return min(max_per_expert, max(1, math.ceil(capacity_factor * num_rows / num_experts)))


# ----------------------------------------------------------------- per-row expert FFNs
def ragged_experts(
    x: jax.Array, expert: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array, *, limit: float | None = None
) -> jax.Array:
    """Dropless: out[t, k] = FFN_{expert[t, k]}(x[t]) as float32 [T, K, D]; x [T, D], expert [T, K] int.

    The T·K rows are sorted by expert (padding ids ≥ E sort last and lie in no group), multiplied by
    `jax.lax.ragged_dot`, and unsorted by the inverse permutation (an integer scatter plus a row gather).
    """
    t, k = expert.shape
    e = w1.shape[0]
    dtype = x.dtype
    flat = expert.reshape(-1)  # [T·K], row r is token r // K
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=e).astype(jnp.int32)  # ids >= E are not counted
    rows = jnp.take(x, order // k, axis=0)  # [T·K, D] sorted by expert

    def mm(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
        return jax.lax.ragged_dot(lhs, rhs.astype(dtype), group_sizes, preferred_element_type=jnp.float32)

    h = swiglu(mm(rows, w1).astype(dtype), mm(rows, w3).astype(dtype), limit)  # [T·K, M]
    out = mm(h, w2)  # [T·K, D] float32
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(t * k, dtype=order.dtype))
    return jnp.take(out, inverse, axis=0).reshape(t, k, -1)  # [T, K, D]


def capacity_experts(
    x: jax.Array,
    expert: jax.Array,
    w1: jax.Array,
    w3: jax.Array,
    w2: jax.Array,
    *,
    capacity: int,
    limit: float | None = None,
) -> jax.Array:
    """Capacity-padded: out[t, k] = FFN_{expert[t, k]}(x[t]) as float32 [T, K, D], or 0 when dropped.

    Each expert takes at most `capacity` rows, filled slot-major (every token's first choice before any
    second choice, then token order); rows beyond that are dropped (zero output, no gradient). A row's
    slot is its rank among earlier rows of the same expert (a cumsum over a [T·K, E] one-hot); tokens are
    then gathered into buf[E, X, D] through an integer slot -> token map, so no [T, E, X] tensor exists.
    """
    t, k = expert.shape
    e = w1.shape[0]
    dtype = x.dtype
    flat = expert.T.reshape(-1)  # [K·T] slot-major, row r is token r % T
    onehot = (flat[:, None] == jnp.arange(e, dtype=flat.dtype)).astype(jnp.int32)  # [K·T, E]
    rank = jnp.take_along_axis(jnp.cumsum(onehot, axis=0), jnp.clip(flat, 0, e - 1)[:, None], axis=1)[:, 0]
    rank = rank - 1
    slot = jnp.where((flat < e) & (rank < capacity), rank, capacity)  # [K·T]; `capacity` = dropped
    token = jnp.arange(k * t, dtype=jnp.int32) % t
    source = jnp.full((e, capacity), t, jnp.int32).at[flat, slot].set(token, mode="drop")  # [E, X]; t = empty
    buf = jnp.take(x, source, axis=0, mode="fill", fill_value=0)  # [E, X, D]

    def mm(eqn: str, lhs: jax.Array, rhs: jax.Array) -> jax.Array:
        return jnp.einsum(eqn, lhs, rhs.astype(dtype), preferred_element_type=jnp.float32)

    h = swiglu(mm("EXD,EDM->EXM", buf, w1).astype(dtype), mm("EXD,EDM->EXM", buf, w3).astype(dtype), limit)
    out = mm("EXM,EMD->EXD", h, w2)  # [E, X, D] float32
    rows = out.at[flat, slot].get(mode="fill", fill_value=0)  # [K·T, D]
    return rows.reshape(k, t, -1).transpose(1, 0, 2)  # [T, K, D]


def cpu_kernel_applies(*operands: jax.Array) -> bool:
    """Whether `gathered_experts` runs the native CPU kernel on `operands` (x and the weights): on CPU, all
    float32, the kernel built."""
    on_cpu = jax.default_backend() == "cpu"  # (a GPU host never builds the CPU kernel)
    return on_cpu and all(a.dtype == jnp.float32 for a in operands) and cpu_kernels.routed_experts_available()


def gathered_experts(
    x: jax.Array,
    expert: jax.Array,
    w1: jax.Array,
    w3: jax.Array,
    w2: jax.Array,
    *,
    limit: float | None = None,
    shared: tuple[jax.Array, jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """Dropless: out[t, k] = FFN_{expert[t, k]}(x[t]) as float32 [T, K, D], reading only the chosen experts'
    weights instead of all E (decoding). Padding ids (outside [0, E)) give zero rows. With `shared` =
    (sw1 [D, S], sw3 [D, S], sw2 [S, D]), a shared expert's SwiGLU of every token as one more slot: [T, K + 1, D].

    Where `cpu_kernel_applies` this is the native kernel `v4jax.kernels.cpu.routed_experts` (XLA copies each
    dynamically sliced expert before its product; the kernel reads each chosen expert once, in place, and a
    shared expert in the same call), differentiated as the XLA dispatch 'auto' would run without it;
    elsewhere, that XLA dispatch."""
    shared = () if shared is None else tuple(shared)
    if cpu_kernel_applies(x, w1, w3, w2, *shared):
        return jax.lax.platform_dependent(
            x,
            expert,
            w1,
            w3,
            w2,
            *shared,
            cpu=functools.partial(_kernel_experts, limit),
            default=functools.partial(_xla_gathered_experts, limit),
        )
    return _xla_gathered_experts(limit, x, expert, w1, w3, w2, *shared)


def _xla_gathered_experts(limit, x, expert, w1, w3, w2, *shared):
    """`gathered_experts` without the kernel: the routed rows, and the shared expert as the only expert of a
    stack of one, each by the dispatch 'auto' takes without the kernel (scan for T·K ≤ E, else 'sorted')."""

    def xla(x, expert, w1, w3, w2):
        impl = scanned_experts if expert.size <= w1.shape[0] else sorted_experts
        return impl(x, expert, w1, w3, w2, limit=limit)

    rows = xla(x, expert, w1, w3, w2)
    if not shared:
        return rows
    sw1, sw3, sw2 = shared
    own = xla(x, jnp.zeros((x.shape[0], 1), jnp.int32), sw1[None], sw3[None], sw2[None])  # [T, 1, D]
    return jnp.concatenate([rows, own], axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kernel_experts(limit, x, expert, w1, w3, w2, *shared):
    return cpu_kernels.routed_experts(x, expert, w1, w3, w2, limit, shared=shared or None)


def _kernel_experts_fwd(limit, x, expert, w1, w3, w2, *shared):
    return _kernel_experts(limit, x, expert, w1, w3, w2, *shared), (x, expert, w1, w3, w2, *shared)


def _kernel_experts_bwd(limit, residuals, cotangent):
    x, expert, w1, w3, w2, *shared = residuals
    _, pullback = jax.vjp(lambda x, *w: _xla_gathered_experts(limit, x, expert, *w), x, w1, w3, w2, *shared)
    dx, *dw = pullback(cotangent)
    return dx, None, *dw


_kernel_experts.defvjp(_kernel_experts_fwd, _kernel_experts_bwd)


def scanned_experts(
    x: jax.Array, expert: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array, *, limit: float | None = None
) -> jax.Array:
    """`gathered_experts` in XLA: a scan over the T·K (token, slot) rows, each slicing its own expert's
    W1/W3 [D, M] and W2 [M, D]."""
    t, k = expert.shape
    e, dtype = w1.shape[0], x.dtype
    flat = expert.reshape(-1)  # [T·K], row r is token r // K
    valid = (flat >= 0) & (flat < e)

    def row(_, inputs):
        xr, er = inputs  # [D], []
        w1e, w3e, w2e = (jax.lax.dynamic_index_in_dim(w, er, keepdims=False).astype(dtype) for w in (w1, w3, w2))
        h = swiglu(_mm("D,DM->M", xr, w1e).astype(dtype), _mm("D,DM->M", xr, w3e).astype(dtype), limit)
        return None, _mm("M,MD->D", h, w2e)

    _, out = jax.lax.scan(row, None, (jnp.repeat(x, k, axis=0), jnp.where(valid, flat, 0)))  # [T·K, D]
    return jnp.where(valid[:, None], out, 0.0).reshape(t, k, -1)


class BlockLayout(NamedTuple):
    """Where `sorted_experts` puts each row: sorted by expert, each expert's group padded to whole blocks."""

    position: jax.Array  # [T·K] int32 slot of each row in buf [nb·bs]; nb·bs (outside buf) for padding ids
    block_start: jax.Array  # [E] int32 first block of each expert
    block_end: jax.Array  # [E] int32 one past its last block (= block_start when the expert has no rows)
    num_blocks: int  # nb, the static bound (T·K + min(E, T·K)·(bs − 1)) // bs on Σ_e ceil(G_e / bs)


def block_layout(expert: jax.Array, num_experts: int, block_size: int) -> BlockLayout:
    """The block layout of the rows of `expert` (int, any shape, flattened row-major) for E = `num_experts`
    experts and blocks of bs = `block_size` rows. Rows keep their order within an expert (a stable
    argsort); ids outside [0, E) are padding and get no slot."""
    flat = expert.reshape(-1)
    r, e, bs = flat.shape[0], num_experts, block_size
    key = jnp.where((flat >= 0) & (flat < e), flat, e).astype(jnp.int32)  # padding ids -> e
    sizes = jnp.bincount(key, length=e + 1)[:e]  # G [E]
    blocks = (sizes + bs - 1) // bs
    block_end = jnp.cumsum(blocks).astype(jnp.int32)
    block_start = block_end - blocks.astype(jnp.int32)
    order = jnp.argsort(key, stable=True)  # [T·K] rows sorted by expert
    sorted_key = key[order]
    owner = jnp.minimum(sorted_key, e - 1)
    rank = jnp.arange(r, dtype=jnp.int32) - (jnp.cumsum(sizes) - sizes).astype(jnp.int32)[owner]
    num_blocks = (r + min(e, r) * (bs - 1)) // bs
    slot = jnp.where(sorted_key < e, block_start[owner] * bs + rank, num_blocks * bs)
    position = jnp.zeros(r, jnp.int32).at[order].set(slot)
    return BlockLayout(position, block_start, block_end, num_blocks)


def sorted_experts(
    x: jax.Array,
    expert: jax.Array,
    w1: jax.Array,
    w3: jax.Array,
    w2: jax.Array,
    *,
    block_size: int = SORTED_BLOCK_SIZE,
    limit: float | None = None,
) -> jax.Array:
    """Dropless: out[t, k] = FFN_{expert[t, k]}(x[t]) as float32 [T, K, D]; x [T, D], expert [T, K] int.

    Tokens are gathered into buf[nb·bs, D] by `block_layout` (zero rows pad each expert to whole blocks of
    bs = `block_size` rows), every expert multiplies its blocks in chunks (`_block_swiglu`), and each row's
    result is gathered back from its slot. Padding ids (outside [0, E)) give zero rows.
    """
    t, k = expert.shape
    dtype = x.dtype
    layout = block_layout(expert, w1.shape[0], block_size)
    token = jnp.arange(t * k, dtype=jnp.int32) // k
    source = jnp.full((layout.num_blocks * block_size,), t, jnp.int32).at[layout.position].set(token, mode="drop")
    buf = jnp.take(x, source, axis=0, mode="fill", fill_value=0)  # [nb·bs, D]; t = empty slot
    w1, w3, w2 = (w.astype(dtype) for w in (w1, w3, w2))
    out = _block_swiglu(buf, layout.block_start, layout.block_end, w1, w3, w2, block_size, limit)  # [nb·bs, D]
    return jnp.take(out, layout.position, axis=0, mode="fill", fill_value=0).reshape(t, k, -1)


def _mm(eqn: str, lhs: jax.Array, rhs: jax.Array) -> jax.Array:
    return jnp.einsum(eqn, lhs, rhs, preferred_element_type=jnp.float32)


def _over_chunks(first, count, block_size, num_blocks, step, carry):
    """carry = step(row, rows, carry) over the `count` blocks of an expert from block `first`, as chunks of
    rows = c·bs for c in SORTED_CHUNKS, largest first (so at most one chunk of each size below the largest);
    the first row `row` is traced, the chunk height `rows` static. Chunks of more than the `num_blocks`
    blocks of the buffer cannot occur and are skipped (their slices would not fit in it)."""
    for chunk in (c for c in SORTED_CHUNKS if c <= num_blocks):
        n, rows = count // chunk, chunk * block_size

        def one(j, carry, start=first * block_size, rows=rows):
            return step(start + j * rows, rows, carry)

        carry = jax.lax.fori_loop(0, n, one, carry)
        first, count = first + n * chunk, count - n * chunk
    return carry


def _block_swiglu_loops(buf, block_start, block_end, w1, w3, w2, block_size, limit, save):
    """out [nb·bs, D] float32 of `_block_swiglu` and, when `save`, (gate, up) [nb·bs, M] in the dtype of buf.

    A scan over the experts (each expert's weights are sliced once) with loops over its chunks."""
    n, d = buf.shape
    m, dtype = w1.shape[-1], buf.dtype

    def expert(carry, xs):
        w1e, w3e, w2e, first, last = xs

        def step(row, rows, carry):
            xb = jax.lax.dynamic_slice_in_dim(buf, row, rows)  # [X, D]
            gate = _mm("XD,DM->XM", xb, w1e).astype(dtype)
            up = _mm("XD,DM->XM", xb, w3e).astype(dtype)
            out = _mm("XM,MD->XD", swiglu(gate, up, limit), w2e)
            new = (out, gate, up)[: len(carry)]
            return tuple(jax.lax.dynamic_update_slice_in_dim(c, v, row, 0) for c, v in zip(carry, new, strict=True))

        return _over_chunks(first, last - first, block_size, n // block_size, step, carry), None

    carry = (jnp.zeros((n, d), jnp.float32),)
    if save:
        carry += (jnp.zeros((n, m), dtype), jnp.zeros((n, m), dtype))
    return jax.lax.scan(expert, carry, (w1, w3, w2, block_start, block_end))[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _block_swiglu(buf, block_start, block_end, w1, w3, w2, block_size, limit):
    """out[chunk] = swiglu(buf[chunk] W1[e], buf[chunk] W3[e]) W2[e] (float32) over the blocks of each expert
    e, [block_start[e], block_end[e]) (blocks of bs = `block_size` rows, multiplied in chunks by
    `_over_chunks`); rows of other blocks are 0. buf [nb·bs, D] and the weights (W1, W3 [E, D, M],
    W2 [E, M, D]) share one dtype; matmuls accumulate in float32.

    Custom VJP: the backward runs the same loops and sums each expert's weight gradients over its chunks
    in a float32 [D, M] carry (autodiff of the loop would keep one weight-sized gradient per chunk)."""
    return _block_swiglu_loops(buf, block_start, block_end, w1, w3, w2, block_size, limit, save=False)[0]


def _block_swiglu_fwd(buf, block_start, block_end, w1, w3, w2, block_size, limit):
    out, gate, up = _block_swiglu_loops(buf, block_start, block_end, w1, w3, w2, block_size, limit, save=True)
    return out, (buf, block_start, block_end, w1, w3, w2, gate, up)


def _block_swiglu_bwd(block_size, limit, residuals, d_out):
    buf, block_start, block_end, w1, w3, w2, gate, up = residuals
    dtype, num_blocks = buf.dtype, buf.shape[0] // block_size

    def expert(d_buf, xs):
        w1e, w3e, w2e, first, last = xs

        def step(row, rows, carry):
            d_buf, d_w1, d_w3, d_w2 = carry
            xb, gate_c, up_c = (jax.lax.dynamic_slice_in_dim(a, row, rows) for a in (buf, gate, up))
            d_oc = jax.lax.dynamic_slice_in_dim(d_out, row, rows).astype(dtype)  # [X, D]
            h, swiglu_vjp = jax.vjp(functools.partial(swiglu, limit=limit), gate_c, up_c)
            d_gate, d_up = swiglu_vjp(_mm("XD,MD->XM", d_oc, w2e).astype(dtype))
            d_xb = _mm("XM,DM->XD", d_gate, w1e) + _mm("XM,DM->XD", d_up, w3e)
            d_buf = jax.lax.dynamic_update_slice_in_dim(d_buf, d_xb.astype(dtype), row, 0)
            d_w1 = d_w1 + _mm("XD,XM->DM", xb, d_gate)
            d_w3 = d_w3 + _mm("XD,XM->DM", xb, d_up)
            d_w2 = d_w2 + _mm("XM,XD->MD", h, d_oc)
            return d_buf, d_w1, d_w3, d_w2

        zeros = tuple(jnp.zeros(w.shape, jnp.float32) for w in (w1e, w3e, w2e))
        d_buf, *d_w = _over_chunks(first, last - first, block_size, num_blocks, step, (d_buf, *zeros))
        return d_buf, tuple(g.astype(dtype) for g in d_w)

    d_buf, (d_w1, d_w3, d_w2) = jax.lax.scan(expert, jnp.zeros_like(buf), (w1, w3, w2, block_start, block_end))
    return d_buf, None, None, d_w1, d_w3, d_w2


_block_swiglu.defvjp(_block_swiglu_fwd, _block_swiglu_bwd)


def combine(rows: jax.Array, weights: jax.Array) -> jax.Array:
    """y[t] = Σ_k weights[t, k] · rows[t, k] in float32; rows [T, K, D], weights [T, K] -> [T, D]."""
    return jnp.einsum("TKD,TK->TD", rows.astype(jnp.float32), weights.astype(jnp.float32))


# ----------------------------------------------------------------- local dispatch
def ragged_dispatch(
    x: jax.Array,
    indices: jax.Array,
    weights: jax.Array,
    w1: jax.Array,
    w3: jax.Array,
    w2: jax.Array,
    *,
    swiglu_limit: float | None = None,
) -> jax.Array:
    """Dropless routed experts: x [T, D], indices/weights [T, K], w1/w3 [E, D, M], w2 [E, M, D] -> [T, D]."""
    _check(x, indices, weights, w1, w3, w2)
    return combine(ragged_experts(x, indices, w1, w3, w2, limit=swiglu_limit), weights).astype(x.dtype)


def capacity_dispatch(
    x: jax.Array,
    indices: jax.Array,
    weights: jax.Array,
    w1: jax.Array,
    w3: jax.Array,
    w2: jax.Array,
    *,
    capacity_factor: float | None,
    swiglu_limit: float | None = None,
) -> jax.Array:
    """Capacity-padded routed experts with X = expert_capacity(T·K, E, capacity_factor); shapes as
    `ragged_dispatch`. Assignments beyond an expert's X slots are dropped (see `capacity_experts`)."""
    _check(x, indices, weights, w1, w3, w2)
    capacity = expert_capacity(indices.size, w1.shape[0], capacity_factor, x.shape[0])
    rows = capacity_experts(x, indices, w1, w3, w2, capacity=capacity, limit=swiglu_limit)
    return combine(rows, weights).astype(x.dtype)


def sorted_dispatch(
    x: jax.Array,
    indices: jax.Array,
    weights: jax.Array,
    w1: jax.Array,
    w3: jax.Array,
    w2: jax.Array,
    *,
    swiglu_limit: float | None = None,
    block_size: int = SORTED_BLOCK_SIZE,
) -> jax.Array:
    """Dropless block-sorted routed experts (see `sorted_experts`); shapes as `ragged_dispatch`."""
    _check(x, indices, weights, w1, w3, w2)
    rows = sorted_experts(x, indices, w1, w3, w2, block_size=block_size, limit=swiglu_limit)
    return combine(rows, weights).astype(x.dtype)


def _check(x, indices, weights, w1, w3, w2) -> None:
    t, d = x.shape
    e, _, m = w1.shape
    chex.assert_shape(indices, (t, None))
    chex.assert_equal_shape([indices, weights])
    chex.assert_shape([w1, w3], (e, d, m))
    chex.assert_shape(w2, (e, m, d))


def _local_experts(impl: str, capacity_factor: float | None, limit: float | None) -> Callable[..., jax.Array]:
    """(x [R, D], expert [R, K], w1, w3, w2, expected_rows, max_per_expert) -> float32 rows [R, K, D].

    `expected_rows` is the number of real rows the capacity is sized for (the EP receive buffer is
    padded to ep times that); `max_per_expert` bounds the rows one expert can receive."""

    def ragged(x, expert, w1, w3, w2, expected_rows, max_per_expert):
        return ragged_experts(x, expert, w1, w3, w2, limit=limit)

    def capacity(x, expert, w1, w3, w2, expected_rows, max_per_expert):
        slots = expert_capacity(expected_rows, w1.shape[0], capacity_factor, max_per_expert)
        return capacity_experts(x, expert, w1, w3, w2, capacity=slots, limit=limit)

    def block_sorted(x, expert, w1, w3, w2, expected_rows, max_per_expert):
        return sorted_experts(x, expert, w1, w3, w2, limit=limit)

    def gather(x, expert, w1, w3, w2, expected_rows, max_per_expert):
        return gathered_experts(x, expert, w1, w3, w2, limit=limit)

    return {"ragged": ragged, "capacity": capacity, "sorted": block_sorted, "gather": gather}[impl]


# ----------------------------------------------------------------- sharded dispatch
def _axes(entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _unsharded() -> bool:
    """Whether the dispatch runs locally: no mesh, or no logical axis rules."""
    return jax.sharding.get_abstract_mesh().empty or not tuple(nn.get_logical_axis_rules())


# The kernel takes a shared expert for at most this many tokens (its weights are then read once: the kernel's
# row block). A/B of `generate` (benchmarks/README.md): small_v4 batch 1 8.84 -> 8.18 ms a step, small 6.00 ->
# 5.79; at batch 16, 51.5 -> 57.0 (XLA's 16-row matmuls beat 4 passes over the shared weights).
KERNEL_SHARED_TOKENS = 4


def kernel_runs_shared(x: jax.Array, indices: jax.Array, *weights: jax.Array, impl: str) -> bool:
    """Whether `routed_experts` takes a shared expert into its kernel call: unsharded, on the CPU kernel
    (float32 x and `weights`: w1, w3, w2, then the shared sw1, sw3, sw2), `impl` resolving to 'gather' for
    these rows, and at most KERNEL_SHARED_TOKENS tokens. Why: at batch 1 the shared MLP alone is too short
    to wake a second thread; in the call that already streams the routed experts on both, it streams at
    their rate."""
    num_experts = weights[0].shape[0]
    kernel = cpu_kernel_applies(x, *weights)
    gather = resolve_impl(impl, indices.size, num_experts, kernel) == "gather"
    return kernel and gather and x.shape[0] <= KERNEL_SHARED_TOKENS and _unsharded()


def routed_experts(
    x: jax.Array,
    indices: jax.Array,
    weights: jax.Array,
    w1: jax.Array,
    w3: jax.Array,
    w2: jax.Array,
    *,
    impl: str,
    capacity_factor: float | None,
    swiglu_limit: float | None = None,
    shared: tuple[jax.Array, jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """Routed experts of T tokens, on the current mesh when there is one; shapes as `ragged_dispatch`.
    `shared` = (sw1 [D, S], sw3 [D, S], sw2 [S, D]) adds a shared expert's SwiGLU of every token, computed in
    the routed experts' kernel call; only where `kernel_runs_shared` (a ValueError elsewhere).

    Without a mesh (or without logical rules) this is the local dispatch. Under `sharding.use_mesh` it
    runs in `jax.shard_map`: tokens keep their ACT_BATCH sharding, weights their EXPERTS / EXPERT_MLP
    sharding with D gathered. `impl` is one of IMPLS or 'auto' (see `resolve_impl`); `capacity_factor` is
    used by 'capacity' only (the others are dropless). With expert parallelism (ep shards), capacity applies
    per shard to the rows it receives: X = ceil(factor · T_local·K / (E/ep)).
    """
    _check(x, indices, weights, w1, w3, w2)
    if shared is not None:
        if not kernel_runs_shared(x, indices, w1, w3, w2, *shared, impl=impl):
            raise ValueError(
                "routed_experts: a `shared` expert runs only in the CPU kernel's call (unsharded, float32, impl "
                f"resolving to 'gather', at most {KERNEL_SHARED_TOKENS} tokens; got impl={impl!r}, {x.shape[0]} "
                f"tokens of {x.dtype}): ask kernel_runs_shared first"
            )
        rows = gathered_experts(x, indices, w1, w3, w2, limit=swiglu_limit, shared=shared)  # [T, K + 1, D]
        return combine(rows, jnp.pad(weights, ((0, 0), (0, 1)), constant_values=1)).astype(x.dtype)
    kernel = cpu_kernel_applies(x, w1, w3, w2)
    local = _local_experts(resolve_impl(impl, indices.size, w1.shape[0], kernel), capacity_factor, swiglu_limit)
    if _unsharded():
        return combine(local(x, indices, w1, w3, w2, indices.size, x.shape[0]), weights).astype(x.dtype)
    mesh = jax.sharding.get_abstract_mesh()
    rule_pairs = tuple(nn.get_logical_axis_rules())

    batch_axes = _axes(shd.logical_to_spec((shd.ACT_BATCH,), rule_pairs)[0])
    expert_axes = _axes(shd.logical_to_spec((shd.EXPERTS,), rule_pairs)[0])
    mlp_axes = _axes(shd.logical_to_spec((shd.EXPERT_MLP,), rule_pairs)[0])
    if set(mlp_axes) & set(batch_axes):
        raise ValueError(
            f"logical axes {shd.EXPERT_MLP!r} -> {mlp_axes} and {shd.ACT_BATCH!r} -> {batch_axes} share mesh "
            "axes; the expert-MLP partial sums would mix different tokens"
        )
    ep = math.prod(mesh.shape[a] for a in expert_axes)
    e = w1.shape[0]
    if e % ep:
        raise ValueError(f"n_routed_experts={e} does not split into {ep} shards of mesh axes {expert_axes}")

    def spec(*entries: tuple[str, ...]) -> PartitionSpec:
        return PartitionSpec(*(a or None for a in entries))

    tokens = spec(batch_axes, ())
    w_in = spec(expert_axes, (), mlp_axes)
    w_out = spec(expert_axes, mlp_axes, ())

    def moe_shard(x_, indices_, weights_, w1_, w3_, w2_):
        """Per-shard routed experts. Collectives: with ep > 1 two all_to_all over the expert axes (rows
        out [ep, T_local·K, D] plus their int32 local expert ids, and results back); with a sharded
        expert-MLP axis one psum of the combined [T_local, D] float32 partial outputs over those axes."""
        t_, k = indices_.shape
        e_ = w1_.shape[0]  # E / ep local experts, global ids shard·e_ + [0, e_)
        if ep == 1:
            rows_ = local(x_, indices_, w1_, w3_, w2_, indices_.size, t_)  # [T_, K, D]
        else:
            a = t_ * k
            flat_ = indices_.reshape(-1)  # [T_·K], row r is token r // K
            dest_ = flat_ // e_
            onehot_ = (dest_[:, None] == jnp.arange(ep, dtype=dest_.dtype)).astype(jnp.int32)  # [T_·K, ep]
            pos_ = jnp.take_along_axis(jnp.cumsum(onehot_, axis=0), dest_[:, None], axis=1)[:, 0] - 1
            token_ = jnp.arange(a, dtype=jnp.int32) // k
            source_ = jnp.full((ep, a), t_, jnp.int32).at[dest_, pos_].set(token_)  # [ep, T_·K]; t_ = empty
            send_x_ = jnp.take(x_, source_, axis=0, mode="fill", fill_value=0)  # [ep, T_·K, D]
            send_e_ = jnp.full((ep, a), e_, jnp.int32).at[dest_, pos_].set(flat_ % e_)  # e_ = padding
            recv_x_ = jax.lax.all_to_all(send_x_, expert_axes, 0, 0, tiled=True)  # [ep, T_·K, D] by source
            recv_e_ = jax.lax.all_to_all(send_e_, expert_axes, 0, 0, tiled=True)
            out_ = local(recv_x_.reshape(ep * a, -1), recv_e_.reshape(ep * a, 1), w1_, w3_, w2_, a, ep * t_)
            out_ = out_.reshape(ep, a, -1).astype(x_.dtype)  # [ep, T_·K, D]
            back_ = jax.lax.all_to_all(out_, expert_axes, 0, 0, tiled=True)  # [ep, T_·K, D] by expert shard
            rows_ = back_[dest_, pos_].reshape(t_, k, -1)  # [T_, K, D]
        y_ = combine(rows_, weights_)
        if mlp_axes:
            y_ = jax.lax.psum(y_, mlp_axes)
        return y_.astype(x_.dtype)

    return jax.shard_map(
        moe_shard,
        in_specs=(tokens, tokens, tokens, w_in, w_in, w_out),
        out_specs=tokens,
        check_vma=False,
    )(x, indices, weights, w1, w3, w2)
