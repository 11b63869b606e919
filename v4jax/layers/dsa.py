"""DeepSeek Sparse Attention (V3.2): the lightning indexer and the top-k key selection it drives.

    q^I   = RoPE_half(c_q·Wq_b)                        'BTQ,QIJ->BTIJ'   c_q: MLA's normalised query latent
    k^I   = RoPE_half(LayerNorm(x·Wk))                 'BSD,DJ->BSJ'     one key head shared by the I heads
    w     = x·Ww · I^-1/2                              'BTD,DI->BTI'     float32
    l     = ReLU(q^I·k^I · J^-1/2)                     'BTIJ,BSJ->BTIS'  float32
    score = Σ_I w·l,  −inf where key s is not visible  'BTIS,BTI->BTS'   float32 [B, T, S]
    keep  = the top-U keys of score, U = min(index_topk, #visible keys)   bool [B, T, S]
  MLA (attention_mla.py) then attends only over `keep` ∧ causal; with index_topk ≥ S that is dense attention.

x is the attention input (after attn_norm). RoPE uses MLA's cos/sin (YaRN frequencies, and transformers' YaRN
attention factor, which is 1 in the published config) on the first P of the J dims, in the non-interleaved
layout: pairs (j, j+P/2), unlike MLA's interleaved pairs. DeepSeek's demo code
used the interleaved layout here until 2025-11-17 and then called it a bug; transformers and this module
follow the fixed layout. The LayerNorm has a scale and a bias (ε = 1e-6), is computed in float32 and keeps
its parameters in float32 (the published V3.2 checkpoint stores k_norm in float32).

Differences from DeepSeek's reference, shared with transformers' `DeepseekV32Indexer`:
- DeepSeek rotates q^I and k^I by a Walsh–Hadamard transform before quantising them to FP8; the transform is
  orthogonal (q·k is unchanged) and only matters for the FP8 rounding, so it is omitted.
- DeepSeek scores in FP8 (e4m3, per-128 scales). Here q^I and k^I are in the compute dtype and the scores
  accumulate in float32 (transformers: float32), like `w`.

Ties. `jax.lax.top_k` returns, among equal scores, the lower index first, so the earlier key is kept. The
ReLU makes exact ties likely (score 0 whenever every head clips). transformers' `torch.topk` makes no promise
for ties; on CPU it returns tied entries in no particular order (of 40 equal zeros, top-5 gave indices
25..29), so parity tests must use inputs without ties at the top-k boundary.

Masking. transformers adds its additive causal mask (`finfo.min` for eager attention) to the scores and takes
the top min(index_topk, S) over all S keys, so early queries also "select" future keys, which the causal
mask then removes. The keys attended are the same as here: the top min(index_topk, t+1) visible keys.

Training (`indexer_kl`, switched on by `cfg.indexer_training`). `keep` is boolean, so the language-model
loss never reaches the indexer. As in the V3.2 report, the indexer learns from a KL loss toward the main
attention distribution, per query t over a key set K_t:
    p_t   = Σ_N attention probabilities on K_t, L1-normalised          detached (the target)
    q_t   = softmax(score_t) over K_t
    KL_t  = Σ_{s ∈ K_t} p_t,s (log p_t,s − log q_t,s)
'dense_warmup': the attention is dense and K_t = every visible key (the trainer then updates only the
indexer); 'sparse': the attention uses the top-k and K_t = the selected keys. The indexer's inputs are
detached in both stages, so the KL trains only the indexer. transformers' indexer runs under
`torch.no_grad` and cannot be trained.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn

from v4jax import sharding as shd
from v4jax.config import ModelConfig
from v4jax.layers.linear import Projection
from v4jax.layers.rope import apply_rope

K_NORM_EPS = 1e-6


class LayerNorm(nn.Module):
    """LayerNorm of the last axis with a scale and a bias, computed in float32 with float32 parameters."""

    cfg: ModelConfig
    dim: int
    eps: float = K_NORM_EPS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.dim:
            raise ValueError(f"{self.name}: expected last dim {self.dim}, got shape {x.shape}")
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (shd.NORM,)), (self.dim,))
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (shd.NORM,)), (self.dim,))
        xf = x.astype(jnp.float32)
        centred = xf - jnp.mean(xf, axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
        return (y * scale + bias).astype(self.cfg.compute_dtype)


def index_scores(q: jax.Array, w: jax.Array, k: jax.Array, visible: jax.Array | None = None) -> jax.Array:
    """Indexer scores float32 [B, T, S] (−inf where `visible` is False), before the top-k.

    q [B, T, I, J] and w [B, T, I] from `Indexer.queries`, k [B, S, J] from `Indexer.keys` (or V4's
    compressed indexer keys), visible bool [B, T, S] (the causal mask; None: no masking).
    """
    b, t, i, j = q.shape
    chex.assert_shape(w, (b, t, i))
    chex.assert_shape(k, (b, None, j))
    logits = jnp.einsum("BTIJ,BSJ->BTIS", q, k, preferred_element_type=jnp.float32) * j**-0.5
    scores = jnp.einsum("BTIS,BTI->BTS", jax.nn.relu(logits), w.astype(jnp.float32))
    if visible is None:
        return scores
    chex.assert_shape(visible, (b, t, k.shape[1]))
    return jnp.where(visible, scores, -jnp.inf)


def topk_mask(scores: jax.Array, k: int) -> jax.Array:
    """bool [B, T, S]: for each query, its min(k, #visible) highest-scoring visible keys.

    `scores` [B, T, S] is −inf at keys a query may not see. Among tied scores the lower key index wins.
    """
    chex.assert_rank(scores, 3)
    _, top = jax.lax.top_k(scores, min(k, scores.shape[-1]))  # [B, T, U]
    keep = jnp.put_along_axis(jnp.zeros(scores.shape, jnp.bool_), top, True, axis=-1, inplace=False)
    return keep & (scores > -jnp.inf)


def indexer_kl(scores: jax.Array, attention: jax.Array, keys: jax.Array) -> jax.Array:
    """Per-query KL(p ‖ softmax(scores)) over the key set `keys`: float32 [B, T] (0 where the set is empty).

    scores float32 [B, T, S] (indexer), attention [B, T, S] main attention probabilities summed (or
    averaged) over heads, used as the L1-normalised target p without gradient; keys bool [B, T, S].
    """
    chex.assert_equal_shape([scores, attention, keys])
    target = jax.lax.stop_gradient(jnp.where(keys, attention.astype(jnp.float32), 0.0))
    target = target / jnp.maximum(target.sum(-1, keepdims=True), 1e-30)
    # a finite fill keeps rows with an empty set free of NaN (their terms are 0 either way)
    log_q = jax.nn.log_softmax(jnp.where(keys, scores, -1e30), axis=-1)
    log_p = jnp.log(jnp.where(target > 0, target, 1.0))
    return jnp.sum(jnp.where(target > 0, target * (log_p - log_q), 0.0), axis=-1)


class Indexer(nn.Module):
    """The DSA lightning indexer's projections: params wq_b [Q, I, J], wk [D, J], k_norm, weights_proj [D, I]."""

    cfg: ModelConfig

    def setup(self):
        c = self.cfg
        d, q, i, j = c.hidden_size, c.q_lora_rank, c.index_n_heads, c.index_head_dim
        self.wq_b = Projection(c, (q, i, j), (shd.Q_LORA, shd.INDEX_HEADS, shd.HEAD_DIM))
        self.wk = Projection(c, (d, j), (shd.EMBED, shd.HEAD_DIM))
        self.k_norm = LayerNorm(c, j)
        # The head weights are computed in float32, as DeepSeek's and transformers' indexers do.
        self.weights_proj = Projection(c.replace(dtype="float32"), (d, i), (shd.EMBED, shd.INDEX_HEADS))

    def _rope(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """Non-interleaved RoPE on the first P dims of the last axis (J)."""
        p = self.cfg.qk_rope_head_dim
        return jnp.concatenate([apply_rope(x[..., :p], cos, sin, interleave=False), x[..., p:]], axis=-1)

    def queries(self, x: jax.Array, c_q: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(q^I [B, T, I, J] rotated, head weights w float32 [B, T, I] including I^-1/2).

        x [B, T, D] is the attention input, c_q [B, T, Q] MLA's normalised query latent, cos/sin [B, T, P/2].
        """
        c = self.cfg
        b, t, _ = x.shape
        chex.assert_shape(x, (b, t, c.hidden_size))
        chex.assert_shape(c_q, (b, t, c.q_lora_rank))
        q = self.wq_b("BTQ,QIJ->BTIJ", c_q)
        q = shd.constrain(q, (shd.ACT_BATCH, shd.ACT_LENGTH, None, None))
        w = self.weights_proj("BTD,DI->BTI", x) * c.index_n_heads**-0.5
        return self._rope(q, cos, sin), w

    def keys(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """k^I [B, S, J] rotated: the per-token state an indexer key cache holds. x [B, S, D]."""
        chex.assert_shape(x, (None, None, self.cfg.hidden_size))
        return self._rope(self.k_norm(self.wk("BSD,DJ->BSJ", x)), cos, sin)
