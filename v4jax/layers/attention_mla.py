"""Multi-head Latent Attention (DeepSeek-V2/V3), with the naive and the absorbed formulation.

    c_q   = RMSNorm(x·Wq_a)                         'BTD,DQ->BTQ'
    q     = c_q·Wq_b                                'BTQ,QNH->BTNH'   (H here spans nope+rope: H+P)
    kv_a  = x·Wkv_a = [c_kv_raw ; k_rope_raw]       'BTD,DC->BTC'     (C here spans C+P)
    c_kv  = RMSNorm(c_kv_raw);  k_rope = RoPE(k_rope_raw), one rope key shared by all heads
  naive (training / prefill): expand the latent to per-head keys and values
    [k_nope ; v] = c_kv·Wkv_b                       'BSC,CNH->BSNH'
    s     = q_nope·k_nope + q_rope·k_rope           'BTNH,BSNH->BTNS' + 'BTNP,BSP->BTNS'
    o     = softmax(s·σ)·v                          'BTNS,BSNA->BTNA'
  absorbed (decoding): fold Wkv_b into the query and the output, attend in latent space (MQA, 1 KV head)
    q_lat = q_nope·Wk_b                             'BTNH,CNH->BTNC'
    s     = q_lat·c_kv + q_rope·k_rope              'BTNC,BSC->BTNS' + 'BTNP,BSP->BTNS'
    o     = (softmax(s·σ)·c_kv)·Wv_b                'BTNS,BSC->BTNC', 'BTNC,CNA->BTNA'
  out = o·Wo                                        'BTNA,NAD->BTD'
  sparse (V3.2 DSA, when index_n_heads > 0): the lightning indexer (dsa.py) picks U = index_topk keys per query
    keep  = top-U(Σ_I w·ReLU(q^I·k^I))              'BTIJ,BSJ->BTIS', 'BTIS,BTI->BTS'
    s     = s where keep ∧ causal, −inf elsewhere    (both forms; with index_topk ≥ S every visible key is kept)
  indexer training (cfg.indexer_training): per query, KL(Σ_N probs ‖ softmax(score)) over the attended keys
    (`dsa.indexer_kl`); 'dense_warmup' attends every visible key, 'sparse' the top-k. `attend` returns it.

Decoding (`extend`): the cache (`empty_mla_cache`) holds per token only c_kv [C] and k_rope [P] (and the
V3.2 indexer key [J]), position-indexed; new tokens are written at their positions and attend in the
absorbed form over the whole cache under the causal mask. In the inference parameter layout the absorbed
products read Wkv_b head-major (`with_head_major_wkv_b`: 'BTNH,NHC->BTNC', 'BTNC,NAC->BTNA'), which spares
the per-call transposition XLA makes for a per-head contraction of the stored [C, N, H+A] kernel.

σ = qk_head_dim^-1/2 (× YaRN mscale²). Softmax in float32. Queries are processed in chunks of
`q_chunk` tokens so the score tensor is [B, q_chunk, N, S], not [B, T, N, S]; the indexer scores and the
top-k are computed per chunk too ([B, q_chunk, I, S]).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn

from v4jax import sharding as shd
from v4jax.config import ModelConfig
from v4jax.layers import cache_ops
from v4jax.layers.dsa import Indexer, index_scores, indexer_kl, topk_mask
from v4jax.layers.linear import FUSED_INPUTS, Projection, RMSNorm, fused_projection, project
from v4jax.layers.rope import apply_rope, rope_angles

Q_CHUNK = 1024


HEAD_MAJOR_K, HEAD_MAJOR_V = "wkv_b_k_heads", "wkv_b_v_heads"  # inference-layout copies of Wkv_b, head-major


def with_head_major_wkv_b(attn_params: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
    """An MLA layer's params with Wkv_b's key and value parts added head-major, [N, H, C] and [N, A, C], for
    the absorbed products of decoding (part of the inference layout, `model.unstack_layers`)."""
    kernel = attn_params["wkv_b"]["kernel"]  # [C, N, H + A]
    h = cfg.qk_nope_head_dim
    return {
        **attn_params,
        HEAD_MAJOR_K: jnp.transpose(kernel[..., :h], (1, 2, 0)),
        HEAD_MAJOR_V: jnp.transpose(kernel[..., h:], (1, 2, 0)),
    }


class IndexSelection(NamedTuple):
    """How the DSA indexer shapes attention over a key sequence (see `latent_attention`)."""

    scores: Callable[[jax.Array, int], jax.Array]  # (start, size) -> float32 [B, size, S] indexer scores
    topk: int | None  # attend only the top-k keys per query; None: every visible key
    with_kl: bool  # also return the indexer's per-query KL loss


def causal_mask(q_positions: jax.Array, kv_positions: jax.Array) -> jax.Array:
    """bool [B, T, S]: query t may see key s iff kv_pos[s] <= q_pos[t]."""
    return kv_positions[:, None, :] <= q_positions[:, :, None]


def map_query_chunks(fn: Callable[[jax.Array, int], Any], t: int, q_chunk: int | None = None) -> Any:
    """`fn(start, size) -> pytree of [B, size, ...]` over chunks of the T queries, joined to [B, T, ...].

    Chunks have `q_chunk` (default `Q_CHUNK`) queries and run one after another (`lax.map`); a length that
    is not a multiple of the chunk falls back to one chunk.
    """
    chunk = min(Q_CHUNK if q_chunk is None else q_chunk, t)
    if t % chunk:
        chunk = t
    if chunk == t:
        return fn(0, t)
    outs = jax.lax.map(lambda start: fn(start, chunk), jnp.arange(0, t, chunk))  # [T/c, B, c, ...]
    return jax.tree.map(lambda o: jnp.moveaxis(o, 0, 1).reshape(o.shape[1], t, *o.shape[3:]), outs)


def latent_attention(
    score_fn,
    value_fn,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    selection: IndexSelection | None = None,
    q_chunk: int | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Masked softmax attention over query chunks -> (o [B, T, N, X], indexer KL float32 [B, T] or None).

    `score_fn(start, size) -> [B, size, N, S]` gives scaled logits for queries [start, start+size);
    `value_fn(probs [B, size, N, S], start) -> [B, size, N, X]` reduces the probabilities with the values;
    `selection` (DSA) restricts each query to the indexer's top-k keys on top of the causal mask and/or
    asks for the indexer's KL toward the attention actually computed.
    """

    def one_chunk(start, size):
        scores = score_fn(start, size).astype(jnp.float32)  # [B, c, N, S]
        qpos = jax.lax.dynamic_slice_in_dim(q_positions, start, size, axis=1)
        mask = causal_mask(qpos, kv_positions)  # [B, c, S]
        index = None if selection is None else selection.scores(start, size)
        if index is not None and selection.topk is not None:
            mask &= topk_mask(index, selection.topk)
        probs = jax.nn.softmax(jnp.where(mask[:, :, None, :], scores, -jnp.inf), axis=-1)
        kl = indexer_kl(index, probs.sum(2), mask) if selection is not None and selection.with_kl else None
        return value_fn(probs, start), kl

    return map_query_chunks(one_chunk, q_positions.shape[1], q_chunk)


