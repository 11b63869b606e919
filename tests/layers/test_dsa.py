"""DSA (V3.2): the lightning indexer and sparse MLA.

Properties of the top-k selection (exact counts, the tie rule), index_topk ≥ T is dense MLA, absorbed ==
naive and chunked == whole with sparsity active, and parity with transformers' `DeepseekV32Indexer` /
`DeepseekV32Attention` on the same random weights. Tolerances (float32): 1e-5 relative to max |ref| for
one layer, 1e-6 for two computations of ours that differ only in chunking.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from v4jax import param_counts, presets
from v4jax.config import YarnScaling
from v4jax.hf import names
from v4jax.layers import attention_mla
from v4jax.layers.attention_mla import MLA, causal_mask
from v4jax.layers.dsa import Indexer, index_scores, topk_mask
from v4jax.layers.rope import default_positions, rope_angles

TINY_V32 = presets.tiny_v32()  # I=3 heads of J=32, index_topk=6
# For parity through the top-k: with I=3 the ReLU zeroes all heads of 1/8 of the scores, which then tie
# exactly; 16 heads make that negligible, and `assert_topk_boundary_is_clear` checks the inputs used.
WIDE = TINY_V32.replace(index_n_heads=16, index_topk=5)


def _mla(cfg, seed, b=2, t=16):
    """(MLA module, random params, x [B,T,D], positions). Params are drawn with NumPy from the abstract
    shapes (compiling `init` costs more than the tests): large enough that the softmax is far from uniform."""
    module = MLA(cfg)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(b, t, cfg.hidden_size)), jnp.float32)
    positions = default_positions(b, t)
    shapes = names.flatten(nn.unbox(jax.eval_shape(module.init, jax.random.key(0), x, positions)["params"]))

    def draw(path, shape):
        if path.endswith("scale"):
            return 3.0 * (1.0 + 0.1 * rng.normal(size=shape))
        return (0.3 if path.endswith("bias") else 0.06) * rng.normal(size=shape)

    params = names.unflatten({path: jnp.asarray(draw(path, leaf.shape), jnp.float32) for path, leaf in shapes.items()})
    return module, params, x, positions


def _apply(module, params, *args, method=None):
    """module.apply under jit (op-by-op dispatch is slow on CPU), compiled once per module, method and chunk."""
    return _jitted(type(module), module.cfg, method, attention_mla.Q_CHUNK)({"params": params}, *args)


@functools.cache
def _jitted(cls, cfg, method, q_chunk):  # q_chunk only keys the cache: it is read when tracing
    return jax.jit(functools.partial(cls(cfg).apply, method=method))


def _rel(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.max(np.abs(x - y)) / np.max(np.abs(y)))


# ------------------------------------------------------------------ top-k selection properties
@pytest.mark.parametrize("k", [1, 4, 10, 13])
def test_topk_mask_keeps_the_best_min_k_visible_keys(k):
    b, t = 2, 10
    positions = default_positions(b, t)
    visible = causal_mask(positions, positions)
    scores = jnp.where(visible, jax.random.normal(jax.random.key(0), (b, t, t)), -jnp.inf)
    keep = np.asarray(topk_mask(scores, k))
    np.testing.assert_array_equal(keep.sum(-1), np.broadcast_to(np.minimum(k, np.arange(t) + 1), (b, t)))
    assert not (keep & ~np.asarray(visible)).any()
    s = np.asarray(scores)
    worst_kept = np.where(keep, s, np.inf).min(-1)
    best_dropped = np.where(np.asarray(visible) & ~keep, s, -np.inf).max(-1)
    assert (worst_kept > best_dropped).all()


def test_topk_mask_ties_go_to_the_lower_index():
    """jax.lax.top_k's documented order: equal values come lower index first (torch.topk: unspecified)."""
    scores = jnp.array(
        [
            [[0.5, 1.0, 1.0, 1.0, 2.0, -jnp.inf]],  # tie among keys 1-3 across the boundary
            [[0.0, 0.0, 0.0, 0.0, 0.0, 0.0]],  # every score 0 (every head's ReLU clipped)
            [[-jnp.inf, 0.0, 0.0, -jnp.inf, 0.0, 1.0]],  # ties with masked keys
        ]
    )
    keep = np.asarray(topk_mask(scores, 3))[:, 0]
    np.testing.assert_array_equal(np.flatnonzero(keep[0]), [1, 2, 4])
    np.testing.assert_array_equal(np.flatnonzero(keep[1]), [0, 1, 2])
    np.testing.assert_array_equal(np.flatnonzero(keep[2]), [1, 2, 5])


