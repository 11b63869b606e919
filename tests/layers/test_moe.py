"""DeepSeekMoE: dispatch vs a per-expert loop oracle, router and block parity with transformers, routing
properties, expert parallelism under every sharding preset, and gradient flow."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from v4jax import presets
from v4jax import sharding as shd
from v4jax.kernels import cpu as cpu_kernels
from v4jax.layers import moe_dispatch as md
from v4jax.layers.moe import MoE, Router, check_hash_table, merge_duplicate_experts

IMPLS = md.IMPLS


def rel_err(x, y) -> float:
    """max |x - y| / max |y| in float64."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30))


def no_drop(cfg):
    """Capacity factor E: X = ceil(T·K) slots per expert, so no assignment can be dropped."""
    return cfg.replace(capacity_factor=float(cfg.n_routed_experts))


# ----------------------------------------------------------------- numpy references
def np_expert_loop(x, indices, weights, w1, w3, w2):
    """Oracle: for each expert, for each (token, slot) routed to it, add weight · SwiGLU (float64)."""
    x, weights, w1, w3, w2 = (np.asarray(a, np.float64) for a in (x, weights, w1, w3, w2))
    indices = np.asarray(indices)
    y = np.zeros_like(x)
    for e in range(w1.shape[0]):
        for t, k in zip(*np.nonzero(indices == e), strict=True):
            gate, up = x[t] @ w1[e], x[t] @ w3[e]
            y[t] += weights[t, k] * ((gate / (1 + np.exp(-gate)) * up) @ w2[e])
    return y


def np_expert_loop_vjp(x, indices, weights, w1, w3, w2, cotangent, limit=None):
    """Oracle of the routed output and its backward (float64), by hand: y as `np_expert_loop` with the
    swiglu_limit clamp (gate <= L, |up| <= L), and the gradients of Σ cotangent ⊙ y w.r.t. x, weights,
    w1, w3, w2. Ids outside [0, E) are padding (no output, no gradient)."""
    x, weights, w1, w3, w2, cot = (np.asarray(a, np.float64) for a in (x, weights, w1, w3, w2, cotangent))
    indices = np.asarray(indices)
    y, dx, dweights = np.zeros_like(x), np.zeros_like(x), np.zeros_like(weights)
    dw1, dw3, dw2 = np.zeros_like(w1), np.zeros_like(w3), np.zeros_like(w2)
    big = np.inf if limit is None else limit
    for t, k in np.ndindex(*indices.shape):
        e = indices[t, k]
        if not 0 <= e < w1.shape[0]:
            continue
        gate, up = x[t] @ w1[e], x[t] @ w3[e]
        g, u = np.minimum(gate, big), np.clip(up, -big, big)
        sig = 1 / (1 + np.exp(-g))
        h = g * sig * u
        out = h @ w2[e]
        y[t] += weights[t, k] * out
        dweights[t, k] = cot[t] @ out
        d_out = weights[t, k] * cot[t]
        dw2[e] += np.outer(h, d_out)
        dh = w2[e] @ d_out
        d_gate = dh * u * sig * (1 + g * (1 - sig)) * (gate < big)
        d_up = dh * g * sig * (np.abs(up) < big)
        dw1[e] += np.outer(x[t], d_gate)
        dw3[e] += np.outer(x[t], d_up)
        dx[t] += w1[e] @ d_gate + w3[e] @ d_up
    return y, (dx, dweights, dw1, dw3, dw2)


def np_scores(x, kernel, cfg):
    """float64 affinities s [..., E] for `cfg.scoring_func`."""
    logits = np.asarray(x, np.float64) @ np.asarray(kernel, np.float64)
    if cfg.scoring_func == "sigmoid":
        return 1 / (1 + np.exp(-logits))
    if cfg.scoring_func == "softmax":
        s = np.exp(logits - logits.max(-1, keepdims=True))
        return s / s.sum(-1, keepdims=True)
    return np.sqrt(np.log1p(np.exp(logits)))


def np_group_limit(choice, cfg):
    """(biased scores, experts outside the topk_group best groups at -inf; group scores, descending)."""
    e, g = cfg.n_routed_experts, cfg.n_group
    grouped = choice.reshape(*choice.shape[:-1], g, e // g).copy()
    group_scores = np.sort(grouped, -1)[..., -2:].sum(-1)
    drop = np.argsort(-group_scores, -1)[..., cfg.topk_group :]
    np.put_along_axis(grouped, drop[..., None], -np.inf, axis=-2)
    return grouped.reshape(choice.shape), -np.sort(-group_scores, -1)


def np_router(x, kernel, bias, cfg):
    """float64 re-derivation of the router equations (moe.py docstring): (indices, weights, scores)."""
    s = np_scores(x, kernel, cfg)
    choice = s + np.asarray(bias, np.float64)
    if cfg.n_group > 1:
        choice = np_group_limit(choice, cfg)[0]
    indices = np.argsort(-choice, -1)[..., : cfg.num_experts_per_tok]
    w = np.take_along_axis(s, indices, -1)
    if cfg.norm_topk_prob:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return indices, w * cfg.routed_scaling_factor, s


def routing_margins(x, kernel, bias, cfg):
    """Per token, the smallest float64 gap at a selection boundary: between the topk_group-th and the next
    group score, and between the K-th chosen and the best unchosen expert of the kept groups."""
    choice = np_scores(x, kernel, cfg) + np.asarray(bias, np.float64)
    gaps = []
    if cfg.n_group > 1:
        choice, group_scores = np_group_limit(choice, cfg)
        gaps.append(group_scores[..., cfg.topk_group - 1] - group_scores[..., cfg.topk_group])
    indices = np.argsort(-choice, -1)[..., : cfg.num_experts_per_tok]
    rest = choice.copy()
    np.put_along_axis(rest, indices, -np.inf, -1)
    gaps.append(np.take_along_axis(choice, indices, -1).min(-1) - rest.max(-1))
    return np.min(gaps, axis=0)


def random_routing(seed, t, cfg):
    """x [T, D], distinct indices [T, K], positive weights [T, K], expert weights (float32)."""
    d, e, k, m = cfg.hidden_size, cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(t, d))
    indices = np.argsort(rng.uniform(size=(t, e)), axis=-1)[:, :k]
    weights = rng.uniform(0.1, 1.0, size=(t, k))
    w1, w3 = rng.normal(0.0, d**-0.5, size=(2, e, d, m))
    w2 = rng.normal(0.0, m**-0.5, size=(e, m, d))
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    return f32(x), jnp.asarray(indices, jnp.int32), f32(weights), f32(w1), f32(w3), f32(w2)


