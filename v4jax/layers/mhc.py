"""Residual streams: manifold-constrained hyper-connections (mHC, V4), unconstrained hyper-connections (HC,
for ablation), or the plain pre-norm residual, behind one interface (`cfg.residual_mode`), plus the
`HyperHead` that collapses the streams before the final norm and the Amax gain of composite residual maps.

Letters (style.md §4.4): R the input stream of a residual map, O its output stream, Y the (2+R)·R mixes
of one site (R pre, R post, R·R comb), D the model width. comb[j, k] = comb[R=j, O=k].

    X0   = broadcast(x, R)                                   [B, T, R, D]   R copies of the embedding
  one site (HyperConnection, used twice per decoder layer), all coefficient math in float32:
    x̂    = X / sqrt(mean_{R,D}(X²) + rms_norm_eps)           one unweighted RMSNorm over the flat R·D values
    μ    = 'BTRD,YRD->BTY'(x̂, fn)                             fn [Y, R·D] (torch layout) viewed as [Y, R, D]
    μ    → μ_pre [B, T, R], μ_post [B, T, R], μ_res [B, T, R, O]   (rows 0..R-1 | R..2R-1 | 2R.. row-major)
    x_in = 'BTR,BTRD->BTD'(pre, X)                             float32, then cast to X.dtype
    y    = sublayer(norm(x_in))                                [B, T, D]
    X'   = post ⊗ y + 'BTRO,BTRD->BTOD'(comb, X)             X'_k = post_k·y + Σ_j comb[j, k]·X_j
  head (HyperHead): x̂ as above, μ = 'BTRD,YRD->BTY'(x̂, fn) with Y = R, pre = σ(μ·scale + base) + hc_eps,
    h = 'BTR,BTRD->BTD'(pre, X).

Coefficients per mode (scale = [s0, s1, s2], base split like μ):
  'mhc' (V4; HF `DeepseekV4HyperConnection`, v4-real.md §10.2):
    pre  = σ(μ_pre·s0 + b_pre) + hc_eps,   post = 2·σ(μ_post·s1 + b_post)
    comb = sinkhorn(μ_res·s2 + b_res, hc_sinkhorn_iters, hc_eps)           doubly stochastic up to eps
    init (HF `_init_weights`): fn ~ N(0, initializer_range), base = 0, scale = 1.
  'hc' (hyper-connections, Zhu et al. 2024, arXiv 2409.19606, in their dynamic form; mHC paper §3):
    pre  = b_pre + s0·tanh(μ_pre),   post = b_post + s1·tanh(μ_post),   comb = b_res + s2·tanh(μ_res)
    No sigmoid, no softmax, no Sinkhorn: the same parametrisation (fn, base, scale, the flat RMSNorm)
    with HC's bounded dynamic term around a free static part, so that 'hc' vs 'mhc' isolates the manifold
    constraint. HC applies tanh to all three maps (static + s·tanh(norm(h)·W)), so comb keeps it too:
    without it 'hc' would be neither HC nor mHC. Init as HC's: fn ~ N(0, initializer_range), scale = 0.01,
    static b_pre = 1/R (HC uses a one-hot per layer: the same on the R identical copies X0, and it needs no
    layer index), b_post = 1, b_res = I. At init X' = X + y on every stream, up to the 0.01-scaled dynamic
    terms (the HF-style init base = 0 would make comb ≈ 0 here and drop the residual).
    The head is the V4 HyperHead in both 'hc' and 'mhc', so the ablation changes only the residual maps.
  'none' (plain pre-norm residual): R = 1, x_in = X[:, :, 0], X' = X + y; post = 1 and comb = [[1]] are
    returned for the uniform interface; no params (the head is X[:, :, 0]).

Dtypes: params are float32 whatever `param_dtype` (HF `_keep_in_fp32_modules_strict`). Like HF's decoder
layer, the update casts post and comb to X.dtype and mixes in that dtype (float32 accumulation, one
rounding), then adds post·y in X.dtype; the collapse stays float32 until its final cast.

Sinkhorn (HF order, not the textbook one): M = softmax_O(logits) + eps; M /= (Σ_R M + eps) (columns
first); then (iters − 1) × [M /= (Σ_O M + eps) (rows); M /= (Σ_R M + eps) (columns)]. Columns therefore
sum to 1 − O(eps) always; rows only up to the convergence error, which after 20 iterations is < 1e-5 for
logits of spread ~0.5 but ~4e-4 (R=3) at spread 1 and ~1e-2 at spread 2 (measured on random logits).

Amax gain (mHC paper, architecture.md §8.1): with the paper's residual matrix H_l = comb_lᵀ (X' = H X
on the stream axis), the composite map of layers 1..L is H_L ⋯ H_1; its forward gain is the max absolute
row sum (‖·‖_∞: bound on the signal growth) and its backward gain the max absolute column sum (‖·‖_1:
bound on the gradient growth). Both are 1 for any doubly stochastic or permutation product.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn

from v4jax import sharding as shd
from v4jax.config import ModelConfig
from v4jax.layers.linear import by_rows, normal_init, rms_norm

HIGHEST = jax.lax.Precision.HIGHEST
STREAM_AXES = (shd.ACT_BATCH, shd.ACT_LENGTH, shd.ACT_STREAMS, shd.ACT_EMBED)
HC_SCALE_INIT = 0.01  # HC's init of the dynamic-term scales


# ----------------------------------------------------------------- pure helpers
INTERMEDIATES = "intermediates"  # Flax's collection for sown values (the residual maps, for analysis)


def num_streams(cfg: ModelConfig) -> int:
    """R: hc_mult under 'hc' / 'mhc', 1 for the plain residual."""
    return 1 if cfg.residual_mode == "none" else cfg.hc_mult


def expand_streams(x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """X0: R identical copies of the embedding, x [B, T, D] -> [B, T, R, D] (HF `unsqueeze(2).expand`)."""
    chex.assert_rank(x, 3)
    b, t, d = x.shape
    return shd.constrain(jnp.broadcast_to(x[:, :, None, :], (b, t, num_streams(cfg), d)), STREAM_AXES)


def sinkhorn(logits: jax.Array, iters: int, eps: float) -> jax.Array:
    """HF's Sinkhorn projection of float32 logits [..., R, O] onto (nearly) doubly stochastic matrices.

    softmax over the last axis + eps, one column normalisation, then iters − 1 (row, column) pairs; every
    denominator is (sum + eps). Columns then sum to 1 up to eps, rows up to the convergence error too.
    """
    if iters < 1:
        raise ValueError(f"sinkhorn needs iters >= 1, got {iters}")
    m = jax.nn.softmax(logits.astype(jnp.float32), axis=-1) + eps
    m = m / (m.sum(-2, keepdims=True) + eps)

    def row_then_column(_, m):
        m = m / (m.sum(-1, keepdims=True) + eps)
        return m / (m.sum(-2, keepdims=True) + eps)

    return jax.lax.fori_loop(0, iters - 1, row_then_column, m)


def stream_mixes(streams: jax.Array, fn: jax.Array, eps: float) -> jax.Array:
    """μ = RMSNorm_u(flat X) · fnᵀ in float32: streams [B, T, R, D], fn [Y, R·D] -> [B, T, Y]."""
    b, t, r, d = streams.shape
    flat = rms_norm(streams.reshape(b, t, r * d), None, eps)  # [B, T, R·D] float32

    # one contracting axis (over (R, D) as two, XLA:CPU copied fn transposed on every call), and fn as the left
    # operand of a row-major product: as the right one, XLA copied it transposed in every step of a decode loop
    def product(rows: jax.Array) -> jax.Array:  # [B, T, R·D] -> [B, T, Y]
        mixes = jax.lax.dot_general(fn.astype(jnp.float32), rows, (((1,), (2,)), ((), ())), precision=HIGHEST)
        return jnp.moveaxis(mixes, 0, -1)

    return by_rows(product, flat, 2)


def site_coefficients(
    mixes: jax.Array, base: jax.Array, scale: jax.Array, cfg: ModelConfig
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(pre [B, T, R], post [B, T, R], comb [B, T, R, O]) float32 from mixes [B, T, Y] under cfg.residual_mode."""
    r = cfg.hc_mult
    base, scale = base.astype(jnp.float32), scale.astype(jnp.float32)
    mu_pre, mu_post, mu_res = mixes[..., :r], mixes[..., r : 2 * r], mixes[..., 2 * r :]
    b_pre, b_post, b_res = base[:r], base[r : 2 * r], base[2 * r :].reshape(r, r)
    mu_res = mu_res.reshape(*mu_res.shape[:-1], r, r)  # [B, T, R, O]
    if cfg.residual_mode == "mhc":
        pre = jax.nn.sigmoid(mu_pre * scale[0] + b_pre) + cfg.hc_eps
        post = 2 * jax.nn.sigmoid(mu_post * scale[1] + b_post)
        comb = sinkhorn(mu_res * scale[2] + b_res, cfg.hc_sinkhorn_iters, cfg.hc_eps)
    elif cfg.residual_mode == "hc":
        pre = b_pre + scale[0] * jnp.tanh(mu_pre)
        post = b_post + scale[1] * jnp.tanh(mu_post)
        comb = b_res + scale[2] * jnp.tanh(mu_res)
    else:
        raise ValueError(f"residual_mode={cfg.residual_mode!r} has no hyper-connection coefficients")
    return pre, post, comb