def empty_mla_cache(cfg: ModelConfig, batch: int, max_length: int) -> dict[str, jax.Array]:
    """An MLA layer's decoding state before any token (see `MLA.extend`)."""
    c = cfg
    cache = {
        "c_kv": jnp.zeros((batch, max_length, c.kv_lora_rank), c.compute_dtype),
        "k_rope": jnp.zeros((batch, max_length, c.qk_rope_head_dim), c.compute_dtype),
    }
    if c.index_n_heads:
        cache["index_k"] = jnp.zeros((batch, max_length, c.index_head_dim), c.compute_dtype)
    return cache


def index_score_fn(q_idx: jax.Array, w_idx: jax.Array, q_positions: jax.Array, k_idx: jax.Array, kv_positions):
    """`(start, size) -> float32 [B, size, S]`: causal indexer scores of the query chunk [start, start+size).

    q_idx [B,T,I,J], w_idx [B,T,I] at q_positions [B,T]; keys k_idx [B,S,J] at kv_positions [B,S].
    """

    def scores(start, size):
        qs, ws, qp = (jax.lax.dynamic_slice_in_dim(a, start, size, axis=1) for a in (q_idx, w_idx, q_positions))
        return index_scores(qs, ws, k_idx, causal_mask(qp, kv_positions))

    return scores


