"""DeepSeekMoE: a group-limited, bias-corrected top-K router over E routed SwiGLU experts plus shared experts.

    logits = 'BTD,DE->BTE'(x, Wg)                               float32
    s      = sigmoid(logits) | softmax_E(logits) | sqrt(softplus(logits))     affinities [B, T, E]
    c      = s + b                                  b: selection-only bias (HF e_score_correction_bias)
    group  = Σ top-2 of c within each of G groups               [B, T, G] (only when n_group > 1)
    c      = c with all but the top `topk_group` groups set to -inf
    idx    = top_K(c)                                           [B, T, K]
    g      = s[idx] / (Σ_K s[idx] + 1e-20) · routed_scaling_factor     (normalised only if norm_topk_prob)
    y      = Σ_K g · W2_e(silu(W1_e x) ⊙ W3_e x)  (see moe_dispatch)  +  MLP_shared(x)

With `cfg.swiglu_limit` L (V4) every SwiGLU, routed and shared, clamps W1_e x ≤ L and W3_e x ∈ [−L, L].

Hash routing (V4, `MoE(hash_routed=True)` for the first `num_hash_layers` layers; HF `DeepseekV4HashRouter`):
    idx    = tid2eid[token_ids]                                 [B, T, K], no bias and no learned selection
    g      = as above, from the learned gate's s at idx
The frozen table `tid2eid` int32 [vocab, K] is the variable `gate/tid2eid` of the CONSTANTS collection:
initialised with K distinct uniform random experts per token from the 'params' rng, saved with the
checkpoint, never in 'params' (so it gets no gradient and no optimizer update). A row may repeat an expert
(HF initialises the table to zeros); as in HF each occurrence counts once in Σ_K s[idx] and in the output.

Balance statistics (architecture.md §2.4), per sequence b over its T tokens:
    f_i = E / (K·T) · #{(t, k): idx[b, t, k] = i},   P_i = mean_t s[b, t, i] / Σ_j s[b, t, j]
    balance_loss = mean_b Σ_i f_i P_i     (without the α weight; the gradient flows through P only)
Hash layers report balance_loss 0: their selection is not learned (HF takes router logits for its
auxiliary loss from the learned `DeepseekV4TopKRouter` layers only).
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
from v4jax.layers import moe_dispatch
from v4jax.layers.linear import by_rows, normal_init
from v4jax.layers.mlp import MLP

CONSTANTS = "constants"  # non-trainable variables that are part of a checkpoint (the hash table tid2eid)


class RouterOutput(NamedTuple):
    indices: jax.Array  # [B, T, K] int32 chosen experts, in descending biased score
    weights: jax.Array  # [B, T, K] float32 gating weights g
    scores: jax.Array  # [B, T, E] float32 affinities s (before the bias)
    expert_load: jax.Array  # [E] float32 number of (token, slot) assignments per expert in this batch


# ----------------------------------------------------------------- pure routing helpers
def affinity(logits: jax.Array, scoring_func: str) -> jax.Array:
    """Affinities s from float32 router logits [..., E]: 'sigmoid' (V3), 'softmax', 'sqrtsoftplus' (V4)."""
    if scoring_func == "sigmoid":
        return jax.nn.sigmoid(logits)
    if scoring_func == "softmax":
        return jax.nn.softmax(logits, axis=-1)
    if scoring_func == "sqrtsoftplus":
        return jnp.sqrt(jax.nn.softplus(logits))
    raise ValueError(f"scoring_func={scoring_func!r} is not one of ('sigmoid', 'softmax', 'sqrtsoftplus')")


def select_experts(choice: jax.Array, num_experts_per_tok: int, n_group: int, topk_group: int) -> jax.Array:
    """Top-K expert ids [..., K] of the biased scores `choice` [..., E], group-limited when n_group > 1.

    A group's score is the sum of its two largest biased scores; experts outside the `topk_group`
    best groups are masked to -inf before the top-K.
    """
    if n_group > 1:
        e = choice.shape[-1]
        grouped = choice.reshape(*choice.shape[:-1], n_group, e // n_group)  # [..., G, E/G]
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [..., G]
        keep = jax.lax.top_k(group_scores, topk_group)[1]  # [..., topk_group]
        group_mask = jax.nn.one_hot(keep, n_group, dtype=jnp.bool_).any(-2)  # [..., G]
        choice = jnp.where(group_mask[..., None], grouped, -jnp.inf).reshape(choice.shape)
    return jax.lax.top_k(choice, num_experts_per_tok)[1].astype(jnp.int32)


def gating_weights(scores: jax.Array, indices: jax.Array, cfg: ModelConfig) -> jax.Array:
    """g = s[idx], normalised to sum 1 (+1e-20) if norm_topk_prob, times routed_scaling_factor: [..., K]."""
    weights = jnp.take_along_axis(scores, indices, axis=-1)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * cfg.routed_scaling_factor


def random_hash_table(key: jax.Array, vocab_size: int, num_experts: int, num_experts_per_tok: int) -> jax.Array:
    """int32 [vocab, K]: for every token K distinct experts, uniformly random (the init of tid2eid)."""
    noise = jax.random.uniform(key, (vocab_size, num_experts))
    return jax.lax.top_k(noise, num_experts_per_tok)[1].astype(jnp.int32)


def check_hash_table(tid2eid: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """A checkpoint's `tid2eid` (int64 [vocab, K] in DeepSeek's files) as the int32 CONSTANTS value, after
    checking its shape and that every entry is an expert id in [0, E). Repeated ids in a row are allowed."""
    tid2eid = np.asarray(tid2eid)
    expected = (cfg.vocab_size, cfg.num_experts_per_tok)
    if tid2eid.shape != expected or not np.issubdtype(tid2eid.dtype, np.integer):
        raise ValueError(f"tid2eid must be an integer array of shape {expected}, got {tid2eid.dtype} {tid2eid.shape}")
    bad = (tid2eid < 0) | (tid2eid >= cfg.n_routed_experts)
    if bad.any():
        token = int(np.argwhere(bad)[0, 0])
        raise ValueError(
            f"tid2eid[{token}] = {tid2eid[token].tolist()} holds an expert id outside [0, {cfg.n_routed_experts})"
        )
    return tid2eid.astype(np.int32)


def merge_duplicate_experts(indices: jax.Array, weights: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """The same routed output with distinct experts per token: indices/weights [..., K] -> [..., K].

    Σ_k w_k FFN_{idx_k} is unchanged when the first occurrence of an id carries the summed weight of all
    its occurrences and every later occurrence is re-pointed, with weight 0, to the lowest expert the token
    does not use (there are at least as many unused experts as repeats). Dispatch may then assume that a
    token never picks an expert twice (the dropless capacity X = T relies on it).
    """
    k = indices.shape[-1]
    same = indices[..., :, None] == indices[..., None, :]  # [..., K, K]
    repeat = jnp.tril(same, -1).any(-1)  # [..., K] an earlier slot holds the same id
    summed = jnp.einsum("...kj,...j->...k", same.astype(weights.dtype), weights)
    used = jax.nn.one_hot(indices, num_experts, dtype=jnp.bool_).any(-2)  # [..., E]
    ids = jnp.arange(num_experts, dtype=jnp.int32)
    unused = jax.lax.top_k(jnp.where(used, -num_experts, -ids), k)[1].astype(indices.dtype)  # lowest unused first
    nth_repeat = jnp.maximum(jnp.cumsum(repeat, axis=-1) - 1, 0)
    indices = jnp.where(repeat, jnp.take_along_axis(unused, nth_repeat, axis=-1), indices)
    return indices, jnp.where(repeat, jnp.zeros_like(weights), summed)


def expert_counts(indices: jax.Array, num_experts: int) -> jax.Array:
    """Assignments per sequence and expert: indices [B, T, K] -> float32 [B, E]."""
    b = indices.shape[0]
    rows = jnp.broadcast_to(jnp.arange(b)[:, None, None], indices.shape)
    return jnp.zeros((b, num_experts), jnp.float32).at[rows, indices].add(1.0)


def sequence_balance_loss(scores: jax.Array, counts: jax.Array, num_experts_per_tok: int) -> jax.Array:
    """V3 sequence-wise balance loss mean_b Σ_i f_i P_i (no α): scores [B, T, E], counts [B, E] -> []."""
    _, t, e = scores.shape
    f = counts * (e / (num_experts_per_tok * t))  # [B, E]
    p = jnp.mean(scores / scores.sum(-1, keepdims=True), axis=1)  # [B, E]
    return jnp.mean(jnp.sum(f * p, axis=-1))


# ----------------------------------------------------------------- modules
class Router(nn.Module):
    """Gate of DeepSeekMoE: param `kernel` [D, E], and either the float32 selection-only param `bias` [E]
    (learned top-K) or, when `hash_routed`, the int32 table CONSTANTS `tid2eid` [vocab, K]."""

    cfg: ModelConfig
    hash_routed: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, token_ids: jax.Array | None = None) -> RouterOutput:
        """x [B, T, D]; token_ids int [B, T] is required when hash-routed and ignored otherwise."""
        c = self.cfg
        b, t, d = x.shape
        e = c.n_routed_experts
        chex.assert_axis_dimension(x, 2, c.hidden_size)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(normal_init(c.initializer_range), (shd.EMBED, shd.EXPERTS)),
            (d, e),
            c.weight_dtype,
        )
        f32, highest = jnp.float32, jax.lax.Precision.HIGHEST
        kernel = kernel.astype(f32)
        logits = by_rows(lambda rows: jnp.einsum("BTD,DE->BTE", rows, kernel, precision=highest), x.astype(f32), 2)
        logits = shd.constrain(logits, (shd.ACT_BATCH, shd.ACT_LENGTH, shd.ACT_EXPERTS))
        scores = affinity(logits, c.scoring_func)
        if self.hash_routed:
            indices, valid = self._hash_indices(token_ids, (b, t))
            # Out-of-table ids under jit (not checkable there) poison their tokens' outputs with NaN.
            weights = jnp.where(valid[..., None], gating_weights(scores, indices, c), jnp.nan)
        else:
            bias_init = nn.with_logical_partitioning(nn.initializers.zeros, (shd.EXPERTS,))
            bias = self.param("bias", bias_init, (e,), jnp.float32)
            indices = select_experts(scores + bias, c.num_experts_per_tok, c.n_group, c.topk_group)
            weights = gating_weights(scores, indices, c)
        expert_load = expert_counts(indices, e).sum(0)
        chex.assert_shape([indices, weights], (b, t, c.num_experts_per_tok))
        return RouterOutput(indices=indices, weights=weights, scores=scores, expert_load=expert_load)

    def _hash_indices(self, token_ids: jax.Array | None, shape: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
        """(tid2eid[token_ids] int32 [B, T, K], bool [B, T] whether each id lies inside the table)."""
        c = self.cfg
        where = "/".join(self.path)
        if token_ids is None:
            raise ValueError(f"{where}: a hash-routed MoE layer needs token_ids [B, T] (got None)")
        if token_ids.shape != shape or not jnp.issubdtype(token_ids.dtype, jnp.integer):
            raise ValueError(
                f"{where}: token_ids must be integers of shape {shape}, got {token_ids.dtype} {token_ids.shape}"
            )
        if not self.is_initializing() and not self.has_variable(CONSTANTS, "tid2eid"):
            raise ValueError(
                f"{where}: hash-routed layer without its table: pass the {CONSTANTS!r} collection with the "
                "params, e.g. apply({'params': ..., 'constants': ...}, ...)"
            )
        table = self.variable(
            CONSTANTS,
            "tid2eid",
            lambda: random_hash_table(self.make_rng("params"), c.vocab_size, c.n_routed_experts, c.num_experts_per_tok),
        ).value
        chex.assert_shape(table, (c.vocab_size, c.num_experts_per_tok))
        vocab = table.shape[0]
        if not isinstance(token_ids, jax.core.Tracer):  # concrete ids (eager calls) are checked on the host
            ids = np.asarray(token_ids)
            outside = (ids < 0) | (ids >= vocab)
            if outside.any():
                bad = int(ids[outside][0])
                raise ValueError(f"{where}: token id {bad} is outside the hash table tid2eid [0, {vocab})")
        valid = (token_ids >= 0) & (token_ids < vocab)
        indices = jnp.take(table, jnp.clip(token_ids, 0, vocab - 1), axis=0).astype(jnp.int32)
        return indices, valid


class Experts(nn.Module):
    """The E routed SwiGLU experts: params w1, w3 [E, D, M] and w2 [E, M, D]; dispatch in `moe_dispatch`."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, indices: jax.Array, weights: jax.Array, shared: MLP | None = None) -> jax.Array:
        """x [B, T, D], indices/weights [B, T, K] -> Σ_K weights · FFN_indices(x) [B, T, D] (compute), plus
        shared(x) when given: in the routed experts' CPU kernel call where `moe_dispatch.kernel_runs_shared`."""
        c = self.cfg
        b, t, d = x.shape
        e, m = c.n_routed_experts, c.moe_intermediate_size
        chex.assert_shape([indices, weights], (b, t, c.num_experts_per_tok))

        def weight(name: str, shape: tuple[int, ...], axes: tuple[str, ...]) -> jax.Array:
            init = nn.with_logical_partitioning(normal_init(c.initializer_range), axes)
            return self.param(name, init, shape, c.weight_dtype).astype(c.compute_dtype)

        w1 = weight("w1", (e, d, m), (shd.EXPERTS, shd.EMBED, shd.EXPERT_MLP))
        w3 = weight("w3", (e, d, m), (shd.EXPERTS, shd.EMBED, shd.EXPERT_MLP))
        w2 = weight("w2", (e, m, d), (shd.EXPERTS, shd.EXPERT_MLP, shd.EMBED))
        rows = x.astype(c.compute_dtype).reshape(b * t, d)  # [B·T, D]
        flat_indices = indices.reshape(b * t, -1)  # [B·T, K]
        shared_weights = () if shared is None else shared.weights()
        fold = bool(shared_weights) and moe_dispatch.kernel_runs_shared(
            rows, flat_indices, w1, w3, w2, *shared_weights, impl=c.moe_impl
        )
        y = moe_dispatch.routed_experts(
            rows,
            flat_indices,
            weights.reshape(b * t, -1),
            w1,
            w3,
            w2,
            impl=c.moe_impl,
            capacity_factor=c.capacity_factor,
            swiglu_limit=c.swiglu_limit,
            shared=shared_weights if fold else None,
        )
        y = shd.constrain(y.reshape(b, t, d), (shd.ACT_BATCH, shd.ACT_LENGTH, shd.ACT_EMBED))
        return y + shared(x) if shared is not None and not fold else y