def random_params(module, x, seed):
    """`module`'s params drawn in NumPy (cheaper than compiling `init`): normal(initializer_range), with
    the router kernel ×20 so that routing is decisive and a nonzero selection bias."""
    shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), x)["params"])
    rng = np.random.default_rng(seed)
    std = module.cfg.initializer_range
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, std, s.shape), s.dtype), shapes)
    gate = params["gate"] if "gate" in params else params
    gate["kernel"] = gate["kernel"] * 20.0
    gate["bias"] = jnp.asarray(rng.normal(0.0, 0.05, gate["bias"].shape), jnp.float32)
    return params


def init_moe(cfg, seed, b=4, t=8):
    """A MoE module, its random params (see `random_params`) and x [B, T, D]."""
    module = MoE(cfg)
    x = jnp.asarray(np.random.default_rng(seed).normal(size=(b, t, cfg.hidden_size)), jnp.float32)
    return module, random_params(module, x, seed + 1), x


@functools.cache
def unsharded_moe(impl):
    """(module, params, x [8, 8, D], y, aux): the no-drop tiny MoE without a mesh, shared by the EP tests."""
    module, params, x = init_moe(no_drop(presets.tiny()).replace(moe_impl=impl), 10, b=8, t=8)
    return module, params, x, *jax.jit(module.apply)({"params": params}, x)


# ----------------------------------------------------------------- dispatch
def local_experts(impl, num_tokens, block_size=md.SORTED_BLOCK_SIZE):
    """The dropless per-row expert function of `impl`: (x, expert, w1, w3, w2, limit=...) -> rows [T, K, D]."""
    if impl == "ragged":
        return md.ragged_experts
    if impl == "capacity":
        return functools.partial(md.capacity_experts, capacity=num_tokens)
    if impl == "gather":
        return md.gathered_experts
    return functools.partial(md.sorted_experts, block_size=block_size)


@pytest.mark.parametrize("impl", IMPLS)
def test_dispatch_matches_loop_oracle(impl, tiny_cfg):
    x, indices, weights, w1, w3, w2 = random_routing(0, 40, tiny_cfg)
    if impl == "ragged":
        y = jax.jit(md.ragged_dispatch)(x, indices, weights, w1, w3, w2)
    elif impl == "capacity":
        dispatch = functools.partial(md.capacity_dispatch, capacity_factor=float(tiny_cfg.n_routed_experts))
        y = jax.jit(dispatch)(x, indices, weights, w1, w3, w2)
    elif impl == "gather":
        dispatch = functools.partial(md.routed_experts, impl="gather", capacity_factor=None)
        y = jax.jit(dispatch)(x, indices, weights, w1, w3, w2)
    else:
        y = jax.jit(md.sorted_dispatch)(x, indices, weights, w1, w3, w2)
    assert y.shape == x.shape and y.dtype == jnp.float32
    assert rel_err(y, np_expert_loop(x, indices, weights, w1, w3, w2)) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_padding_expert_ids_give_zero_rows(impl, tiny_cfg):
    """Ids ≥ E (the EP receive buffer's padding) produce zero rows and leave the real rows unchanged."""
    x, indices, _, w1, w3, w2 = random_routing(1, 12, tiny_cfg)
    e = tiny_cfg.n_routed_experts
    padded = jnp.concatenate([indices, jnp.full((12, 1), e, jnp.int32)], axis=1)
    rows = jax.jit(local_experts(impl, 12, block_size=4))(x, padded, w1, w3, w2)
    np.testing.assert_array_equal(rows[:, -1], 0.0)
    ones = jnp.ones(indices.shape)
    assert rel_err(rows[:, :-1].sum(1), np_expert_loop(x, indices, ones, w1, w3, w2)) < 1e-5


def test_capacity_drops_exactly_the_over_capacity_assignments(tiny_cfg):
    t, k, e = 40, tiny_cfg.num_experts_per_tok, tiny_cfg.n_routed_experts
    x, indices, weights, w1, w3, w2 = random_routing(3, t, tiny_cfg)
    factor = 0.6
    capacity = md.expert_capacity(t * k, e, factor, t)
    assert capacity == math.ceil(factor * t * k / e)
    # expected: slot-major fill (all first choices, then second choices, ... each in token order)
    kept = np.zeros((t, k), bool)
    used = np.zeros(e, int)
    idx = np.asarray(indices)
    for slot in range(k):
        for tok in range(t):
            if used[idx[tok, slot]] < capacity:
                kept[tok, slot] = True
                used[idx[tok, slot]] += 1
    assert 0 < (~kept).sum() < kept.sum()
    dispatch = functools.partial(md.capacity_dispatch, capacity_factor=factor)
    y = jax.jit(dispatch)(x, indices, weights, w1, w3, w2)
    expected = np_expert_loop(x, indices, np.where(kept, weights, 0.0), w1, w3, w2)
    assert rel_err(y, expected) < 1e-5


def test_default_capacity_is_dropless_even_when_every_token_picks_the_same_experts(tiny_cfg):
    """capacity_factor=None sizes X for the worst case, so the result equals the loop oracle."""
    t, k = 24, tiny_cfg.num_experts_per_tok
    x, _, weights, w1, w3, w2 = random_routing(5, t, tiny_cfg)
    indices = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (t, k))  # all tokens -> experts 0..K-1
    y = jax.jit(functools.partial(md.capacity_dispatch, capacity_factor=None))(x, indices, weights, w1, w3, w2)
    assert rel_err(y, np_expert_loop(x, indices, weights, w1, w3, w2)) < 1e-5
    assert md.expert_capacity(t * k, tiny_cfg.n_routed_experts, None, t) == t