def fused_inputs(cfg: ModelConfig) -> tuple[str, ...]:
    """The projections of the attention input x that the inference layout fuses into one kernel
    (`linear.fuse_projections`, param `linear.FUSED_INPUTS`), in order: the query's first projection and Wkv_a."""
    return ("wq" if cfg.q_lora_rank is None else "wq_a", "wkv_a")


class MLA(nn.Module):
    """MLA self-attention. `__call__` uses the naive form, `absorbed` the latent-space form.

    With `cfg.index_n_heads > 0` (V3.2) the submodule `indexer` selects `index_topk` keys per query and both
    forms attend only over those.
    """

    cfg: ModelConfig

    def setup(self):
        c = self.cfg
        d, n, q, kv = c.hidden_size, c.num_attention_heads, c.q_lora_rank, c.kv_lora_rank
        h, p, a = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        if q is None:
            self.wq = Projection(c, (d, n, h + p), (shd.EMBED, shd.HEADS, shd.HEAD_DIM))
        else:
            self.wq_a = Projection(c, (d, q), (shd.EMBED, shd.Q_LORA))
            self.q_norm = RMSNorm(c, q)
            self.wq_b = Projection(c, (q, n, h + p), (shd.Q_LORA, shd.HEADS, shd.HEAD_DIM))
        self.wkv_a = Projection(c, (d, kv + p), (shd.EMBED, shd.KV_LORA))
        self.kv_norm = RMSNorm(c, kv)
        self.wkv_b = Projection(c, (kv, n, h + a), (shd.KV_LORA, shd.HEADS, shd.HEAD_DIM))
        self.wo = Projection(c, (n, a, d), (shd.HEADS, shd.HEAD_DIM, shd.EMBED))
        if c.index_n_heads:
            self.indexer = Indexer(c)

    def queries(
        self, q_proj: jax.Array, cos: jax.Array, sin: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """(q_nope [B,T,N,H], q_rope [B,T,N,P] with rope applied, c_q [B,T,Q] or None without q_lora_rank)
        from the query projection of x: x·Wq_a [B,T,Q], or x·Wq [B,T,N,H+P] without q_lora_rank."""
        c = self.cfg
        if c.q_lora_rank is None:
            c_q, q = None, q_proj
        else:
            c_q = self.q_norm(q_proj)
            q = self.wq_b("BTQ,QNH->BTNH", c_q)
        q = shd.constrain(q, (shd.ACT_BATCH, shd.ACT_LENGTH, shd.ACT_HEADS, None))
        q_nope, q_rope = q[..., : c.qk_nope_head_dim], q[..., c.qk_nope_head_dim :]
        return q_nope, apply_rope(q_rope, cos, sin, c.rope_interleave), c_q

    def latents(self, kv_a: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The per-token state a cache holds, (c_kv [B,S,C] normalised, k_rope [B,S,P] rotated), from x·Wkv_a."""
        c = self.cfg
        c_kv = self.kv_norm(kv_a[..., : c.kv_lora_rank])
        k_rope = apply_rope(kv_a[..., c.kv_lora_rank :], cos, sin, c.rope_interleave)
        return c_kv, k_rope

    def selection(
        self, x: jax.Array, c_q: jax.Array | None, cos: jax.Array, sin: jax.Array, positions: jax.Array
    ) -> IndexSelection | None:
        """The DSA selection of self-attention over x [B,T,D] (see `IndexSelection`).

        None when the indexer plays no part: without one, or, outside indexer training, when index_topk ≥ S
        (then only its projections are traced, so `init` still creates its parameters; jit drops them).
        In indexer training its inputs are detached: its KL loss trains the indexer and nothing else.
        """
        c = self.cfg
        if not c.index_n_heads:
            return None
        training = c.indexer_training is not None
        if training:
            x, c_q = jax.lax.stop_gradient(x), jax.lax.stop_gradient(c_q)
        q_idx, w_idx = self.indexer.queries(x, c_q, cos, sin)
        score_fn = index_score_fn(q_idx, w_idx, positions, self.indexer.keys(x, cos, sin), positions)
        dense = c.indexer_training == "dense_warmup" or c.index_topk >= positions.shape[1]
        if dense and not training:
            return None
        return IndexSelection(score_fn, None if dense else c.index_topk, training)

    def _score_fn(self, eqn: str, q_main: jax.Array, k_main: jax.Array, q_rope: jax.Array, k_rope: jax.Array):
        """`(start, size) -> float32 [B, size, N, S]`: σ·(einsum(eqn, q_main, k_main) + q_rope·k_rope) per chunk."""

        def scores(start, size):
            qm = jax.lax.dynamic_slice_in_dim(q_main, start, size, axis=1)
            qr = jax.lax.dynamic_slice_in_dim(q_rope, start, size, axis=1)
            s = jnp.einsum(eqn, qm, k_main, preferred_element_type=jnp.float32)
            s += jnp.einsum("BTNP,BSP->BTNS", qr, k_rope, preferred_element_type=jnp.float32)
            return s * self.cfg.softmax_scale

        return scores

    def _projections(self, x: jax.Array, positions: jax.Array, fused: bool = False):
        """(cos, sin, q_nope, q_rope, c_q, c_kv, k_rope) of self-attention over x [B,T,D] at positions [B,T];
        `fused`: x's projections from the inference layout's one fused kernel (`fused_inputs`)."""
        c = self.cfg
        b, t, _ = x.shape
        chex.assert_shape(x, (b, t, c.hidden_size))
        chex.assert_shape(positions, (b, t))
        cos, sin = rope_angles(c, positions)
        if fused:
            q_proj, kv_a = fused_projection(self, FUSED_INPUTS, x, fused_inputs(c), c.compute_dtype)
        else:
            q_proj = self.wq("BTD,DNH->BTNH", x) if c.q_lora_rank is None else self.wq_a("BTD,DQ->BTQ", x)
            kv_a = self.wkv_a("BTD,DC->BTC", x)
        q_nope, q_rope, c_q = self.queries(q_proj, cos, sin)
        c_kv, k_rope = self.latents(kv_a, cos, sin)
        return cos, sin, q_nope, q_rope, c_q, c_kv, k_rope

    def _self_attention_inputs(self, x: jax.Array, positions: jax.Array):
        """(q_nope, q_rope, c_kv, k_rope, selection) of self-attention over x [B,T,D] at positions [B,T]."""
        cos, sin, q_nope, q_rope, c_q, c_kv, k_rope = self._projections(x, positions)
        return q_nope, q_rope, c_kv, k_rope, self.selection(x, c_q, cos, sin, positions)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """Naive MLA self-attention. x [B,T,D], positions [B,T] int -> [B,T,D]."""
        return self.attend(x, positions)[0]

    def attend(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """Naive MLA self-attention -> (out [B,T,D], the indexer's KL float32 [B,T] in indexer training, else
        None)."""
        c = self.cfg
        q_nope, q_rope, c_kv, k_rope, selection = self._self_attention_inputs(x, positions)
        kv = self.wkv_b("BSC,CNH->BSNH", c_kv)
        kv = shd.constrain(kv, (shd.ACT_BATCH, shd.ACT_KV_LENGTH, shd.ACT_HEADS, None))
        k_nope, v = kv[..., : c.qk_nope_head_dim], kv[..., c.qk_nope_head_dim :]
        dt = c.compute_dtype

        def values(probs, start):
            return jnp.einsum("BTNS,BSNA->BTNA", probs.astype(dt), v, preferred_element_type=jnp.float32).astype(dt)

        score_fn = self._score_fn("BTNH,BSNH->BTNS", q_nope, k_nope, q_rope, k_rope)
        o, kl = latent_attention(score_fn, values, positions, positions, selection)
        o = shd.constrain(o, (shd.ACT_BATCH, shd.ACT_LENGTH, shd.ACT_HEADS, None))
        out = self.wo("BTNA,NAD->BTD", o)
        chex.assert_shape(out, x.shape)
        return out, kl

    def absorbed(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """The same attention computed in latent space (the decode formulation). x [B,T,D] -> [B,T,D]."""
        q_nope, q_rope, c_kv, k_rope, selection = self._self_attention_inputs(x, positions)
        o = self.attend_latent(q_nope, q_rope, positions, c_kv, k_rope, positions, selection)
        out = self.wo("BTNA,NAD->BTD", o)
        chex.assert_shape(out, x.shape)
        return out

    def extend(
        self, x: jax.Array, positions: jax.Array, count: jax.Array, cache: dict[str, jax.Array]
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Absorbed attention from new tokens over the latent cache, after appending them.

        x [B,T,D] at positions [B,T] = start[b] + 0..T-1, of which the first count[b] are real (the rest,
        a ragged batch's padding, are not cached). The cache (`empty_mla_cache`) is position-indexed [B, S, .]:
        c_kv [B,S,C] and k_rope [B,S,P] (nothing expanded per head), and index_k [B,S,J] with the indexer.
        Returns (out [B,T,D], the cache). Needs the inference layout (x's projections fused, `fused_inputs`).
        """
        c = self.cfg
        b, t, _ = x.shape
        chex.assert_shape(count, (b,))
        s = cache["c_kv"].shape[1]
        cos, sin, q_nope, q_rope, c_q, c_kv, k_rope = self._projections(x, positions, fused=True)
        keep = cache_ops.valid_tokens(count, t)
        cache = {
            **cache,
            "c_kv": cache_ops.write_at(cache["c_kv"], c_kv, positions, keep),
            "k_rope": cache_ops.write_at(cache["k_rope"], k_rope, positions, keep),
        }
        kv_positions = jnp.broadcast_to(jnp.arange(s, dtype=positions.dtype), (b, s))
        selection = None
        if c.index_n_heads:
            cache["index_k"] = cache_ops.write_at(cache["index_k"], self.indexer.keys(x, cos, sin), positions, keep)
            if c.index_topk < s:
                q_idx, w_idx = self.indexer.queries(x, c_q, cos, sin)
                scores = index_score_fn(q_idx, w_idx, positions, cache["index_k"], kv_positions)
                selection = IndexSelection(scores, c.index_topk, False)
        o = self.attend_latent(q_nope, q_rope, positions, cache["c_kv"], cache["k_rope"], kv_positions, selection)
        out = self.wo("BTNA,NAD->BTD", o)
        chex.assert_shape(out, x.shape)
        return out, cache

    def attend_latent(
        self,
        q_nope: jax.Array,
        q_rope: jax.Array,
        q_positions: jax.Array,
        c_kv: jax.Array,
        k_rope: jax.Array,
        kv_positions: jax.Array,
        selection: IndexSelection | None = None,
    ) -> jax.Array:
        """Absorbed attention of queries over cached latents (only the selected keys when given).

        Returns o [B,T,N,A] (before Wo).
        """
        c = self.cfg
        h, dt = c.qk_nope_head_dim, c.compute_dtype

        def values(probs, start):
            return jnp.einsum("BTNS,BSC->BTNC", probs.astype(dt), c_kv, preferred_element_type=jnp.float32).astype(dt)

        if self.has_variable("params", HEAD_MAJOR_K):  # the inference layout (`with_head_major_wkv_b`)
            w_uk, w_uv = self.get_variable("params", HEAD_MAJOR_K), self.get_variable("params", HEAD_MAJOR_V)
            q_lat = project("BTNH,NHC->BTNC", q_nope, w_uk, dt)
        else:
            q_lat = self.wkv_b("BTNH,CNH->BTNC", q_nope, columns=(0, h))
        score_fn = self._score_fn("BTNC,BSC->BTNS", q_lat, c_kv, q_rope, k_rope)
        o_lat, _ = latent_attention(score_fn, values, q_positions, kv_positions, selection)
        if self.has_variable("params", HEAD_MAJOR_V):
            return project("BTNC,NAC->BTNA", o_lat, w_uv, dt)
        return self.wkv_b("BTNC,CNA->BTNA", o_lat, columns=(h, h + c.v_head_dim))