class MoE(nn.Module):
    """DeepSeekMoE block: `gate` (Router), `experts` (routed), `shared_experts` (MLP, if n_shared_experts).

    `hash_routed=True` makes the gate pick experts by the token-id table (V4's first `num_hash_layers`
    layers); such a layer needs `token_ids` and the CONSTANTS collection (see the module docstring).
    """

    cfg: ModelConfig
    hash_routed: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, token_ids: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """x [B, T, D], token_ids int [B, T] (hash layers; ignored otherwise) -> (y [B, T, D] in the compute
        dtype, {'expert_load' [E], 'balance_loss' []})."""
        c = self.cfg
        chex.assert_rank(x, 3)
        chex.assert_axis_dimension(x, 2, c.hidden_size)
        with jax.named_scope("router"):
            route = Router(c, self.hash_routed, name="gate")(x, token_ids)
        indices, weights = route.indices, route.weights
        if self.hash_routed:
            indices, weights = merge_duplicate_experts(indices, weights, c.n_routed_experts)
        shared = None
        if c.n_shared_experts:
            shared = MLP(c, c.shared_intermediate_size, hidden_axis=shd.EXPERT_MLP, name="shared_experts")
        with jax.named_scope("routed_experts"):
            y = Experts(c, name="experts")(x, indices, weights, shared)
        if self.hash_routed:
            balance_loss = jnp.zeros((), jnp.float32)
        else:
            counts = expert_counts(route.indices, c.n_routed_experts)
            balance_loss = sequence_balance_loss(route.scores, counts, c.num_experts_per_tok)
        aux = {"expert_load": route.expert_load, "balance_loss": balance_loss}
        chex.assert_equal_shape([x, y])
        return y.astype(c.compute_dtype), aux