def test_sorted_with_fewer_blocks_than_its_largest_chunk(tiny_cfg):
    """1 token: the buffer holds fewer blocks than the largest chunk, which is then never traced."""
    x, indices, weights, w1, w3, w2 = random_routing(14, 1, tiny_cfg)
    y = jax.jit(md.sorted_dispatch)(x, indices, weights, w1, w3, w2)
    assert md.block_layout(indices, tiny_cfg.n_routed_experts, md.SORTED_BLOCK_SIZE).num_blocks < max(md.SORTED_CHUNKS)
    assert rel_err(y, np_expert_loop(x, indices, weights, w1, w3, w2)) < 1e-5


def test_auto_impl_is_gather_for_few_rows_else_sorted_on_cpu():
    assert jax.default_backend() == "cpu"
    assert md.resolve_impl("auto") == "sorted"
    assert md.resolve_impl("auto", num_rows=6, num_experts=64) == "gather"  # one decoded token, K = 6
    assert md.resolve_impl("auto", num_rows=64, num_experts=64) == "gather"
    assert md.resolve_impl("auto", num_rows=96, num_experts=64) == "sorted"
    assert md.resolve_impl("auto", num_rows=96, num_experts=64, cpu_kernel=True) == "gather"  # 16 tokens
    assert md.resolve_impl("auto", num_rows=512, num_experts=64, cpu_kernel=True) == "gather"
    assert md.resolve_impl("auto", num_rows=513, num_experts=64, cpu_kernel=True) == "sorted"
    assert md.resolve_impl("ragged", num_rows=6, num_experts=64) == "ragged"
    expected = r"moe_impl='sparse' is not one of \('auto', 'ragged', 'capacity', 'sorted', 'gather'\)"
    with pytest.raises(ValueError, match=expected):
        md.resolve_impl("sparse")