def collapse(streams: jax.Array, pre: jax.Array) -> jax.Array:
    """Σ_j pre_j·X_j in float32, cast to X.dtype: streams [B, T, R, D], pre [B, T, R] -> [B, T, D]."""
    x = jnp.einsum("BTR,BTRD->BTD", pre.astype(jnp.float32), streams.astype(jnp.float32), precision=HIGHEST)
    return x.astype(streams.dtype)


def expand(y: jax.Array, streams: jax.Array, post: jax.Array, comb: jax.Array) -> jax.Array:
    """X'_k = post_k·y + Σ_j comb[j, k]·X_j in X.dtype (HF's casts): -> [B, T, O, D]."""
    dtype = streams.dtype
    mixed = jnp.einsum(
        "BTRO,BTRD->BTOD",
        comb.astype(dtype),
        streams,
        precision=HIGHEST,
        preferred_element_type=jnp.float32,
    ).astype(dtype)
    return post.astype(dtype)[..., None] * y.astype(dtype)[:, :, None, :] + mixed


def composite_mapping(combs: jax.Array) -> jax.Array:
    """H_L ⋯ H_1 with H_l = comb_lᵀ: combs [L, ..., R, O] in the site convention -> [..., O, R]."""

    def step(h, comb):
        return jnp.matmul(jnp.swapaxes(comb, -1, -2), h, precision=HIGHEST), None  # H_l · (H_{l-1} ⋯ H_1)

    return jax.lax.scan(step, jnp.swapaxes(combs[0], -1, -2), combs[1:])[0]