# ------------------------------------------------------------------ sparse MLA
def test_index_topk_of_t_is_dense_mla():
    """With index_topk ≥ T every visible key is kept: the same function as MLA without an indexer."""
    module, params, x, positions = _mla(TINY_V32.replace(index_topk=16), 0)
    dense_params = {k: v for k, v in params.items() if k != "indexer"}
    np.testing.assert_array_equal(
        _apply(module, params, x, positions), _apply(MLA(presets.tiny()), dense_params, x, positions)
    )


def test_sparse_absorbed_and_chunked_equal_naive(monkeypatch):
    """Sparsity active (index_topk 6 < T 16): absorbed == naive, and chunks of 4 queries (the indexer scores
    and top-k per chunk too) == one chunk."""
    module, params, x, positions = _mla(TINY_V32, 1)
    naive = _apply(module, params, x, positions)
    dense = _apply(MLA(TINY_V32.replace(index_topk=16)), params, x, positions)
    assert _rel(dense, naive) > 1e-2  # the selection is active
    monkeypatch.setattr(attention_mla, "Q_CHUNK", 4)
    assert _rel(_apply(module, params, x, positions), naive) <= 1e-6
    assert _rel(_apply(module, params, x, positions, method=MLA.absorbed), naive) <= 1e-5


def test_indexer_kl_trains_only_the_indexer():
    """In both stages the KL's gradient reaches the indexer's parameters and nothing else, the output's
    gradient never reaches the indexer, and 'dense_warmup' attends densely."""
    module, params, x, positions = _mla(TINY_V32, 4)
    for stage in ("dense_warmup", "sparse"):
        cfg = TINY_V32.replace(indexer_training=stage)

        def kl_loss(p, cfg=cfg):
            return jnp.mean(_apply(MLA(cfg), p, x, positions, method=MLA.attend)[1])

        def out_loss(p, cfg=cfg):
            return jnp.sum(_apply(MLA(cfg), p, x, positions, method=MLA.attend)[0] ** 2)

        kl_grads, out_grads = names.flatten(jax.grad(kl_loss)(params)), names.flatten(jax.grad(out_loss)(params))
        for path in kl_grads:
            kl_norm, out_norm = float(jnp.abs(kl_grads[path]).max()), float(jnp.abs(out_grads[path]).max())
            if path.startswith("indexer/"):
                assert kl_norm > 0 and out_norm == 0, (stage, path)
            else:
                assert kl_norm == 0, (stage, path)
    dense = _apply(MLA(TINY_V32.replace(index_topk=16)), params, x, positions)
    warmup = _apply(MLA(TINY_V32.replace(indexer_training="dense_warmup")), params, x, positions)
    assert _rel(warmup, dense) <= 1e-6


def test_indexer_parameters():
    """Shapes [Q, I, J], [D, J], [D, I]; the LayerNorm keeps float32 parameters under a bfloat16 param dtype."""
    cfg = TINY_V32.replace(param_dtype="bfloat16", dtype="bfloat16")
    x = jax.ShapeDtypeStruct((1, 8, cfg.hidden_size), jnp.float32)
    positions = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    params = nn.unbox(jax.eval_shape(MLA(cfg).init, jax.random.key(0), x, positions)["params"]["indexer"])
    shapes = {path: (leaf.shape, leaf.dtype.name) for path, leaf in names.flatten(params).items()}
    assert shapes == {
        "wq_b/kernel": ((48, 3, 32), "bfloat16"),
        "wk/kernel": ((64, 32), "bfloat16"),
        "k_norm/scale": ((32,), "float32"),
        "k_norm/bias": ((32,), "float32"),
        "weights_proj/kernel": ((64, 3), "bfloat16"),
    }