def test_block_layout_matches_numpy():
    """Rows of an expert fill consecutive slots from its first block in row order, each expert's group is
    padded to whole blocks, empty experts get no block, padding ids (≥ E or < 0) get no slot."""
    e, s = 6, 4
    expert = np.random.default_rng(2).integers(-1, e + 2, size=(9, 5))
    expert[:, 0] = 3  # one expert with several blocks
    expert[expert == 1] = 4  # and one without rows
    layout = jax.jit(md.block_layout, static_argnums=(1, 2))(jnp.asarray(expert, jnp.int32), e, s)
    flat = expert.ravel()
    sizes = np.bincount(flat[(flat >= 0) & (flat < e)], minlength=e)
    blocks = -(-sizes // s)
    start = np.cumsum(blocks) - blocks
    expected = np.full(flat.size, layout.num_blocks * s)
    for i in range(e):
        rows = np.nonzero(flat == i)[0]
        expected[rows] = start[i] * s + np.arange(rows.size)
    np.testing.assert_array_equal(layout.position, expected)
    np.testing.assert_array_equal(layout.block_start, start)
    np.testing.assert_array_equal(layout.block_end, start + blocks)
    assert 0 in sizes and layout.num_blocks == (flat.size + e * (s - 1)) // s >= blocks.sum()


DROPLESS_CASES = {  # (routing, swiglu_limit)
    "random": ("random", None),
    "padding_ids": ("padding", None),
    "one_expert_group": ("same", None),
    "swiglu_limit": ("random", 0.6),
}


@functools.cache
def dropless_case(case):
    """(inputs (x, weights, w1, w3, w2), indices [T, 4], cotangent, limit) of a DROPLESS_CASES entry, tiny
    sizes with 4 experts per token (one shape for all cases, so they share compilations): 'padding' makes
    the last column ids E and E+3; 'same' sends every token to experts (5, 0, 2, 7), so four experts get
    all T rows and the others none."""
    cfg = presets.tiny().replace(num_experts_per_tok=4)
    t, e = 40, cfg.n_routed_experts
    routing, limit = DROPLESS_CASES[case]
    x, indices, weights, w1, w3, w2 = random_routing(11, t, cfg)
    if routing == "padding":
        indices = indices.at[:, -1].set(jnp.where(jnp.arange(t) % 2, e, e + 3))
    elif routing == "same":
        indices = jnp.broadcast_to(jnp.array([5, 0, 2, 7], jnp.int32), indices.shape)
    cotangent = jnp.asarray(np.random.default_rng(12).normal(size=x.shape), jnp.float32)
    return (x, weights, w1, w3, w2), indices, cotangent, limit


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def dropless_value_and_grads(impl, block_size, limit, indices, cotangent, inputs):
    """(y, grads of Σ cotangent ⊙ y w.r.t. inputs = (x, weights, w1, w3, w2)) of the dropless `impl`."""
    experts = local_experts(impl, inputs[0].shape[0], block_size)

    def routed(x, weights, w1, w3, w2):
        return md.combine(experts(x, indices, w1, w3, w2, limit=limit), weights)

    y, vjp = jax.vjp(routed, *inputs)
    return y, vjp(cotangent)


@pytest.mark.parametrize("case", sorted(DROPLESS_CASES))
def test_dropless_impls_match_the_oracle_in_values_and_gradients(case):
    """'sorted' (blocks of 4 rows: multi-block experts in chunks of every size, partial blocks, empty
    experts), 'ragged' and dropless 'capacity' all equal the float64 oracle and each other, gradients
    w.r.t. x, weights, w1, w3 and w2 included."""
    inputs, indices, cotangent, limit = dropless_case(case)
    x, weights, w1, w3, w2 = inputs
    y_ref, grads_ref = np_expert_loop_vjp(x, indices, weights, w1, w3, w2, cotangent, limit)
    if limit is not None:  # the clamp is active on a part of the pre-activations
        assert 0.05 < np.mean(np.einsum("TD,EDM->TEM", x, w1) > limit) < 0.5
    results = {
        impl: dropless_value_and_grads(impl, 4, limit, indices, cotangent, inputs)
        for impl in ("sorted", "ragged", "capacity")
    }
    names = ("x", "weights", "w1", "w3", "w2")
    for impl, (y, grads) in results.items():
        assert rel_err(y, y_ref) < 1e-5, impl
        for name, g, ref in zip(names, grads, grads_ref, strict=True):
            assert rel_err(g, ref) < 1e-5, (impl, name)
    y, grads = results["sorted"]
    for other in ("ragged", "capacity"):
        y_other, grads_other = results[other]
        assert rel_err(y, y_other) < 1e-5, other
        for name, g, g_other in zip(names, grads, grads_other, strict=True):
            assert rel_err(g, g_other) < 1e-5, (other, name)
    if case == "padding_ids":  # the padding column's weights get no gradient
        np.testing.assert_array_equal(grads[1][:, -1], 0.0)


def test_sorted_in_bfloat16_follows_the_matmul_dtype():
    """bfloat16 x and weights: gradients keep their dtypes (the custom VJP's cotangents must match its
    inputs) and agree with the float64 oracle to bfloat16 precision."""
    inputs, indices, cotangent, limit = dropless_case("random")  # unclamped: bfloat16 rounding moves no clamp
    x, weights, w1, w3, w2 = inputs
    bf16 = [a.astype(jnp.bfloat16) for a in (x, w1, w3, w2)]

    def value_and_grads(x, w1, w3, w2):
        def routed(x, w1, w3, w2):
            return md.combine(md.sorted_experts(x, indices, w1, w3, w2, block_size=4, limit=limit), weights)

        y, vjp = jax.vjp(routed, x, w1, w3, w2)
        return y, vjp(cotangent)

    y, grads = jax.jit(value_and_grads)(*bf16)
    y_ref, (dx, _, dw1, dw3, dw2) = np_expert_loop_vjp(bf16[0], indices, weights, *bf16[1:], cotangent, limit)
    assert y.dtype == jnp.float32 and [g.dtype for g in grads] == [jnp.bfloat16] * 4
    assert rel_err(y, y_ref) < 2e-2
    for g, ref in zip(grads, (dx, dw1, dw3, dw2), strict=True):
        assert rel_err(g, ref) < 2e-2


# ----------------------------------------------------------------- router
ROUTER_VARIANTS = {
    "sigmoid_grouped": dict(scoring_func="sigmoid"),
    "softmax_grouped_unnormalised": dict(scoring_func="softmax", norm_topk_prob=False),
    "softmax_flat": dict(scoring_func="softmax", n_group=1, topk_group=1),
    "sqrtsoftplus_flat": dict(scoring_func="sqrtsoftplus", n_group=1, topk_group=1),
    "sqrtsoftplus_grouped": dict(scoring_func="sqrtsoftplus"),
}


def _router_inputs(cfg, n=48, pool=512, margin=1e-4):
    """Router params (nonzero bias) and n tokens whose selections are at least `margin` from a tie."""
    x = jnp.asarray(np.random.default_rng(4).normal(size=(1, pool, cfg.hidden_size)), jnp.float32)
    params = random_params(Router(cfg), x, 5)
    gaps = routing_margins(x[0], params["kernel"], params["bias"], cfg)
    keep = np.nonzero(gaps > margin)[0][:n]
    assert keep.size == n, "not enough tie-free tokens in the pool"
    return params, x[:, keep]


@pytest.mark.parametrize("variant", sorted(ROUTER_VARIANTS))
def test_router_matches_float64_rederivation(variant, tiny_cfg):
    cfg = tiny_cfg.replace(**ROUTER_VARIANTS[variant])
    params, x = _router_inputs(cfg)
    out = jax.jit(Router(cfg).apply)({"params": params}, x)
    idx, w, s = np_router(x[0], params["kernel"], params["bias"], cfg)
    np.testing.assert_array_equal(np.sort(out.indices[0], -1), np.sort(idx, -1))
    order_ours, order_ref = np.argsort(out.indices[0], -1), np.argsort(idx, -1)
    w_ours = np.take_along_axis(np.asarray(out.weights[0]), order_ours, -1)
    w_ref = np.take_along_axis(w, order_ref, -1)
    np.testing.assert_allclose(w_ours, w_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out.scores[0], s, rtol=1e-6, atol=1e-7)


@pytest.mark.reference
def test_router_matches_transformers(tiny_cfg):
    from tests.reference import hf_v3_config, to_np, torch, transformers

    cfg = tiny_cfg
    assert cfg.n_group > 1 and cfg.topk_group < cfg.n_group
    params, x = _router_inputs(cfg)
    ref = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3TopkRouter(hf_v3_config(cfg))
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(np.asarray(params["kernel"]).T.copy()))
        ref.e_score_correction_bias.copy_(torch.from_numpy(np.array(params["bias"])))
        _, ref_w, ref_idx = ref(torch.from_numpy(np.array(x)))
    assert np.any(np.asarray(params["bias"]) != 0)
    out = jax.jit(Router(cfg).apply)({"params": params}, x)
    ours_idx, ours_w = np.asarray(out.indices[0]), np.asarray(out.weights[0])
    ref_idx, ref_w = to_np(ref_idx).astype(int), to_np(ref_w)
    np.testing.assert_array_equal(np.sort(ours_idx, -1), np.sort(ref_idx, -1))
    w_ours = np.take_along_axis(ours_w, np.argsort(ours_idx, -1), -1)
    w_ref = np.take_along_axis(ref_w, np.argsort(ref_idx, -1), -1)
    np.testing.assert_allclose(w_ours, w_ref, rtol=1e-6, atol=1e-6)


def test_router_properties(tiny_cfg):
    cfg = tiny_cfg
    b, t, k, e = 3, 16, cfg.num_experts_per_tok, cfg.n_routed_experts
    params, x = _router_inputs(cfg, n=b * t)
    x = x.reshape(b, t, -1)
    out = jax.jit(Router(cfg).apply)({"params": params}, x)
    np.testing.assert_allclose(out.weights.sum(-1), cfg.routed_scaling_factor, rtol=1e-6)
    groups = np.asarray(out.indices) // (e // cfg.n_group)
    assert max(len(set(g)) for g in groups.reshape(-1, k)) <= cfg.topk_group
    assert all(len(set(row)) == k for row in np.asarray(out.indices).reshape(-1, k))
    assert float(out.expert_load.sum()) == b * t * k
    np.testing.assert_array_equal(out.expert_load, np.bincount(np.asarray(out.indices).ravel(), minlength=e))


