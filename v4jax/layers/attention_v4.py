"""DeepSeek-V4 attention: shared-KV MQA with a sliding window, attention sinks, compressed KV (CSA / HCA).

Letters: style.md §4.4 (B T S D N P Q U I J) plus two new letters, Y and O. The table has no free letter
left for the grouped output projection, so C, H and A, whose MLA meanings do not occur in V4 (V4 has no
separate no-rope, value or latent dims), carry V4 meanings here:
    C  head_dim c: the width of a query head and of the single shared K=V vector (the role C plays in
       MLA's absorbed form, where one latent is both key and value); its trailing P channels carry rope
    Y  compressed KV entries (new), one per complete window of m tokens
    O  output groups `o_groups` (new); group o holds heads o·N/O .. (o+1)·N/O - 1
    H  per-group input of the grouped output projection, (N/O)·C: the outputs of a group's heads side by side
    A  per-group output rank `o_lora_rank`, contracted into D by wo_b (as A is by MLA's wo)
    U  compressed entries selected per query by the indexer (top-k), as for the DSA indexer

    c^Q   = RMSNorm(x·Wq_a)                        'BTD,DQ->BTQ'      (shared with the indexer)
    q     = RoPE(RMSNorm_u(c^Q·Wq_b))              'BTQ,QNC->BTNC'    per-head unweighted norm
    kv    = RoPE(RMSNorm(x·Wkv))                   'BTD,DC->BTC'      one head, used as key and value
    window:   s_w = q·kv · C^-1/2                  'BTNC,BSC->BTNS'   S = the W-token window (below)
    HCA:      s_y = q·entry · C^-1/2               'BTNC,BYC->BTNY'   all visible entries
    CSA:      s_u = q·entry[idx] · C^-1/2          'BTNC,BTUC->BTNU'  the indexer's top-k entries
              (all visible entries, as HCA, in the indexer's 'dense_warmup' training stage)
    p     = softmax over [window ; entries ; sink_N] in float32, sink column dropped
    o     = p_w·kv + p_y·entry (or p_u·entry[idx]) 'BTNS,BSC->BTNC' + 'BTNY,BYC->BTNC' / 'BTNU,BTUC->BTNC'
    o     = RoPE^-1(o)  (rotation by -t on the trailing P channels, at the query positions)
    o_g   = o·Wo_a   (o regrouped [O,B,T,H])       'OBTH,OHA->OBTA'
    out   = o_g·Wo_b                               'BTOA,OAD->BTD'  (o_g token-major again)

Entries, the compressors and the indexer are in `v4jax.layers.compressor`. The sink enters only the softmax
denominator: o = Σ e^{s}·v / (Σ e^{s} + e^{sink_n}); it is not multiplied by the softmax scale C^-1/2.

Visibility (query at position t):
    window   key s iff t - W < s ≤ t: W keys including the query itself
    entry i  iff i < ⌊(t+1)/m⌋: its window [i·m, (i+1)·m) has ended (HF `causal_threshold`)
    CSA      additionally only the indexer's top-k of those; HCA all of them
Ropes: sliding layers use the main rope (`rope_theta`, no YaRN); every rotation of a CSA/HCA layer (q,
window kv, entries at positions i·m, indexer q and keys, the inverse rotation of o) uses the compress rope
(`compress_rope_theta` with `compress_rope_scaling`, cos/sin not amplitude-scaled). `positions` must be
0..T-1 (entry positions are counters, as in HF's prefill).

Memory: queries are processed in chunks of `q_chunk` tokens (the sequence is padded to a multiple). A chunk
of c queries sees the c + W - 1 keys [start - W + 1, start + c) of the window and the entries, so the scores
are [B, c, N, c + W - 1 + Y] (HCA) or [B, c, N, c + W - 1 + U] (CSA), the indexer's [B, c, I, Y], and the
CSA gather [B, c, U, C]: O(chunk · (W + #entries)), never [B, T, N, T].

Parity target: transformers `DeepseekV4Attention` (eager, no cache). Differences from the official code
that HF also has and we follow: no FP8 simulation of the KV / entries and no Hadamard + FP4 simulation in
the indexer (the official model quantises those in its forward; HF does not, neither do we); indexer
scores in float32 (official: bf16). Numerics: softmax, the sink, all norms and rope rotations in float32,
projections in `cfg.dtype` with float32 accumulation. The indexer's parameters get no gradient from the
output (only its top-k indices are used), as in HF. In indexer training (`cfg.indexer_training`) `attend`
also returns the indexer's per-query KL toward the heads' summed attention on the entries it could pick
(`dsa.indexer_kl`: the selected entries, or every visible entry in 'dense_warmup'), with the indexer's
inputs detached.

Decoding (`extend`): new tokens at positions start[b] + 0..T-1 attend over the cached state (`empty_v4_cache`:
the window ring, the compressors' entries and pending / overlap buffers, the CSA indexer keys) and are
appended to it; the windows, entries and visibility rules above are the same, so chunked prefill and
token-by-token decoding reproduce the full forward (HF's `DeepseekV4{HCA,CSA}Cache` keep the same state).

Sharding: wq_b[Q, N_heads, C], attn_sink[N_heads]; the single K=V head and the entries are replicated over
heads; wo_a[O, H, A] / wo_b[O, A, D] use the logical names `o_groups` / `o_lora` (unsharded in every preset),
the indexer's heads `index_heads` (likewise), so `tensor` splits only N.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn

from v4jax import sharding as shd
from v4jax.config import LAYER_TYPES, ModelConfig
from v4jax.layers import cache_ops
from v4jax.layers.compressor import Compressor, Indexer, empty_compressor_state, top_k_entries, v4_rope
from v4jax.layers.dsa import index_scores, indexer_kl
from v4jax.layers.linear import FUSED_INPUTS, Projection, RMSNorm, fused_projection, rms_norm
from v4jax.layers.rope import apply_trailing_rope, rope_cos_sin

Q_CHUNK = 256
SLIDING, CSA, HCA = LAYER_TYPES
_FAR = 2**30  # key position of window padding: never inside any query's window


def sink_softmax(scores: jax.Array, sink: jax.Array) -> jax.Array:
    """Softmax of scores [B,T,N,K] with one extra logit sink [N] per head, whose column is dropped.

    float32; rows of all -inf give 0 (the finite sink keeps the denominator positive).
    """
    b, t, n, _ = scores.shape
    sink = jnp.broadcast_to(sink.astype(jnp.float32)[None, None, :, None], (b, t, n, 1))
    probs = jax.nn.softmax(jnp.concatenate([scores.astype(jnp.float32), sink], axis=-1), axis=-1)
    return probs[..., :-1]


def empty_v4_cache(cfg: ModelConfig, layer_type: str, batch: int, max_length: int) -> dict[str, Any]:
    """A V4 layer's decoding state before any token (see `AttentionV4.extend`)."""
    c = cfg
    cache = {"window": jnp.zeros((batch, c.sliding_window, c.head_dim), c.compute_dtype)}
    if layer_type == HCA:
        cache["compressor"] = empty_compressor_state(c, c.compress_rate_hca, c.head_dim, False, batch, max_length)
    if layer_type == CSA:
        cache["compressor"] = empty_compressor_state(c, c.compress_rate_csa, c.head_dim, True, batch, max_length)
        cache["indexer"] = empty_compressor_state(c, c.compress_rate_csa, c.index_head_dim, True, batch, max_length)
    return cache