def amax_gain(h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(forward, backward) Amax gain of residual matrices h [..., O, R]: the max absolute row sum and the
    max absolute column sum, each [...]."""
    a = jnp.abs(h)
    return a.sum(-1).max(-1), a.sum(-2).max(-1)


def composite_gain(combs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(forward, backward) Amax gain of the composite residual map of combs [L, ..., R, O], each [...].
    The paper's per-depth curve of layer l is `composite_gain(combs[l:])`; reduce over tokens as wanted."""
    return amax_gain(composite_mapping(combs))


# ----------------------------------------------------------------- modules
def _site_base_init(cfg: ModelConfig) -> nn.initializers.Initializer:
    """base: 0 for 'mhc' (HF); HC's static part [1/R]·R | [1]·R | vec(I_R) for 'hc'."""
    if cfg.residual_mode == "mhc":
        return nn.initializers.zeros
    r = cfg.hc_mult

    def init(key, shape, dtype=jnp.float32):
        del key
        static = jnp.concatenate([jnp.full((r,), 1 / r), jnp.ones((r,)), jnp.eye(r).reshape(-1)])
        chex.assert_shape(static, shape)
        return static.astype(dtype)

    return init


class HyperConnection(nn.Module):
    """One residual site (the decoder makes `hc_attn` and `hc_ffn` per layer), mode from cfg.residual_mode.

    Params ('hc' / 'mhc' only; float32): `fn` [(2+R)·R, R·D] (torch layout of HF `fn`: checkpoint loading
    is a copy), `base` [(2+R)·R], `scale` [3]. Use `pre` before the sub-layer and `post` after it.
    """

    cfg: ModelConfig

    def setup(self):
        c = self.cfg
        if c.residual_mode == "none":
            return
        r, y = c.hc_mult, (2 + c.hc_mult) * c.hc_mult
        self.fn = self.param(
            "fn",
            nn.with_logical_partitioning(normal_init(c.initializer_range), (None, shd.EMBED)),
            (y, r * c.hidden_size),
            jnp.float32,
        )
        self.base = self.param("base", nn.with_logical_partitioning(_site_base_init(c), (None,)), (y,), jnp.float32)
        scale_init = nn.initializers.ones if c.residual_mode == "mhc" else nn.initializers.constant(HC_SCALE_INIT)
        self.scale = self.param("scale", nn.with_logical_partitioning(scale_init, (None,)), (3,), jnp.float32)

    def pre(self, streams: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """streams X [B, T, R, D] -> (x_in [B, T, D] in X.dtype, post float32 [B, T, R], comb float32
        [B, T, R, O])."""
        c = self.cfg
        r = num_streams(c)
        chex.assert_shape(streams, (None, None, r, c.hidden_size))
        streams = shd.constrain(streams, STREAM_AXES)
        b, t = streams.shape[:2]
        if c.residual_mode == "none":
            return streams[:, :, 0], jnp.ones((b, t, 1), jnp.float32), jnp.ones((b, t, 1, 1), jnp.float32)
        mixes = stream_mixes(streams, self.fn, c.rms_norm_eps)
        pre, post, comb = site_coefficients(mixes, self.base, self.scale, c)
        x_in = shd.constrain(collapse(streams, pre), (shd.ACT_BATCH, shd.ACT_LENGTH, shd.ACT_EMBED))
        chex.assert_shape([pre, post], (b, t, r))
        chex.assert_shape(comb, (b, t, r, r))
        self.sow(INTERMEDIATES, "comb", comb)  # kept only when applied with mutable=['intermediates']
        return x_in, post, comb

    def post(self, y: jax.Array, streams: jax.Array, post: jax.Array, comb: jax.Array) -> jax.Array:
        """Sub-layer output y [B, T, D], the streams X [B, T, R, D] that `pre` saw and its post, comb ->
        X' [B, T, O, D] in X.dtype ('none': exactly X + y)."""
        c = self.cfg
        r = num_streams(c)
        chex.assert_shape(streams, (None, None, r, c.hidden_size))
        b, t = streams.shape[:2]
        chex.assert_shape(y, (b, t, c.hidden_size))
        chex.assert_shape(post, (b, t, r))
        chex.assert_shape(comb, (b, t, r, r))
        if c.residual_mode == "none":
            out = streams + y.astype(streams.dtype)[:, :, None, :]
        else:
            out = expand(y, streams, post, comb)
        return shd.constrain(out, STREAM_AXES)


class HyperHead(nn.Module):
    """Collapse of the final streams before the final norm: X [B, T, R, D] -> [B, T, D] in X.dtype.

    Params ('hc' / 'mhc'; float32, HF `hc_head.hc_fn/hc_base/hc_scale`): `fn` [R, R·D] ~ N(0,
    initializer_range), `base` [R] = 0, `scale` [1] = 1. 'none': X[:, :, 0], no params.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, streams: jax.Array) -> jax.Array:
        c = self.cfg
        r = num_streams(c)
        chex.assert_shape(streams, (None, None, r, c.hidden_size))
        streams = shd.constrain(streams, STREAM_AXES)
        if c.residual_mode == "none":
            return streams[:, :, 0]
        fn = self.param(
            "fn",
            nn.with_logical_partitioning(normal_init(c.initializer_range), (shd.STREAMS, shd.EMBED)),
            (r, r * c.hidden_size),
            jnp.float32,
        )
        base_init = nn.with_logical_partitioning(nn.initializers.zeros, (shd.STREAMS,))
        base = self.param("base", base_init, (r,), jnp.float32)
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (None,)), (1,), jnp.float32)
        mixes = stream_mixes(streams, fn, c.rms_norm_eps)  # [B, T, O]
        pre = jax.nn.sigmoid(mixes * scale + base) + c.hc_eps
        out = collapse(streams, pre)
        return shd.constrain(out, (shd.ACT_BATCH, shd.ACT_LENGTH, shd.ACT_EMBED))