def test_balance_loss_matches_numpy(tiny_cfg):
    cfg = tiny_cfg
    module, params, x = init_moe(cfg, 7, b=3, t=10)
    _, aux = jax.jit(module.apply)({"params": params}, x)
    route = jax.jit(Router(cfg).apply)({"params": params["gate"]}, x)
    s, idx = np.asarray(route.scores, np.float64), np.asarray(route.indices)
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    loss = 0.0
    for b in range(x.shape[0]):
        f = e / (k * x.shape[1]) * np.bincount(idx[b].ravel(), minlength=e)
        p = (s[b] / s[b].sum(-1, keepdims=True)).mean(0)
        loss += (f * p).sum() / x.shape[0]
    np.testing.assert_allclose(aux["balance_loss"], loss, rtol=1e-6)
    np.testing.assert_array_equal(aux["expert_load"], np.bincount(idx.ravel(), minlength=e))


# ----------------------------------------------------------------- block
def test_param_tree_and_dtypes(tiny_cfg):
    cfg = tiny_cfg.replace(dtype="bfloat16")
    d, e, m = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
    x = jnp.ones((2, 4, d), jnp.bfloat16)
    variables = jax.eval_shape(MoE(cfg).init, jax.random.key(0), x)
    shapes = jax.tree.map(lambda p: (p.shape, p.dtype), nn.unbox(variables["params"]))
    f32 = jnp.float32
    assert shapes == {
        "gate": {"kernel": ((d, e), f32), "bias": ((e,), f32)},
        "experts": {"w1": ((e, d, m), f32), "w3": ((e, d, m), f32), "w2": ((e, m, d), f32)},
        "shared_experts": {
            "w1": {"kernel": ((d, m), f32)},
            "w3": {"kernel": ((d, m), f32)},
            "w2": {"kernel": ((m, d), f32)},
        },
    }
    axes = nn.get_partition_spec(variables)["params"]
    assert tuple(axes["gate"]["kernel"]) == (shd.EMBED, shd.EXPERTS)
    assert tuple(axes["experts"]["w2"]) == (shd.EXPERTS, shd.EXPERT_MLP, shd.EMBED)
    y, aux = jax.eval_shape(MoE(cfg).apply, variables, x)
    assert y.dtype == jnp.bfloat16 and y.shape == x.shape
    assert aux["expert_load"].dtype == f32 and aux["balance_loss"].shape == ()
    no_shared = jax.eval_shape(MoE(cfg.replace(n_shared_experts=0)).init, jax.random.key(0), x)["params"]
    assert set(no_shared) == {"gate", "experts"}


def hf_v3_moe(cfg, params):
    """transformers' DeepseekV3MoE (float32, eager experts) holding `params`."""
    from tests.reference import hf_v3_config, torch, transformers

    hf_cfg = hf_v3_config(cfg)
    hf_cfg._experts_implementation = "eager"  # the per-expert loop of DeepseekV3Experts.forward
    ref = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3MoE(hf_cfg).float()

    def t(a):
        return torch.from_numpy(np.array(a, np.float32))

    p, ex, sh = params["gate"], params["experts"], params["shared_experts"]
    with torch.no_grad():
        ref.gate.weight.copy_(t(p["kernel"].T))
        ref.gate.e_score_correction_bias.copy_(t(p["bias"]))
        gate_up = np.concatenate([ex["w1"], ex["w3"]], axis=2).transpose(0, 2, 1)  # [E, 2M, D]
        ref.experts.gate_up_proj.copy_(t(gate_up))
        ref.experts.down_proj.copy_(t(np.asarray(ex["w2"]).transpose(0, 2, 1)))
        ref.shared_experts.gate_proj.weight.copy_(t(sh["w1"]["kernel"].T))
        ref.shared_experts.up_proj.weight.copy_(t(sh["w3"]["kernel"].T))
        ref.shared_experts.down_proj.weight.copy_(t(sh["w2"]["kernel"].T))
    return ref


@pytest.mark.reference
@pytest.mark.parametrize("impl", IMPLS)
def test_moe_matches_transformers(impl, tiny_cfg):
    from tests.reference import to_np, torch

    cfg = no_drop(tiny_cfg).replace(moe_impl=impl)
    module, params, x = init_moe(cfg, 8)
    with torch.no_grad():
        expected = to_np(hf_v3_moe(cfg, params)(torch.from_numpy(np.array(x))))
    y, _ = jax.jit(module.apply)({"params": params}, x)
    assert rel_err(y, expected) < 1e-5


# ----------------------------------------------------------------- expert parallelism
MESHES = {
    "fsdp": dict(data=2, fsdp=4),
    "fsdp_ep": dict(data=1, fsdp=2, expert=4, tensor=1),
    "fsdp_tp": dict(fsdp=4, tensor=2),
    "ep_tp": dict(fsdp=1, expert=4, tensor=2),
}


@pytest.mark.multi_device
@pytest.mark.parametrize(
    ("preset", "impl"),  # 'sorted', 'gather' only where experts are split (their local path is the same elsewhere)
    [(p, i) for p in sorted(MESHES) for i in IMPLS if i in ("ragged", "capacity") or MESHES[p].get("expert", 1) > 1],
)
def test_sharded_moe_matches_unsharded(preset, impl):
    module, params, x, expected, expected_aux = unsharded_moe(impl)

    mesh = shd.make_mesh(**MESHES[preset])
    specs = nn.get_partition_spec(jax.eval_shape(module.init, jax.random.key(1), x))["params"]
    with shd.use_mesh(mesh, preset):
        sharded = jax.device_put(params, shd.param_shardings(specs, mesh, preset))
        x_spec = shd.logical_to_spec((shd.ACT_BATCH, None, None))
        x_sharded = jax.device_put(x, jax.NamedSharding(mesh, x_spec))
        y, aux = jax.jit(module.apply)({"params": sharded}, x_sharded)
    assert rel_err(y, expected) < 1e-5
    np.testing.assert_array_equal(aux["expert_load"], expected_aux["expert_load"])
    np.testing.assert_allclose(aux["balance_loss"], expected_aux["balance_loss"], rtol=1e-6)


