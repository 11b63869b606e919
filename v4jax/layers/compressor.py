"""DeepSeek-V4 KV compressors (HCA, CSA) and the lightning indexer over compressed entries.

Letters (style.md §4.4, plus the V4 letters introduced in `attention_v4`): B T D Q as usual; C = the width
of one compressed entry (`head_dim` for the attention's compressor, `index_head_dim` for the indexer's);
Y = compressed entries (one per complete window of m tokens); I, J = indexer heads and head dim;
U = entries selected per query (indexer top-k); P = rope dims (the trailing P channels of an entry).

Compressor (rate m, width C, `coff` = 2 with overlap (CSA, indexer) else 1 (HCA)):
    kv    = x·Wkv                                  'BTD,DC->BTC'     (C here spans coff·C)
    z     = x·Wgate                                'BTD,DC->BTC'
  only the first Y·m tokens are pooled (Y = ⌊T/m⌋); window i holds tokens [i·m, (i+1)·m):
    kv, z → [B, Y, m, coff·C];  z += ape            (ape [m, coff·C], row r for the r-th token of a window)
  HCA:  entry i pools its own window, m slots
  CSA:  entry i pools 2m slots: window i-1's low half [:C] then window i's high half [C:];
        for i = 0 the first m slots are (kv = 0, z = -inf), i.e. weight 0
    a     = softmax(z) over the slots, per channel; entry_i = Σ_slots a ⊙ kv          (float32)
    entry = RoPE(RMSNorm(entry) · γ) at position i·m (the window's first token), compress rope
Indexer (CSA layers; c^Q = the attention's normalised query latent):
    q^I   = RoPE(c^Q·Wq_b)                         'BTQ,QIJ->BTIJ'   (no per-head norm)
    w     = (x·W_w) · I^-1/2                       'BTD,DI->BTI'     (float32)
    k^I   = the overlapping compressor above at width J          [B, Y, J]
    s     = ReLU(q^I·k^I) · J^-1/2                 'BTIJ,BYJ->BTIY'  (float32)
    score = Σ_I w·s                                'BTIY,BTI->BTY'
    top-k: entries i ≥ ⌊(t+1)/m⌋ are -inf, U = min(index_topk, Y) indices, invalid picks -> -1

Visibility (HF `DeepseekV4{HCA,CSA}Compressor` / `DeepseekV4Indexer`, prefill without cache): the query at
position t sees entry i iff i < ⌊(t+1)/m⌋, i.e. iff its window ends at or before t. Entry positions are
counters (i·m), not taken from `positions`: positions must be 0..T-1, as in HF. The tail of T mod m tokens
forms no entry; those tokens are seen only through the sliding window.

Numerics: projections through `Projection` (compute dtype, float32 accumulation); pooling, softmax and
the RMSNorm in float32 (HF pools in the activation dtype; the official code in float32); entries are
returned in the compute dtype after a float32 rotation. The official code's FP8 simulation of the entries'
non-rope channels and the Hadamard + FP4 simulation of the indexer's q/k are not in HF and not done here.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from v4jax import sharding as shd
from v4jax.config import ModelConfig
from v4jax.layers import cache_ops
from v4jax.layers.linear import Projection, RMSNorm
from v4jax.layers.rope import apply_trailing_rope, rope_cos_sin, rope_frequencies, yarn_attention_factor


def v4_rope(cfg: ModelConfig, compressed: bool) -> tuple[np.ndarray, float]:
    """(inverse frequencies [P/2], cos/sin scale) of V4's two ropes (HF `rope_parameters` main / compress).

    main (sliding layers): default rope with `rope_theta`. compress (every rotation of a CSA/HCA layer):
    `compress_rope_theta` with `compress_rope_scaling` YaRN frequencies; HF sets the YaRN attention factor
    to 1 unless the config gives one.
    """
    if not compressed:
        return rope_frequencies(cfg.qk_rope_head_dim, cfg.rope_theta, None), 1.0
    y = cfg.compress_rope_scaling
    scale = 1.0 if y is None or y.attention_factor is None else yarn_attention_factor(y)
    return rope_frequencies(cfg.qk_rope_head_dim, cfg.compress_rope_theta, y), scale


class CompressorState(NamedTuple):
    """What a compressor keeps between calls (one cache row per sequence; `v4jax.layers.cache_ops`).

    entries  [B, Y, dim]    compute dtype  entry i (window [i·m, (i+1)·m)) once that window is complete
    kv, gate [B, R, width]  float32  projections (gate without `ape`) of the last R tokens, ring by position
                            mod R: the incomplete window's pending tokens and, with overlap (R = 2m), the
                            complete window before it, whose low half the next entry pools (HF's overlap
                            state). R = m without overlap. width = coff·dim.
    A ring (rather than HF's drained buffer) lets a caller roll the last token back by lowering the length:
    its slot is rewritten before anything reads it (MTP speculative decoding).
    """

    entries: jax.Array
    kv: jax.Array
    gate: jax.Array


def empty_compressor_state(
    cfg: ModelConfig, rate: int, dim: int, overlap: bool, batch: int, max_length: int
) -> CompressorState:
    """A compressor's state before any token, for sequences of up to `max_length` tokens."""
    ring, width = (2 if overlap else 1) * rate, (2 if overlap else 1) * dim
    return CompressorState(
        entries=jnp.zeros((batch, max_length // rate, dim), cfg.compute_dtype),
        kv=jnp.zeros((batch, ring, width), jnp.float32),
        gate=jnp.zeros((batch, ring, width), jnp.float32),
    )


class Compressor(nn.Module):
    """Pools every complete window of `rate` tokens into one normalised, roped entry of width `dim`."""

    cfg: ModelConfig
    rate: int
    dim: int
    overlap: bool

    def setup(self):
        c = self.cfg
        width = self.width
        self.ape = self.param(
            "ape", nn.with_logical_partitioning(nn.initializers.zeros, (None, shd.HEAD_DIM)), (self.rate, width),
            jnp.float32,
        )  # fmt: skip
        self.wkv = Projection(c, (c.hidden_size, width), (shd.EMBED, shd.HEAD_DIM))
        self.wgate = Projection(c, (c.hidden_size, width), (shd.EMBED, shd.HEAD_DIM))
        self.norm = RMSNorm(c, self.dim)

    @property
    def width(self) -> int:
        return (2 if self.overlap else 1) * self.dim

    def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(kv, gate without ape), each [B, T, width], of x [B, T, D]."""
        chex.assert_shape(x, (None, None, self.cfg.hidden_size))
        return self.wkv("BTD,DC->BTC", x), self.wgate("BTD,DC->BTC", x)

    def _pool(self, kv, gate, prev_kv, prev_gate, index) -> jax.Array:
        """Entries [B, K, dim] of K windows: kv/gate [B, K, m, width] (gate without ape), the previous
        windows' low halves prev_kv/prev_gate [B, K, m, dim] (overlap only; rows with index 0 are ignored),
        window indices index [B, K]."""
        b, k = index.shape
        m, dim = self.rate, self.dim
        gate = gate + self.ape
        if self.overlap:
            first = (index == 0)[:, :, None, None]
            prev_kv = jnp.where(first, 0.0, prev_kv)
            prev_gate = jnp.where(first, -jnp.inf, prev_gate + self.ape[:, :dim])
            kv = jnp.concatenate([prev_kv, kv[..., dim:]], axis=2)  # [B, K, 2m, C]
            gate = jnp.concatenate([prev_gate, gate[..., dim:]], axis=2)
        pooled = jnp.sum(jax.nn.softmax(gate, axis=2) * kv, axis=2)  # [B, K, C]
        cos, sin = rope_cos_sin(index * m, *v4_rope(self.cfg, compressed=True))
        entries = apply_trailing_rope(self.norm(pooled), cos, sin)
        chex.assert_shape(entries, (b, k, dim))
        return entries

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, D] (positions 0..T-1) -> entries [B, ⌊T/rate⌋, dim] in the compute dtype."""
        m, dim = self.rate, self.dim
        b, t, _ = x.shape
        y = t // m
        kv, gate = (p.astype(jnp.float32) for p in self.project(x[:, : y * m]))
        kv, gate = kv.reshape(b, y, m, self.width), gate.reshape(b, y, m, self.width)  # [B, Y, m, coff·C]
        # window i-1's low half, shifted by one window (window 0's is ignored)
        prev_kv = jnp.concatenate([jnp.zeros_like(kv[:, :1, :, :dim]), kv[:, :-1, :, :dim]], axis=1)
        prev_gate = jnp.concatenate([jnp.zeros_like(gate[:, :1, :, :dim]), gate[:, :-1, :, :dim]], axis=1)
        return self._pool(kv, gate, prev_kv, prev_gate, jnp.broadcast_to(jnp.arange(y), (b, y)))

    def extend(
        self, kv: jax.Array, gate: jax.Array, start: jax.Array, count: jax.Array, state: CompressorState
    ) -> CompressorState:
        """Append the first count[b] of T new tokens (positions start[b] + 0..T-1) to the state, given their
        projections kv, gate [B, T, width] (`project`; the decoding layout computes them fused with the
        attention's own).

        Every window completed by them is pooled into `entries` (at index ⌊p/m⌋) and the ring moves on:
        the same entries as `__call__` over the whole sequence.
        """
        m, dim = self.rate, self.dim
        b, t, _ = kv.shape
        chex.assert_shape([kv, gate], (b, t, self.width))
        chex.assert_shape([start, count], (b,))
        ring = state.kv.shape[1]
        kv, gate = kv.astype(jnp.float32), gate.astype(jnp.float32)
        pad = -(-t // m) * m - t
        first = start - start % m - (ring - m)  # ordered row 0: the incomplete window (and, overlap, the one before)
        length = ring + t + pad
        rows = jnp.arange(length)[None, :]  # ordered row r holds position first + r
        held = (start - first)[:, None]  # rows taken from the ring
        ring_slot = (first[:, None] + rows) % ring
        source = jnp.clip(jnp.where(rows < held, ring_slot, rows - held + ring), 0, length - 1)[..., None]

        def ordered(old, new):  # [B, R + T', width]: [ring ; new] gathered into position order
            joined = jnp.concatenate([old, jnp.pad(new, ((0, 0), (0, pad), (0, 0)))], axis=1)
            return jnp.take_along_axis(joined, source, axis=1)

        kv_o, gate_o = ordered(state.kv, kv), ordered(state.gate, gate)
        n = length // m
        windows_kv, windows_gate = kv_o.reshape(b, n, m, self.width), gate_o.reshape(b, n, m, self.width)
        index = first[:, None] // m + jnp.arange(n)[None, :]  # [B, n]
        prev_kv = prev_gate = None
        if self.overlap:  # row k pools row k-1's low half (row 0 only serves as row 1's previous window)
            prev_kv = jnp.concatenate([windows_kv[:, :1, :, :dim], windows_kv[:, :-1, :, :dim]], axis=1)
            prev_gate = jnp.concatenate([windows_gate[:, :1, :, :dim], windows_gate[:, :-1, :, :dim]], axis=1)
        pooled = self._pool(windows_kv, windows_gate, prev_kv, prev_gate, index)
        end = (start + count)[:, None]
        completed = ((index + 1) * m <= end) & ((index + 1) * m > start[:, None])  # [B, n] completed now
        return CompressorState(
            entries=cache_ops.write_at(state.entries, pooled, index, completed),
            kv=cache_ops.latest_ring(kv_o, first, start + count, ring),
            gate=cache_ops.latest_ring(gate_o, first, start + count, ring),
        )


class Indexer(nn.Module):
    """The lightning indexer's learned parts: its queries, head weights and compressed keys."""

    cfg: ModelConfig

    def setup(self):
        c = self.cfg
        i, j = c.index_n_heads, c.index_head_dim
        self.wq_b = Projection(c, (c.q_lora_rank, i, j), (shd.Q_LORA, shd.INDEX_HEADS, shd.HEAD_DIM))
        self.weights_proj = Projection(c, (c.hidden_size, i), (shd.EMBED, shd.INDEX_HEADS))
        self.compressor = Compressor(c, c.compress_rate_csa, j, overlap=True)

    def head_logits(self, x: jax.Array) -> jax.Array:
        """The head weights before scaling, x·W_w [B,T,I], of x [B,T,D]."""
        chex.assert_shape(x, (None, None, self.cfg.hidden_size))
        return self.weights_proj("BTD,DI->BTI", x)

    def queries(self, head_logits: jax.Array, q_latent: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """head_logits [B,T,I] (`head_logits`), q_latent [B,T,Q], positions [B,T] -> (q^I [B,T,I,J] rotated,
        w [B,T,I] float32)."""
        c = self.cfg
        b, t, _ = q_latent.shape
        chex.assert_shape(head_logits, (b, t, c.index_n_heads))
        chex.assert_shape(q_latent, (b, t, c.q_lora_rank))
        chex.assert_shape(positions, (b, t))
        cos, sin = rope_cos_sin(positions, *v4_rope(c, compressed=True))
        q = apply_trailing_rope(self.wq_b("BTQ,QIJ->BTIJ", q_latent), cos, sin)
        return q, head_logits.astype(jnp.float32) * c.index_n_heads**-0.5

    def __call__(
        self, x: jax.Array, q_latent: jax.Array, positions: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B,T,D], q_latent [B,T,Q], positions [B,T] (0..T-1) -> (q^I [B,T,I,J], w [B,T,I] f32, k^I [B,Y,J])."""
        return *self.queries(self.head_logits(x), q_latent, positions), self.compressor(x)


def top_k_entries(scores: jax.Array, positions: jax.Array, rate: int, k: int) -> jax.Array:
    """The top-k visible entries per query: scores [B,T,Y], positions [B,T] -> int32 [B,T,U], -1 = none.

    U = min(k, Y); entries i ≥ ⌊(t+1)/rate⌋ are masked to -inf first and any such pick becomes -1 (HF
    `DeepseekV4Indexer`). Ties go to the lower index (`lax.top_k`); torch's order among ties is unspecified.
    """
    threshold = ((positions + 1) // rate)[..., None]  # [B, T, 1]
    visible = jnp.arange(scores.shape[-1]) < threshold
    _, idx = jax.lax.top_k(jnp.where(visible, scores, -jnp.inf), min(k, scores.shape[-1]))
    return jnp.where(idx < threshold, idx, -1).astype(jnp.int32)