def test_deepseek_v32_indexers_add_0_85b_parameters():
    """Q·I·J + D·J + 2J (LayerNorm) + D·I per layer, 61 layers: 851.5M (architecture.md §6.3: ≈0.85B)."""
    cfg = presets.deepseek_v32()
    d, q, i, j = cfg.hidden_size, cfg.q_lora_rank, cfg.index_n_heads, cfg.index_head_dim
    total, active = param_counts(cfg)
    per_layer = q * i * j + d * j + 2 * j + d * i
    v3_total, v3_active = param_counts(presets.deepseek_v3_671b())
    assert total - v3_total == active - v3_active == 61 * per_layer == 851_524_864


# ------------------------------------------------------------------ parity with transformers
def _params_from_hf(cfg, state, prefix=""):
    """v4jax params of one attention (or, with prefix 'indexer/', its indexer) from a transformers state
    dict, converted by the checkpoint table (`v4jax.hf.names`) of layer 0."""
    flat = {}
    for leaf in names.leaves(cfg):
        if leaf.path.startswith("dense_layers/attn/" + prefix):
            key = leaf.hf_names[0].removeprefix("model.layers.0.self_attn.").removeprefix(prefix.replace("/", "."))
            flat[leaf.path.removeprefix("dense_layers/attn/" + prefix)] = jnp.asarray(
                leaf.to_slice(state[key].detach().numpy())
            )
    return names.unflatten(flat)


def _indexer_scores(module, x, c_q, positions):
    cos, sin = rope_angles(module.cfg, positions)
    q, w = module.queries(x, c_q, cos, sin)
    return index_scores(q, w, module.keys(x, cos, sin), causal_mask(positions, positions))


YARN_MSCALE_DIFFER = YarnScaling(factor=8.0, original_max_position_embeddings=64, mscale=0.707, mscale_all_dim=1.0)


@pytest.mark.reference
def test_index_scores_match_transformers():
    """Scores (before the top-k) of `DeepseekV32Indexer`, read from the input of its topk. YaRN with
    mscale ≠ mscale_all_dim, so the rope's attention factor (≠ 1) is applied to the indexer's rope too."""
    from tests.reference import CaptureTopk, causal_mask_4d, hf_config, randomize_, torch, transformers

    hf = transformers.models.deepseek_v32.modeling_deepseek_v32

    cfg = TINY_V32.replace(rope_scaling=YARN_MSCALE_DIFFER)
    hf_cfg = hf_config(cfg)
    indexer = randomize_(hf.DeepseekV32Indexer(hf_cfg, layer_idx=0).eval(), seed=0)
    b, t = 2, 12
    rng = np.random.default_rng(0)
    x = rng.normal(size=(b, t, cfg.hidden_size)).astype(np.float32)
    c_q = rng.normal(size=(b, t, cfg.q_lora_rank)).astype(np.float32)
    positions = np.array(default_positions(b, t))
    pos = torch.from_numpy(positions).long()
    with torch.no_grad(), CaptureTopk() as captured:
        rotary = hf.DeepseekV32RotaryEmbedding(hf_cfg)(torch.from_numpy(x), pos)
        indexer(torch.from_numpy(x), torch.from_numpy(c_q), rotary, causal_mask_4d(b, t)[:, 0], pos)
    (ref,) = captured.inputs
    params = _params_from_hf(cfg, indexer.state_dict(), prefix="indexer/")
    ours = _apply(Indexer(cfg), params, x, c_q, jnp.asarray(positions), method=_indexer_scores)
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(ref))
    visible = ~np.isneginf(ref)
    assert _rel(np.asarray(ours)[visible], ref[visible]) <= 1e-5