@pytest.mark.multi_device
@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_flow_and_match_when_sharded(impl):
    """Gradients reach every routed weight and the router kernel (not the selection-only bias), and the
    backward through both all_to_alls and the expert-MLP psum ('ep_tp': expert=4, tensor=2) matches."""
    module, params, x, _, _ = unsharded_moe(impl)

    def loss(params):
        y, aux = module.apply({"params": params}, x)
        return jnp.sum(y**2) + aux["balance_loss"]

    expected = jax.jit(jax.grad(loss))(params)
    for owner, name in (("experts", "w1"), ("experts", "w2"), ("experts", "w3"), ("gate", "kernel")):
        g = np.asarray(expected[owner][name])
        assert np.all(np.isfinite(g)) and np.any(g != 0), (owner, name)
    mesh = shd.make_mesh(**MESHES["ep_tp"])
    specs = nn.get_partition_spec(jax.eval_shape(module.init, jax.random.key(1), x))["params"]
    with shd.use_mesh(mesh, "ep_tp"):
        grads = jax.jit(jax.grad(loss))(jax.device_put(params, shd.param_shardings(specs, mesh, "ep_tp")))
    for path, g in jax.tree.leaves_with_path(grads):
        ref = functools.reduce(lambda tree, k: tree[k.key], path, expected)
        if path[-1].key == "bias":
            np.testing.assert_array_equal(g, 0.0)
        else:
            assert rel_err(g, ref) < 1e-5, jax.tree_util.keystr(path)


# ----------------------------------------------------------------- V4: hash routing and clamped SwiGLU
def init_v4_moe(cfg, hash_routed, seed, b=4, t=8, expert_scale=40.0):
    """(module, variables, x [B, T, D], token_ids [B, T]) for a V4 MoE block with NumPy-drawn params: the
    router kernel ×20 (decisive routing), a nonzero bias on learned layers, and the gate/up weights of
    the routed and shared experts ×`expert_scale`, so that some pre-activations pass swiglu_limit."""
    module = MoE(cfg, hash_routed=hash_routed)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(b, t, cfg.hidden_size)), jnp.float32)
    token_ids = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(b, t)), jnp.int32)
    variables = jax.eval_shape(module.init, jax.random.key(0), x, token_ids)
    std = cfg.initializer_range
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, std, s.shape), s.dtype), nn.unbox(variables["params"]))
    params["gate"]["kernel"] = params["gate"]["kernel"] * 20.0
    if not hash_routed:
        params["gate"]["bias"] = jnp.asarray(rng.normal(0.0, 0.05, cfg.n_routed_experts), jnp.float32)
    experts, shared = params["experts"], params["shared_experts"]
    for name in ("w1", "w3"):
        experts[name] = experts[name] * expert_scale
        shared[name]["kernel"] = shared[name]["kernel"] * expert_scale
    out = {"params": params}
    if hash_routed:
        table = np.argsort(rng.uniform(size=(cfg.vocab_size, cfg.n_routed_experts)), -1)[:, : cfg.num_experts_per_tok]
        out["constants"] = {"gate": {"tid2eid": jnp.asarray(table, jnp.int32)}}
    return module, out, x, token_ids


def with_repeats(variables, token_ids):
    """The hash table with repeated experts in the rows of the first tokens: (e, e, e), (e, f, e), (e, e, f)."""
    table = np.array(variables["constants"]["gate"]["tid2eid"])
    ids = np.asarray(token_ids).ravel()
    table[ids[0]] = 5
    table[ids[1], 2] = table[ids[1], 0]
    table[ids[2], 1] = table[ids[2], 0]
    return {**variables, "constants": {"gate": {"tid2eid": jnp.asarray(table)}}}


def hf_v4_moe(cfg, variables):
    """transformers' DeepseekV4SparseMoeBlock (float32, eager experts) holding `variables`."""
    from tests.reference import torch, transformers

    hash_routed = "constants" in variables
    hf_cfg = transformers.DeepseekV4Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        moe_intermediate_size=cfg.moe_intermediate_size,
        num_hidden_layers=1,
        n_routed_experts=cfg.n_routed_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        n_shared_experts=cfg.n_shared_experts,
        routed_scaling_factor=cfg.routed_scaling_factor,
        scoring_func=cfg.scoring_func,
        swiglu_limit=cfg.swiglu_limit,
        mlp_layer_types=["hash_moe" if hash_routed else "moe"],
    )
    hf_cfg._experts_implementation = "eager"  # the per-(expert, occurrence) loop of DeepseekV4Experts.forward
    ref = transformers.models.deepseek_v4.modeling_deepseek_v4.DeepseekV4SparseMoeBlock(hf_cfg, 0).float()

    def t(a):
        return torch.from_numpy(np.array(a, np.float32))

    p = variables["params"]
    gate, ex, sh = p["gate"], p["experts"], p["shared_experts"]
    with torch.no_grad():
        ref.gate.weight.copy_(t(gate["kernel"].T))
        if hash_routed:
            ref.gate.tid2eid.copy_(torch.from_numpy(np.asarray(variables["constants"]["gate"]["tid2eid"], np.int64)))
        else:
            ref.gate.e_score_correction_bias.copy_(t(gate["bias"]))
        ref.experts.gate_up_proj.copy_(t(np.concatenate([ex["w1"], ex["w3"]], axis=2).transpose(0, 2, 1)))
        ref.experts.down_proj.copy_(t(np.asarray(ex["w2"]).transpose(0, 2, 1)))
        ref.shared_experts.gate_proj.weight.copy_(t(sh["w1"]["kernel"].T))
        ref.shared_experts.up_proj.weight.copy_(t(sh["w3"]["kernel"].T))
        ref.shared_experts.down_proj.weight.copy_(t(sh["w2"]["kernel"].T))
    return ref


def clamp_activity(cfg, variables, x, indices):
    """Fractions of (gate > L, |up| > L) among the routed (token, expert) pairs and the shared expert."""
    p, limit = variables["params"], cfg.swiglu_limit
    xs = np.asarray(x, np.float64).reshape(-1, cfg.hidden_size)
    idx = np.asarray(indices).reshape(xs.shape[0], -1)
    w1, w3 = (np.asarray(p["experts"][n], np.float64) for n in ("w1", "w3"))
    gate = np.einsum("TD,TKDM->TKM", xs, w1[idx])
    up = np.einsum("TD,TKDM->TKM", xs, w3[idx])
    shared_gate = xs @ np.asarray(p["shared_experts"]["w1"]["kernel"], np.float64)
    shared_up = xs @ np.asarray(p["shared_experts"]["w3"]["kernel"], np.float64)
    return [float(np.mean(a > limit)) for a in (gate, shared_gate)] + [
        float(np.mean(np.abs(a) > limit)) for a in (up, shared_up)
    ]