def fused_inputs(layer_type: str) -> tuple[str, ...]:
    """The projections of the attention input x that the inference layout fuses into one kernel
    (`linear.fuse_projections`, param `linear.FUSED_INPUTS`), as paths under the attention module, in order."""
    members = ("wq_a", "wkv")
    if layer_type != SLIDING:
        members += ("compressor/wkv", "compressor/wgate")
    if layer_type == CSA:
        members += ("indexer/compressor/wkv", "indexer/compressor/wgate", "indexer/weights_proj")
    return members


class AttentionV4(nn.Module):
    """V4 self-attention of one layer type (sliding / CSA / HCA) over a full sequence."""

    cfg: ModelConfig
    layer_type: str
    q_chunk: int = Q_CHUNK

    def setup(self):
        c = self.cfg
        if self.layer_type not in LAYER_TYPES:
            raise ValueError(f"AttentionV4.layer_type={self.layer_type!r} is not one of {LAYER_TYPES}")
        d, n, q, hd, g = c.hidden_size, c.num_attention_heads, c.q_lora_rank, c.head_dim, c.o_groups
        self.wq_a = Projection(c, (d, q), (shd.EMBED, shd.Q_LORA))
        self.q_norm = RMSNorm(c, q)
        self.wq_b = Projection(c, (q, n, hd), (shd.Q_LORA, shd.HEADS, shd.HEAD_DIM))
        self.wkv = Projection(c, (d, hd), (shd.EMBED, shd.HEAD_DIM))
        self.kv_norm = RMSNorm(c, hd)
        self.wo_a = Projection(c, (g, n * hd // g, c.o_lora_rank), (shd.O_GROUPS, shd.HEAD_DIM, shd.O_LORA))
        self.wo_b = Projection(c, (g, c.o_lora_rank, d), (shd.O_GROUPS, shd.O_LORA, shd.EMBED))
        self.attn_sink = self.param(
            "attn_sink", nn.with_logical_partitioning(nn.initializers.zeros, (shd.HEADS,)), (n,), jnp.float32
        )
        if self.layer_type == CSA:
            self.compressor = Compressor(c, c.compress_rate_csa, hd, overlap=True)
            self.indexer = Indexer(c)
        elif self.layer_type == HCA:
            self.compressor = Compressor(c, c.compress_rate_hca, hd, overlap=False)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """x [B,T,D], positions [B,T] (0..T-1) -> [B,T,D]."""
        return self.attend(x, positions)[0]

    @property
    def rate(self) -> int:
        return self.cfg.compress_rate_hca if self.layer_type == HCA else self.cfg.compress_rate_csa

    def _inputs(self, q_a: jax.Array, kv_a: jax.Array, positions: jax.Array):
        """(cos, sin, c^Q [B,T,Q], q [B,T,N,C], kv [B,T,C]) from the projections x·Wq_a [B,T,Q] and x·Wkv [B,T,C]
        of the attention input, at positions [B,T]."""
        c = self.cfg
        b, t = positions.shape
        chex.assert_shape(q_a, (b, t, c.q_lora_rank))
        chex.assert_shape(kv_a, (b, t, c.head_dim))
        cos, sin = rope_cos_sin(positions, *v4_rope(c, compressed=self.layer_type != SLIDING))
        q_latent = self.q_norm(q_a)
        q = self.wq_b("BTQ,QNC->BTNC", q_latent)
        q = apply_trailing_rope(rms_norm(q, None, c.rms_norm_eps).astype(c.compute_dtype), cos, sin)
        q = shd.constrain(q, (shd.ACT_BATCH, shd.ACT_LENGTH, shd.ACT_HEADS, None))
        kv = apply_trailing_rope(self.kv_norm(kv_a), cos, sin)
        kv = shd.constrain(kv, (shd.ACT_BATCH, shd.ACT_KV_LENGTH, None))
        return cos, sin, q_latent, q, kv

    def attend(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """x [B,T,D], positions [B,T] (0..T-1) -> (out [B,T,D], the indexer's KL float32 [B,T] on CSA layers in
        indexer training, else None)."""
        c = self.cfg
        w = c.sliding_window
        chex.assert_shape(x, (*positions.shape, c.hidden_size))
        q_a, kv_a = self.wq_a("BTD,DQ->BTQ", x), self.wkv("BTD,DC->BTC", x)
        cos, sin, q_latent, q, kv = self._inputs(q_a, kv_a, positions)
        keys = jnp.pad(kv, ((0, 0), (w - 1, 0), (0, 0)))  # [B, W-1+T, C]; key row r is at position r-(W-1)
        key_pos = jnp.pad(positions, ((0, 0), (w - 1, 0)), constant_values=-_FAR)
        entries = index = None
        if self.layer_type != SLIDING:
            entries = self.compressor(x)  # [B, Y, C]
        if self.layer_type == CSA:
            if c.indexer_training is not None:  # the indexer's inputs are detached: only its KL trains it
                x, q_latent = jax.lax.stop_gradient(x), jax.lax.stop_gradient(q_latent)
            queries = self.indexer.queries(self.indexer.head_logits(x), q_latent, positions)
            index = (*queries, self.indexer.compressor(x))
        o, kl = self._attend(q, positions, keys, key_pos, entries, index)
        return self._output(o, cos, sin), kl

    def extend(
        self, x: jax.Array, positions: jax.Array, count: jax.Array, cache: dict[str, Any]
    ) -> tuple[jax.Array, dict[str, Any]]:
        """Attend from new tokens over the cached state and append them: chunked prefill and decoding.

        x [B,T,D] at positions [B,T] = start[b] + 0..T-1, of which the first count[b] are real (the rest
        are a ragged batch's padding: their outputs are meaningless and they are not cached). The cache
        (`empty_v4_cache`) holds
          window      [B, W, C]  the last W tokens' K=V vectors, ring by position mod W
          compressor  `CompressorState` of the entries (HCA, CSA);  indexer  the same for the indexer keys (CSA)
        Returns (out [B,T,D], the cache after start[b] + count[b] tokens).
        Needs the inference layout: every projection of x in one fused kernel (`fused_inputs`).
        """
        w = self.cfg.sliding_window
        b, t, _ = x.shape
        start = positions[:, 0]
        chex.assert_shape(count, (b,))
        members = fused_inputs(self.layer_type)
        proj = dict(zip(members, fused_projection(self, FUSED_INPUTS, x, members, self.cfg.compute_dtype), strict=True))
        cos, sin, q_latent, q, kv = self._inputs(proj["wq_a"], proj["wkv"], positions)
        keys = jnp.concatenate([cache_ops.ring_in_order(cache["window"], start), kv.astype(cache["window"].dtype)], 1)
        key_pos = start[:, None] - w + jnp.arange(w + t)[None, :]  # [B, W+T]
        end = start + count
        new_cache = {"window": cache_ops.latest_ring(keys, start - w, end, w)}
        key_pos = jnp.where(key_pos < 0, -_FAR, key_pos)
        entries = index = None
        if self.layer_type != SLIDING:
            kv_gate = proj["compressor/wkv"], proj["compressor/wgate"]
            new_cache["compressor"] = self.compressor.extend(*kv_gate, start, count, cache["compressor"])
            entries = new_cache["compressor"].entries
        if self.layer_type == CSA:
            kv_gate = proj["indexer/compressor/wkv"], proj["indexer/compressor/wgate"]
            new_cache["indexer"] = self.indexer.compressor.extend(*kv_gate, start, count, cache["indexer"])
            queries = self.indexer.queries(proj["indexer/weights_proj"], q_latent, positions)
            index = (*queries, new_cache["indexer"].entries)
        o, _ = self._attend(q, positions, keys[:, 1:], key_pos[:, 1:], entries, index)
        return self._output(o, cos, sin), new_cache

    def _attend(self, q, q_positions, keys, key_positions, entries, index):
        """Sink attention of queries q [B,T,N,C] at q_positions [B,T] over their windows and the entries.

        keys [B, W-1+T, C] at key_positions [B, W-1+T]: query t's window lies in rows t .. t+W-1 (the W-1
        rows before the first query, then one row per query). entries [B,Y,C] or None (sliding layers);
        index: (q^I [B,T,I,J], w [B,T,I], k^I [B,Y,J]) on CSA layers. Returns (o [B,T,N,C] float32, KL).
        """
        c = self.cfg
        b, t, n, hd = q.shape
        w = c.sliding_window
        chex.assert_shape(keys, (b, w - 1 + t, hd))
        chunk = min(self.q_chunk, t)
        padded = -(-t // chunk) * chunk
        pad_t = ((0, 0), (0, padded - t))
        q_pos = jnp.pad(q_positions, pad_t, mode="edge")
        q = jnp.pad(q, pad_t + ((0, 0), (0, 0)))
        keys = jnp.pad(keys, pad_t + ((0, 0),))
        key_positions = jnp.pad(key_positions, pad_t, constant_values=_FAR)
        training = self.layer_type == CSA and c.indexer_training is not None
        dense_entries = self.layer_type == HCA or c.indexer_training == "dense_warmup"
        if index is not None:
            iq, iw, ikeys = index
            iq = jnp.pad(iq, pad_t + ((0, 0), (0, 0)))
            iw = jnp.pad(iw, pad_t + ((0, 0),))
        scale = hd**-0.5
        dt = c.compute_dtype
        sink = self.attn_sink
        rate = self.rate

        def one_chunk(start):
            qc = jax.lax.dynamic_slice_in_dim(q, start, chunk, axis=1)  # [B, c, N, C]
            qp = jax.lax.dynamic_slice_in_dim(q_pos, start, chunk, axis=1)[:, :, None]  # [B, c, 1]
            kc = jax.lax.dynamic_slice_in_dim(keys, start, chunk + w - 1, axis=1)  # [B, c+W-1, C]
            kp = jax.lax.dynamic_slice_in_dim(key_positions, start, chunk + w - 1, axis=1)[:, None, :]
            s = jnp.einsum("BTNC,BSC->BTNS", qc, kc, preferred_element_type=jnp.float32) * scale
            s = jnp.where(((kp <= qp) & (kp > qp - w))[:, :, None, :], s, -jnp.inf)
            if entries is None or entries.shape[1] == 0:
                p = sink_softmax(s, sink).astype(dt)
                o = jnp.einsum("BTNS,BSC->BTNC", p, kc, preferred_element_type=jnp.float32)
                return o, (jnp.zeros(qp.shape[:2], jnp.float32) if training else None)
            if index is not None:
                iqc = jax.lax.dynamic_slice_in_dim(iq, start, chunk, axis=1)
                iwc = jax.lax.dynamic_slice_in_dim(iw, start, chunk, axis=1)
                scores = index_scores(iqc, iwc, ikeys)  # [B, c, Y]
            if dense_entries:
                values = entries
                s_e = jnp.einsum("BTNC,BYC->BTNY", qc, entries, preferred_element_type=jnp.float32) * scale
                visible = jnp.arange(entries.shape[1]) < (qp + 1) // rate  # [B, c, Y]
                e_eqn = "BTNY,BYC->BTNC"
            else:
                idx = top_k_entries(scores, qp[..., 0], rate, c.index_topk)
                values = jax.vmap(lambda e, i: e[i])(entries, jnp.maximum(idx, 0))  # [B, c, U, C]
                s_e = jnp.einsum("BTNC,BTUC->BTNU", qc, values, preferred_element_type=jnp.float32) * scale
                visible = idx >= 0  # [B, c, U]
                e_eqn = "BTNU,BTUC->BTNC"
                scores = jnp.take_along_axis(scores, jnp.maximum(idx, 0), axis=-1)  # [B, c, U]
            s_e = jnp.where(visible[:, :, None, :], s_e, -jnp.inf)
            p = sink_softmax(jnp.concatenate([s, s_e], axis=-1), sink)
            p_w, p_e = p[..., : s.shape[-1]].astype(dt), p[..., s.shape[-1] :]
            o = jnp.einsum("BTNS,BSC->BTNC", p_w, kc, preferred_element_type=jnp.float32)
            o += jnp.einsum(e_eqn, p_e.astype(dt), values, preferred_element_type=jnp.float32)
            return o, (indexer_kl(scores, p_e.sum(2), visible) if training else None)

        if chunk == padded:
            o, kl = one_chunk(0)
        else:
            outs = jax.lax.map(one_chunk, jnp.arange(0, padded, chunk))  # [T'/c, B, c, ...]
            o, kl = jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1).reshape(b, padded, *a.shape[3:]), outs)
        return o[:, :t], (None if kl is None else kl[:, :t])

    def _output(self, o: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """The inverse rope at the query positions and the grouped output projection: o [B,T,N,C] -> [B,T,D]."""
        c = self.cfg
        b, t, n, hd = o.shape
        o = apply_trailing_rope(o.astype(c.compute_dtype), cos, -sin)
        o = shd.constrain(o, (shd.ACT_BATCH, shd.ACT_LENGTH, shd.ACT_HEADS, None))
        # group-major for the grouped projection: XLA:CPU cannot run 'BTOH,OHA->BTOA' as a bf16 dot with
        # float32 accumulation (DotThunk), 'OBTH,OHA->OBTA' it can
        o = jnp.moveaxis(o.reshape(b, t, c.o_groups, n * hd // c.o_groups), 2, 0)  # [O, B, T, H]
        # back to token-major, so that Wo_b contracts (O, A) as one axis (`linear.merged_contraction`)
        out = self.wo_b("BTOA,OAD->BTD", jnp.moveaxis(self.wo_a("OBTH,OHA->OBTA", o), 0, 2))
        chex.assert_shape(out, (b, t, c.hidden_size))
        return out