@pytest.fixture(scope="module")
def hf_sparse_attention():
    """transformers DeepseekV32Attention (random weights, index_topk 5 < T=14) on random x: its output, mean
    attention weights over heads and the index scores it ranked; the dense attention weights of the same
    weights with index_topk = T; x and positions."""
    from tests.reference import CaptureTopk, causal_mask_4d, hf_config, randomize_, torch, transformers

    hf = transformers.models.deepseek_v32.modeling_deepseek_v32

    hf_cfg = hf_config(WIDE)
    attn = randomize_(hf.DeepseekV32Attention(hf_cfg, layer_idx=0).eval(), seed=1)
    dense_attn = hf.DeepseekV32Attention(hf_config(WIDE.replace(index_topk=14)), layer_idx=0).eval()
    dense_attn.load_state_dict(attn.state_dict())
    b, t = 2, 14
    x = np.random.default_rng(1).normal(size=(b, t, WIDE.hidden_size)).astype(np.float32)
    positions = np.array(default_positions(b, t))
    xt, pos = torch.from_numpy(x), torch.from_numpy(positions).long()
    rotary = hf.DeepseekV32RotaryEmbedding(hf_cfg)(xt, pos)
    with torch.no_grad(), CaptureTopk() as captured:
        out, weights = attn(xt, rotary, causal_mask_4d(b, t), position_ids=pos)
        _, dense_weights = dense_attn(xt, rotary, causal_mask_4d(b, t), position_ids=pos)
    scores = captured.inputs[0]
    return {
        "params": _params_from_hf(WIDE, attn.state_dict()),
        "x": jnp.asarray(x),
        "positions": jnp.asarray(positions),
        "out": out.numpy(),
        "attention": weights.mean(1).numpy(),
        "dense_attention": dense_weights.mean(1).numpy(),
        "scores": scores,
    }


@pytest.mark.reference
def test_sparse_mla_matches_transformers(hf_sparse_attention):
    from tests.reference import assert_topk_boundary_is_clear

    ref = hf_sparse_attention
    assert_topk_boundary_is_clear(ref["scores"], WIDE.index_topk)
    args = (ref["params"], ref["x"], ref["positions"])
    dense = _apply(MLA(WIDE.replace(index_topk=14)), *args)
    assert _rel(dense, ref["out"]) > 1e-2  # the top-k really changes the output
    assert _rel(_apply(MLA(WIDE), *args), ref["out"]) <= 1e-5
    assert _rel(_apply(MLA(WIDE), *args, method=MLA.absorbed), ref["out"]) <= 1e-5


def _kl_float64(scores, attention, keys):
    """KL(p ‖ softmax(scores)) per query over `keys`, p = attention restricted to keys, L1-normalised."""
    p = np.where(keys, attention, 0.0).astype(np.float64)
    p /= p.sum(-1, keepdims=True)
    z = np.where(keys, scores, -np.inf).astype(np.float64)
    log_q = z - z.max(-1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
    return np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - np.where(keys, log_q, 0.0)), 0.0).sum(-1)


@pytest.mark.reference
@pytest.mark.parametrize("stage", ["dense_warmup", "sparse"])
def test_indexer_kl_matches_transformers_attention(hf_sparse_attention, stage):
    """The per-query indexer KL equals a float64 NumPy KL between transformers' head-averaged attention
    (dense for the warm-up, top-k otherwise) and the softmax of transformers' indexer scores, within 2e-6
    nats: the KL (~1e-2) is a difference of O(1) float32 logs, so its relative error is ~1e-5."""
    ref = hf_sparse_attention
    cfg = WIDE.replace(indexer_training=stage)
    _, kl = _apply(MLA(cfg), ref["params"], ref["x"], ref["positions"], method=MLA.attend)
    attention = ref["dense_attention"] if stage == "dense_warmup" else ref["attention"]
    visible = ~np.isneginf(ref["scores"])
    keys = visible if stage == "dense_warmup" else attention > 0
    expected = _kl_float64(ref["scores"], attention, keys)
    assert expected.max() > 1e-3  # a random indexer differs from the attention
    np.testing.assert_allclose(kl, expected, rtol=0, atol=2e-6)