V4_LAYERS = {"learned": (False, False), "hash": (True, False), "hash_with_repeats": (True, True)}


@pytest.mark.reference
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layer", sorted(V4_LAYERS))
def test_v4_moe_matches_transformers(layer, impl):
    """Hash-routed and learned V4 blocks (clamped SwiGLU on routed and shared experts) vs
    DeepseekV4SparseMoeBlock; repeated experts in a hash-table row count once per occurrence as in HF."""
    from tests.reference import to_np, torch

    hash_routed, repeats = V4_LAYERS[layer]
    cfg = presets.tiny_v4().replace(moe_impl=impl)
    module, variables, x, token_ids = init_v4_moe(cfg, hash_routed, 20)
    if repeats:
        variables = with_repeats(variables, token_ids)
    ref = hf_v4_moe(cfg, variables)
    with torch.no_grad():
        x_t = torch.from_numpy(np.array(x))
        ids_t = torch.from_numpy(np.asarray(token_ids, np.int64))
        _, ref_w, ref_idx = ref.gate(x_t, ids_t) if hash_routed else ref.gate(x_t)
        expected = to_np(ref(x_t, ids_t if hash_routed else None))

    apply = functools.partial(module.apply, capture_intermediates=lambda mdl, _: isinstance(mdl, Router))
    (y, aux), state = jax.jit(apply)(variables, x, token_ids)
    route = state["intermediates"]["gate"]["__call__"][0]
    ours_idx = np.asarray(route.indices).reshape(-1, cfg.num_experts_per_tok)
    ref_idx = to_np(ref_idx).astype(int)
    if hash_routed:  # table order is kept, repeats included
        np.testing.assert_array_equal(ours_idx, ref_idx)
        np.testing.assert_allclose(np.asarray(route.weights).reshape(ref_idx.shape), to_np(ref_w), rtol=1e-6)
    else:
        np.testing.assert_array_equal(np.sort(ours_idx, -1), np.sort(ref_idx, -1))
    if repeats:
        assert min(len(set(row)) for row in ours_idx) == 1
    gate_frac, shared_gate_frac, up_frac, shared_up_frac = clamp_activity(cfg, variables, x, route.indices)
    assert 0 < gate_frac < 0.5 and 0 < up_frac < 0.5 and 0 < shared_gate_frac < 0.5 and 0 < shared_up_frac < 0.5

    assert rel_err(y, expected) < 1e-5
    np.testing.assert_array_equal(aux["expert_load"], np.bincount(ours_idx.ravel(), minlength=cfg.n_routed_experts))
    if impl == "capacity":  # the data do not depend on impl: once per layer kind
        unclamped, _ = jax.jit(MoE(cfg.replace(swiglu_limit=None), hash_routed).apply)(variables, x, token_ids)
        assert rel_err(unclamped, expected) > 1e-2  # the clamp changes the result, so parity tests it


def test_hash_layer_variables_and_gradients():
    """tid2eid lives in the 'constants' collection (int32, K distinct experts per token at init, no bias
    param); gradients reach the gate kernel through the weights, and the table is not a differentiable leaf."""
    cfg = presets.tiny_v4()
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    x = jnp.ones((2, 4, cfg.hidden_size))
    token_ids = jnp.zeros((2, 4), jnp.int32)
    module = MoE(cfg, hash_routed=True)
    shapes = jax.eval_shape(module.init, jax.random.key(0), x, token_ids)
    assert set(shapes) == {"params", "constants"} and set(shapes["params"]["gate"]) == {"kernel"}
    assert shapes["constants"] == {"gate": {"tid2eid": jax.ShapeDtypeStruct((cfg.vocab_size, k), jnp.int32)}}
    init = jax.jit(Router(cfg, hash_routed=True).init)
    table = np.asarray(init(jax.random.key(0), x, token_ids)["constants"]["tid2eid"])
    assert table.min() >= 0 and table.max() < e and all(len(set(row)) == k for row in table)
    np.testing.assert_array_equal(init(jax.random.key(0), x, token_ids)["constants"]["tid2eid"], table)
    assert np.any(np.asarray(init(jax.random.key(1), x, token_ids)["constants"]["tid2eid"]) != table)
    assert 0.5 < np.bincount(table.ravel(), minlength=e).min() / (cfg.vocab_size * k / e)

    _, variables, x, token_ids = init_v4_moe(cfg, True, 21, b=2, t=6)
    params, constants = variables["params"], variables["constants"]

    def loss(params):
        y, aux = module.apply({"params": params, "constants": constants}, x, token_ids)
        return jnp.sum(y**2) + aux["balance_loss"], aux

    grads, aux = jax.jit(jax.grad(loss, has_aux=True))(params)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    for owner, name in (("gate", "kernel"), ("experts", "w1"), ("experts", "w2"), ("experts", "w3")):
        g = np.asarray(grads[owner][name])
        assert np.all(np.isfinite(g)) and np.any(g != 0), (owner, name)
    assert float(aux["balance_loss"]) == 0.0


def test_hash_layer_errors():
    cfg = presets.tiny_v4()
    module, variables, x, token_ids = init_v4_moe(cfg, True, 22, b=2, t=4)
    with pytest.raises(ValueError, match="hash-routed MoE layer needs token_ids"):
        module.apply(variables, x)
    with pytest.raises(ValueError, match="pass the 'constants' collection"):
        module.apply({"params": variables["params"]}, x, token_ids)
    with pytest.raises(ValueError, match=r"token_ids must be integers of shape \(2, 4\)"):
        module.apply(variables, x, token_ids[:, :3])
    for bad in (cfg.vocab_size, -1):
        with pytest.raises(ValueError, match=rf"token id {bad} is outside the hash table tid2eid \[0, 512\)"):
            module.apply(variables, x, token_ids.at[1, 2].set(bad))
    # Under jit ids cannot be checked: an out-of-table id turns exactly its token's output into NaN.
    y, _ = jax.jit(module.apply)(variables, x, token_ids.at[1, 2].set(cfg.vocab_size))
    nan = np.isnan(np.asarray(y)).any(-1)
    assert nan[1, 2] and nan.sum() == 1
    # A learned layer ignores token_ids.
    _, learned, _, _ = init_v4_moe(cfg, False, 23, b=2, t=4)
    router = Router(cfg).bind({"params": learned["params"]["gate"]})
    np.testing.assert_array_equal(router(x).indices, router(x, token_ids).indices)


