"""Engram: conditional memory by hashed n-gram lookup (architecture.md §9, DeepSeek's Engram demo, V4.1 §17.4).

Letters (style.md §4.4): B batch, T tokens, R residual streams, D width, Z hash heads of one layer
((N-1) orders × `engram_n_heads`, order-major), W `engram_head_dim`, N `engram_max_ngram_size`.

Retrieval (token ids only, no weights; exact int64 semantics of the demo, computed with uint32 limbs):
    c       = canonical[token_ids]                         int32 [B, T] (CONSTANTS `canonical`, V' ids)
    w_k(t)  = c[t-k], k = 0..N-1; c[pad_id] before the sequence start (or where positions[t] < k)
    h_n(t)  = XOR_{k<n} (w_k(t) · m_k)      int64 products (wrapping), n = 2..N; odd m_k of the layer
    id_z    = offset_z + (h_n(t) mod P_z)                  int32 [B, T, Z]; P_z distinct primes
    e       = table[id]                                    [B, T, Z, W]
Fusion (demo `Engram.forward`; V4.1 drops the short conv):
    v       = 'BTZW,ZWD->BTD'(e, Wv) + bv                  one value for all streams
    k       = 'BTZW,ZWRD->BTRD'(e, Wk) + bk                one key per stream
    α       = σ(ssqrt(Σ_D rms(k)·γk · rms(X)·γx / √D))     [B, T, R], ssqrt(x) = sign(x)·sqrt(max(|x|, 1e-6))
    g       = α ⊗ v                                        [B, T, R, D]     (α = 1 when not cfg.engram_gate)
    u       = rms(g)·γc                                     per-stream RMSNorm, the conv input
    out     = g + silu(Σ_j conv[j] ⊙ u[t - (K-1-j)·N])     depthwise causal conv, kernel K, dilation N
The caller adds `out` to every residual stream before the layer's attention. All RMSNorms use
cfg.rms_norm_eps (the demo's torch defaults: finfo(float32).eps for the gate norms, 1e-5 for the conv's).

Hash plan (`hash_plan`, host side, deterministic): for layer l, m = 2·r + 1 with r drawn by
numpy default_rng(engram_seed + 10007·l).integers(0, ⌊⌊(2^63-1)/V'⌋/2⌋, N); primes: per layer in
`engram_layer_ids` order, per order n, head j: the smallest prime above the previous head's (the first
head starts at the order's base size), skipping primes used by any earlier head, order or layer. Rows of
one layer are one flat table [Σ P_z (padded to ENGRAM_ROW_ALIGN), W] with head z at offset Σ_{z'<z} P_z'.

Decode: `EngramState` carries the last N-1 raw token ids and the last (K-1)·N conv inputs, so appending
tokens (count[b] real, the rest padding) reproduces the full-sequence result exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from v4jax import sharding as shd
from v4jax.config import ModelConfig
from v4jax.layers.linear import Projection, normal_init, rms_norm
from v4jax.layers.mhc import STREAM_AXES, num_streams
from v4jax.layers.moe import CONSTANTS

LAYER_PRIME = 10007  # the per-layer seed stride of the multipliers
ENGRAM_ROW_ALIGN = 1024  # table rows are padded to a multiple (row sharding over up to 1024 shards)
MAX_TABLE_SIZE = 2**31 - 1  # a head's prime (and a layer's rows) must fit int32 row ids
SSQRT_FLOOR = 1e-6
ROW_AXES = (shd.ACT_BATCH, shd.ACT_LENGTH, None, None)


# ----------------------------------------------------------------- hash plan (host)
def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin (exact for n < 3.3e24)."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    for p in small:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """The hash constants of one Engram layer (numpy, read-only)."""

    layer_id: int
    multipliers: np.ndarray  # int64 [N]: odd multipliers m_0..m_{N-1}
    primes: np.ndarray  # int64 [N-1, K]: table size of head j of order n at [n-2, j]
    offsets: np.ndarray  # int64 [Z]: first row of each head in the flat table (order-major)
    rows: int  # Σ primes: rows a hash can address
    table_rows: int  # rows of the table parameter (rows rounded up to ENGRAM_ROW_ALIGN)


@dataclasses.dataclass(frozen=True)
class HashPlan:
    vocab: int  # V' (bounds the multipliers)
    layers: dict[int, LayerPlan]


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


@functools.lru_cache(maxsize=64)
def hash_plan(cfg: ModelConfig) -> HashPlan:
    """Multipliers, primes and offsets of every Engram layer (computed once per config)."""
    n, heads, vocab = cfg.engram_max_ngram_size, cfg.engram_n_heads, cfg.engram_vocab
    half_bound = max(1, (np.iinfo(np.int64).max // vocab) // 2)
    seen: set[int] = set()
    layers = {}
    for layer_id in cfg.engram_layer_ids:
        rng = np.random.default_rng(cfg.engram_seed + LAYER_PRIME * layer_id)
        multipliers = rng.integers(0, half_bound, size=(n,), dtype=np.int64) * 2 + 1
        primes = np.zeros((n - 1, heads), np.int64)
        for order in range(n - 1):
            candidate = cfg.engram_vocab_size[order]
            for j in range(heads):
                while candidate in seen or not is_prime(candidate):
                    candidate += 1
                if candidate > MAX_TABLE_SIZE:
                    raise ValueError(
                        f"Engram layer {layer_id}: order {order + 2} head {j} needs table size {candidate} > 2^31-1 "
                        f"(ModelConfig.engram_vocab_size={cfg.engram_vocab_size}); row ids are int32"
                    )
                seen.add(candidate)
                primes[order, j] = candidate
                candidate += 1
        sizes = primes.reshape(-1)
        rows = int(sizes.sum())
        table_rows = -(-rows // ENGRAM_ROW_ALIGN) * ENGRAM_ROW_ALIGN
        if table_rows > MAX_TABLE_SIZE:
            raise ValueError(
                f"Engram layer {layer_id}: {rows} table rows (ModelConfig.engram_vocab_size={cfg.engram_vocab_size},"
                f" engram_n_heads={heads}) do not fit int32 row ids"
            )
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        layers[layer_id] = LayerPlan(
            layer_id, _frozen(multipliers), _frozen(primes), _frozen(offsets), rows, table_rows
        )
    return HashPlan(vocab=vocab, layers=layers)


def layer_plan(cfg: ModelConfig, layer_id: int) -> LayerPlan:
    plan = hash_plan(cfg)
    if layer_id not in plan.layers:
        raise ValueError(f"layer {layer_id} is not in ModelConfig.engram_layer_ids={cfg.engram_layer_ids}")
    return plan.layers[layer_id]


# ----------------------------------------------------------------- n-gram windows
def _windows(ids, previous, positions, pad_id: int, n: int, xp):
    """[B, T, N] with [..., k] = the id k steps back: ids preceded by `previous` [B, N-1] (oldest first),
    replaced by `pad_id` where positions[b, t] < k."""
    b, t = ids.shape
    if previous is None:
        previous = xp.full((b, n - 1), pad_id, ids.dtype)
    if previous.shape != (b, n - 1):
        raise ValueError(f"Engram context must have shape {(b, n - 1)} (B, N-1), got {previous.shape}")
    full = xp.concatenate([previous.astype(ids.dtype), ids], axis=1)  # [B, N-1+T]
    win = xp.stack([full[:, n - 1 - k : n - 1 - k + t] for k in range(n)], axis=-1)
    if positions is not None:
        win = xp.where(positions[..., None] >= xp.arange(n), win, pad_id)
    return win


def ngram_hash_ids_np(
    cfg: ModelConfig,
    layer_id: int,
    canonical_ids: np.ndarray,
    previous: np.ndarray | None = None,
    positions: np.ndarray | None = None,
    pad_id: int | None = None,
) -> np.ndarray:
    """Host reference / prefetch: flat row ids int32 [B, T, Z] in numpy int64 arithmetic (the demo's).

    Args:
      canonical_ids: int [B, T] canonical token ids.
      previous: int [B, N-1] canonical ids before the first token, oldest first (None: all pad).
      positions: int [B, T] (optional): ids k steps back are pad where positions < k (document starts).
      pad_id: canonical id of the pad token (default cfg.engram_pad_id, right for the identity map).
    """
    plan, n = layer_plan(cfg, layer_id), cfg.engram_max_ngram_size
    pad_id = cfg.engram_pad_id if pad_id is None else pad_id
    x = np.asarray(canonical_ids, np.int64)
    prev = None if previous is None else np.asarray(previous, np.int64)
    pos = None if positions is None else np.asarray(positions)
    win = _windows(x, prev, pos, pad_id, n, np)  # [B, T, N] int64
    out = []
    with np.errstate(over="ignore"):
        mix = win[..., 0] * plan.multipliers[0]
        for order in range(2, n + 1):
            mix = np.bitwise_xor(mix, win[..., order - 1] * plan.multipliers[order - 1])
            out += [mix % p for p in plan.primes[order - 2]]
    return (np.stack(out, axis=-1) + plan.offsets).astype(np.int32)


# ----------------------------------------------------------------- exact 64-bit arithmetic in uint32 limbs
def _u32(x: int) -> jax.Array:
    return jnp.asarray(x, jnp.uint32)


def _mul_wide(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(low, high) uint32 words of the 64-bit product of uint32 a and b (16-bit partial products)."""
    m16 = _u32(0xFFFF)
    a0, a1, b0, b1 = a & m16, a >> 16, b & m16, b >> 16
    p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
    mid = (p00 >> 16) + (p01 & m16) + (p10 & m16)  # < 3·2^16
    lo = (p00 & m16) | (mid << 16)
    hi = p11 + (p01 >> 16) + (p10 >> 16) + (mid >> 16)
    return lo, hi


def _mod_signed64(lo: jax.Array, hi: jax.Array, p: jax.Array, c64: jax.Array, chunk: int) -> jax.Array:
    """Floor mod (numpy int64 `%`) of the int64 with words (lo, hi) by p < 2^31; c64 = 2^64 mod p.

    Horner over `chunk`-bit digits of lo: r·2^chunk + digit < p·2^chunk <= 2^32 stays in uint32.
    """
    r = hi % p
    shift = 32
    while shift:
        step = min(chunk, shift)
        shift -= step
        digit = (lo >> shift) & _u32((1 << step) - 1)
        r = ((r << step) | digit) % p
    negative = hi >= _u32(2**31)  # the int64 is u - 2^64: subtract 2^64 mod p
    return jnp.where(negative, jnp.where(r >= c64, r - c64, r + p - c64), r)


def hash_windows(cfg: ModelConfig, layer_id: int, windows: jax.Array) -> jax.Array:
    """Flat row ids int32 [B, T, Z] of canonical n-gram windows int32 [B, T, N] (jittable, no x64)."""
    plan, n = layer_plan(cfg, layer_id), cfg.engram_max_ngram_size
    chex.assert_axis_dimension(windows, -1, n)
    m = plan.multipliers.astype(np.uint64)
    m_lo, m_hi = (m & 0xFFFFFFFF).astype(np.uint32), (m >> np.uint64(32)).astype(np.uint32)
    x = windows.astype(jnp.int32)
    x_lo = jax.lax.bitcast_convert_type(x, jnp.uint32)
    x_hi = jnp.where(x < 0, _u32(0xFFFFFFFF), _u32(0))  # sign extension to int64
    mixes_lo, mixes_hi = [], []
    for k in range(n):
        lo, carry = _mul_wide(x_lo[..., k], _u32(int(m_lo[k])))
        hi = carry + x_lo[..., k] * _u32(int(m_hi[k])) + x_hi[..., k] * _u32(int(m_lo[k]))  # mod 2^64
        if k:
            lo, hi = lo ^ mixes_lo[-1], hi ^ mixes_hi[-1]
        mixes_lo.append(lo)
        mixes_hi.append(hi)
    lo = jnp.stack(mixes_lo[1:], axis=-1)[..., None]  # [B, T, N-1, 1] orders 2..N
    hi = jnp.stack(mixes_hi[1:], axis=-1)[..., None]
    primes = plan.primes  # [N-1, K]
    c64 = np.asarray([[(1 << 64) % int(p) for p in row] for row in primes], np.uint32)
    chunk = 32 - (int(primes.max()) - 1).bit_length()
    r = _mod_signed64(lo, hi, jnp.asarray(primes, jnp.uint32), jnp.asarray(c64), chunk)  # [B, T, N-1, K]
    r = r.reshape(*r.shape[:-2], -1).astype(jnp.int32)  # [B, T, Z]
    return r + jnp.asarray(plan.offsets, jnp.int32)


def ngram_hash_ids(
    cfg: ModelConfig,
    layer_id: int,
    canonical_ids: jax.Array,
    previous: jax.Array | None = None,
    positions: jax.Array | None = None,
    pad_id: int | jax.Array | None = None,
) -> jax.Array:
    """Flat row ids int32 [B, T, Z], bit-exact with `ngram_hash_ids_np` (same arguments), jittable."""
    chex.assert_rank(canonical_ids, 2)
    pad_id = cfg.engram_pad_id if pad_id is None else pad_id
    ids = jnp.asarray(canonical_ids, jnp.int32)
    prev = None if previous is None else jnp.asarray(previous, jnp.int32)
    win = _windows(ids, prev, positions, pad_id, cfg.engram_max_ngram_size, jnp)
    return hash_windows(cfg, layer_id, win)


# ----------------------------------------------------------------- decode state
class EngramState(NamedTuple):
    """Decode state of one Engram layer."""

    context: jax.Array  # int32 [B, N-1]: the last N-1 raw token ids, oldest first (pad id at the start)
    conv: jax.Array  # float32 [B, (K-1)·N, R, D]: the last conv inputs u (zeros at the start)


def empty_engram_state(cfg: ModelConfig, batch: int) -> EngramState:
    """The state of one Engram layer before the first token (every layer has the same shapes)."""
    n = cfg.engram_max_ngram_size
    return EngramState(
        context=jnp.full((batch, n - 1), cfg.engram_pad_id, jnp.int32),
        conv=jnp.zeros((batch, cfg.engram_conv_context, num_streams(cfg), cfg.hidden_size), jnp.float32),
    )


def keep_last(buffer: jax.Array, count: jax.Array | None, length: int) -> jax.Array:
    """buffer[b, count[b] : count[b] + length] for buffer [B, length + T, ...] (the last `length` entries
    that precede the padding); count None means all T are real."""
    if count is None:
        return buffer[:, buffer.shape[1] - length :]
    count = jnp.asarray(count, jnp.int32)
    return jax.vmap(lambda row, c: jax.lax.dynamic_slice_in_dim(row, c, length, axis=0))(buffer, count)


def canonicalize(canonical: jax.Array, token_ids: jax.Array) -> jax.Array:
    """canonical[token_ids]; ids outside the map pass through unchanged (as negative ids do in the demo)."""
    vocab = canonical.shape[0]
    inside = (token_ids >= 0) & (token_ids < vocab)
    return jnp.where(inside, jnp.take(canonical, jnp.clip(token_ids, 0, vocab - 1), axis=0), token_ids)


def default_canonical_map(cfg: ModelConfig) -> np.ndarray:
    """Init of the CONSTANTS `canonical`: the identity when V' = vocab_size, else id mod V' (a placeholder:
    load `v4jax.data.canonical.canonical_ids_from_tokenizer` instead)."""
    return (np.arange(cfg.vocab_size) % cfg.engram_vocab).astype(np.int32)


# ----------------------------------------------------------------- module
class Engram(nn.Module):
    """Engram of decoder layer `layer_id` (see the module docstring).

    Params: `table` [table_rows, W] (ENGRAM_ROWS, None); `wv` [Z, W, D] + `bv` [D]; with the gate `wk`
    [Z, W, R, D] + `bk` [R, D], `key_norm`, `hidden_norm` [R, D]; with the short conv `conv_norm` [R, D] and
    `conv` [K, R, D] (zero init, so the conv starts as out = g). CONSTANTS: `canonical` int32 [vocab].

    Methods: `forward` (ids -> update, all steps), or the steps `hash_ids`, `gather_rows`, `__call__`.
    """

    cfg: ModelConfig
    layer_id: int

    def setup(self):
        c = self.cfg
        plan = layer_plan(c, self.layer_id)
        z, w, d, r = c.engram_num_hash_heads, c.engram_head_dim, c.hidden_size, num_streams(c)
        init = normal_init(c.initializer_range)
        if self.is_initializing() or self.has_variable("params", "table"):  # absent when kept off the device
            table_init = nn.with_logical_partitioning(init, (shd.ENGRAM_ROWS, None))
            self.table = self.param("table", table_init, (plan.table_rows, w), c.weight_dtype)
        self.wv = Projection(c, (z, w, d), (None, None, shd.EMBED), name="wv")
        zeros, ones = nn.initializers.zeros, nn.initializers.ones
        self.bv = self.param("bv", nn.with_logical_partitioning(zeros, (shd.NORM,)), (d,), c.weight_dtype)
        vec = (shd.STREAMS, shd.NORM)
        if c.engram_gate:
            self.wk = Projection(c, (z, w, r, d), (None, None, shd.STREAMS, shd.EMBED), name="wk")
            self.bk = self.param("bk", nn.with_logical_partitioning(zeros, vec), (r, d), c.weight_dtype)
            self.key_norm = self.param("key_norm", nn.with_logical_partitioning(ones, vec), (r, d), c.weight_dtype)
            self.hidden_norm = self.param(
                "hidden_norm", nn.with_logical_partitioning(ones, vec), (r, d), c.weight_dtype
            )
        if c.engram_kernel_size:
            self.conv_norm = self.param("conv_norm", nn.with_logical_partitioning(ones, vec), (r, d), c.weight_dtype)
            self.conv = self.param(
                "conv",
                nn.with_logical_partitioning(zeros, (None, shd.STREAMS, shd.NORM)),
                (c.engram_kernel_size, r, d),
                c.weight_dtype,
            )
        if self.is_initializing() or self.has_variable(CONSTANTS, "canonical"):
            self.canonical = self.variable(CONSTANTS, "canonical", lambda: jnp.asarray(default_canonical_map(c)))

    # ------------------------------------------------------------- retrieval
    def hash_ids(
        self, token_ids: jax.Array, context: jax.Array | None = None, positions: jax.Array | None = None
    ) -> jax.Array:
        """Row ids int32 [B, T, Z] of raw token ids [B, T]; `context` int32 [B, N-1] raw ids before them
        (None: the pad id), `positions` [B, T] optional (ids before position 0 read as pad)."""
        c = self.cfg
        chex.assert_rank(token_ids, 2)
        if not self.has_variable(CONSTANTS, "canonical"):
            raise ValueError(
                f"{'/'.join(self.path)}: Engram layer without its canonical-id map: pass the {CONSTANTS!r} "
                "collection with the params, e.g. apply({'params': ..., 'constants': ...}, ...)"
            )
        canonical = self.canonical.value
        chex.assert_shape(canonical, (c.vocab_size,))
        ids = jnp.asarray(token_ids, jnp.int32)
        if context is None:
            context = empty_engram_state(c, ids.shape[0]).context
        pad = canonical[c.engram_pad_id]
        return ngram_hash_ids(
            c, self.layer_id, canonicalize(canonical, ids), canonicalize(canonical, context), positions, pad
        )

    def gather_rows(self, ids: jax.Array) -> jax.Array:
        """table[ids]: ids int32 [B, T, Z] -> rows [B, T, Z, W] in the compute dtype."""
        chex.assert_axis_dimension(ids, -1, self.cfg.engram_num_hash_heads)
        if not self.has_variable("params", "table"):
            raise ValueError(
                f"{'/'.join(self.path)}: no Engram table in the params (a table kept off the device, e.g. in host "
                "memory): pass the gathered rows instead (`v4jax.engram_memory`)"
            )
        rows = jnp.take(self.table, ids, axis=0, mode="clip").astype(self.cfg.compute_dtype)
        return shd.constrain(rows, ROW_AXES)

    # ------------------------------------------------------------- fusion
    def __call__(
        self,
        streams: jax.Array,
        rows: jax.Array,
        conv_state: jax.Array | None = None,
        count: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Gated, convolved memory update of the streams.

        Args:
          streams: X [B, T, R, D], the hidden state of every residual stream (the gate's queries).
          rows: e [B, T, Z, W], the gathered table rows of these tokens (`gather_rows`).
          conv_state: float32 [B, (K-1)·N, R, D], the conv inputs before these tokens (None: zeros, a
            sequence start); ignored without the short conv.
          count: int [B] real tokens per row (the rest is padding; only the returned state depends on it).
          positions: [B, T] optional: conv taps reaching before position 0 are dropped (document starts).

        Returns:
          (update [B, T, R, D] in the compute dtype, to add to the streams; the new conv state).
        """
        c = self.cfg
        b, t, r, d = streams.shape
        chex.assert_shape(streams, (b, t, num_streams(c), c.hidden_size))
        chex.assert_shape(rows, (b, t, c.engram_num_hash_heads, c.engram_head_dim))
        f32 = jnp.float32
        value = self.wv("BTZW,ZWD->BTD", rows).astype(f32) + self.bv.astype(f32)  # [B, T, D]
        if c.engram_gate:
            key = self.wk("BTZW,ZWRD->BTRD", rows).astype(f32) + self.bk.astype(f32)  # [B, T, R, D]
            dot = jnp.sum(
                rms_norm(key, self.key_norm, c.rms_norm_eps) * rms_norm(streams, self.hidden_norm, c.rms_norm_eps),
                axis=-1,
            ) / np.sqrt(d)  # [B, T, R]
            alpha = jax.nn.sigmoid(jnp.sign(dot) * jnp.sqrt(jnp.maximum(jnp.abs(dot), SSQRT_FLOOR)))
            g = alpha[..., None] * value[:, :, None, :]  # [B, T, R, D]
        else:
            g = jnp.broadcast_to(value[:, :, None, :], (b, t, r, d))
        span = c.engram_conv_context
        if conv_state is None:
            conv_state = jnp.zeros((b, span, r, d), f32)
        chex.assert_shape(conv_state, (b, span, r, d))
        if c.engram_kernel_size:
            g, conv_state = self._short_conv(g, conv_state, count, positions)
        return shd.constrain(g.astype(c.compute_dtype), STREAM_AXES), conv_state

    def _short_conv(self, g, state, count, positions):
        """g + silu(depthwise causal conv of rms(g)·γc), and the new state; g float32 [B, T, R, D]."""
        c = self.cfg
        t, span = g.shape[1], c.engram_conv_context
        kernel_size, dilation = c.engram_kernel_size, c.engram_max_ngram_size
        u = rms_norm(g, self.conv_norm, c.rms_norm_eps)  # [B, T, R, D]
        buf = jnp.concatenate([state.astype(jnp.float32), u], axis=1)  # [B, span + T, R, D]
        w = self.conv.astype(jnp.float32)
        y = jnp.zeros_like(g)
        for j in range(kernel_size):
            lag = (kernel_size - 1 - j) * dilation
            tap = buf[:, span - lag : span - lag + t]
            if positions is not None and lag:
                tap = jnp.where((positions >= lag)[..., None, None], tap, 0.0)
            y = y + w[j] * tap
        return g + jax.nn.silu(y), keep_last(buf, count, span)

    # ------------------------------------------------------------- all steps
    def forward(
        self,
        streams: jax.Array,
        token_ids: jax.Array,
        state: EngramState | None = None,
        count: jax.Array | None = None,
        positions: jax.Array | None = None,
        rows: jax.Array | None = None,
    ) -> tuple[jax.Array, EngramState]:
        """hash_ids -> gather_rows -> __call__: (update [B, T, R, D], new state) for raw token_ids [B, T].

        Without `state` the tokens start a sequence; with one (`empty_engram_state` at the start) they are
        appended to it, count[b] of them real, and the new state covers the real ones only. `rows` [B,T,Z,W]
        are these tokens' table rows gathered ahead (a table outside the params); None gathers them here.
        """
        ids = jnp.asarray(token_ids, jnp.int32)
        context = None if state is None else state.context
        if rows is None:
            rows = self.gather_rows(self.hash_ids(ids, context, positions))
        update, conv = self(streams, rows, None if state is None else state.conv, count, positions)
        if context is None:
            context = empty_engram_state(self.cfg, ids.shape[0]).context
        new_context = keep_last(jnp.concatenate([context, ids], axis=1), count, context.shape[1])
        return update, EngramState(context=new_context, conv=conv)