def test_check_hash_table():
    cfg = presets.tiny_v4()
    good = np.zeros((cfg.vocab_size, cfg.num_experts_per_tok), np.int64)  # HF's init: repeats are allowed
    out = check_hash_table(good, cfg)
    assert out.dtype == np.int32 and out.shape == good.shape
    with pytest.raises(ValueError, match=r"shape \(512, 3\)"):
        check_hash_table(good[:, :2], cfg)
    bad = good.copy()
    bad[7, 1] = cfg.n_routed_experts
    with pytest.raises(ValueError, match=r"tid2eid\[7\] = \[0, 8, 0\] holds an expert id outside \[0, 8\)"):
        check_hash_table(bad, cfg)


def test_merge_duplicate_experts_keeps_the_weighted_sum():
    indices = jnp.array([[3, 3, 1], [0, 0, 0], [2, 5, 7], [1, 0, 1]], jnp.int32)
    weights = jnp.array([[1.0, 2.0, 3.0]] * 4)
    merged_idx, merged_w = jax.jit(merge_duplicate_experts, static_argnums=2)(indices, weights, 8)
    np.testing.assert_array_equal(merged_idx, [[3, 0, 1], [0, 1, 2], [2, 5, 7], [1, 0, 2]])
    np.testing.assert_array_equal(merged_w, [[3, 0, 3], [6, 0, 0], [1, 2, 3], [4, 2, 0]])


# ----------------------------------------------------------------- the shared expert in the kernel's call
needs_kernel = pytest.mark.skipif(
    not md.cpu_kernel_applies(jnp.zeros(1)),
    reason="the CPU kernel is not built (no C++ compiler, or V4JAX_CPU_KERNELS=0)",
)


def moe_case(version, b, t):
    """(cfg with moe_impl 'auto', module, variables, x [B, T, D], token_ids or None, HF reference block) of a
    V3 block, a learned V4 block or a hash-routed V4 block."""
    if version == "v3":
        cfg = presets.tiny().replace(moe_impl="auto")
        module, params, x = init_moe(cfg, 30, b=b, t=t)
        return cfg, module, {"params": params}, x, None, hf_v3_moe(cfg, params)
    cfg = presets.tiny_v4().replace(moe_impl="auto")
    module, variables, x, token_ids = init_v4_moe(cfg, version == "v4_hash", 31, b=b, t=t)
    return cfg, module, variables, x, token_ids, hf_v4_moe(cfg, variables)


@pytest.mark.reference
@needs_kernel
@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (2, 2)])
@pytest.mark.parametrize("version", ["v3", "v4", "v4_hash"])
def test_shared_expert_in_the_kernel_call_matches_transformers(version, shape):
    """Up to KERNEL_SHARED_TOKENS tokens, 'auto' runs the shared expert in the routed experts' kernel call
    (V4: with its clamp active): the block equals transformers', its gradients those of 'sorted' (the shared
    MLP on its own)."""
    from tests.reference import to_np, torch

    cfg, module, variables, x, token_ids, ref = moe_case(version, *shape)
    apply = jax.jit(module.apply)
    assert cpu_kernels.SHARED_TARGET in apply.lower(variables, x, token_ids).as_text()
    y, _ = apply(variables, x, token_ids)
    with torch.no_grad():
        x_t = torch.from_numpy(np.array(x))
        ids = torch.from_numpy(np.asarray(token_ids, np.int64)) if module.hash_routed else None
        expected = to_np(ref(x_t) if version == "v3" else ref(x_t, ids))
    assert rel_err(y, expected) < 1e-5
    if version != "v3":
        gate = {collection: tree["gate"] for collection, tree in variables.items()}
        indices = Router(cfg, module.hash_routed).apply(gate, x, token_ids).indices
        assert clamp_activity(cfg, variables, x, indices)[1] > 0  # the shared expert's gate clamp

    cot = jnp.asarray(np.random.default_rng(32).normal(size=x.shape), jnp.float32)

    def loss(moe, params, x):
        return jnp.sum(moe.apply({**variables, "params": params}, x, token_ids)[0] * cot)

    separate = MoE(cfg.replace(moe_impl="sorted"), module.hash_routed)
    assert cpu_kernels.SHARED_TARGET not in jax.jit(separate.apply).lower(variables, x, token_ids).as_text()
    grads = jax.jit(jax.grad(functools.partial(loss, module), argnums=(0, 1)))(variables["params"], x)
    expected_grads = jax.jit(jax.grad(functools.partial(loss, separate), argnums=(0, 1)))(variables["params"], x)
    for (path, g), g_ref in zip(jax.tree.leaves_with_path(grads), jax.tree.leaves(expected_grads), strict=True):
        assert rel_err(g, g_ref) < 1e-5, jax.tree_util.keystr(path)


@needs_kernel
def test_the_shared_expert_leaves_the_kernel_call_beyond_its_token_limit_or_under_a_mesh():
    """5 tokens: the routed kernel without the shared expert; under a mesh, no shared expert in the call, and
    asking for it is an error that says why."""
    cfg = presets.tiny().replace(moe_impl="auto")
    module, params, x = init_moe(cfg, 33, b=1, t=md.KERNEL_SHARED_TOKENS + 1)
    hlo = jax.jit(module.apply).lower({"params": params}, x).as_text()
    assert cpu_kernels.TARGET in hlo and cpu_kernels.SHARED_TARGET not in hlo
    x, indices, weights, w1, w3, w2 = random_routing(34, 2, cfg)
    shared = tuple(w[0] for w in (w1, w3, w2))
    assert md.kernel_runs_shared(x, indices, w1, w3, w2, *shared, impl="auto")
    assert not md.kernel_runs_shared(x, indices, w1, w3, w2, *shared, impl="sorted")
    with shd.use_mesh(shd.make_mesh(devices=jax.devices()[:1]), "fsdp"):
        assert not md.kernel_runs_shared(x, indices, w1, w3, w2, *shared, impl="auto")
        with pytest.raises(ValueError, match="a `shared` expert runs only in the CPU kernel's call .* got impl='auto'"):
            md.routed_experts(x, indices, weights, w1, w3, w2, impl="auto", capacity_factor=None, shared=shared)
