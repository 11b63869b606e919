"""The inference layout's fused projections (`linear.fuse_projections` / `fused_projection`) against the
separate products, and `project`'s few-row products one row at a time, checked in float64 NumPy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from v4jax import presets
from v4jax.layers import linear
from v4jax.layers.linear import Projection, fuse_projections, fused_projection

CFG = presets.get("tiny").replace(dtype="float32", param_dtype="float32")


class _Inner(nn.Module):
    def setup(self):
        self.wkv = Projection(CFG, (6, 3, 2), (None, None, None))


class _Deep(nn.Module):
    def setup(self):
        self.more = _More()


class _More(nn.Module):
    def setup(self):
        self.w = Projection(CFG, (6, 4), (None, None))


class _Reads(nn.Module):
    """Projections at the paths of `_tree`; applies the fused kernel 'x_proj' of `members` to its input."""

    members: tuple[str, ...]

    def setup(self):
        self.wq_a = Projection(CFG, (6, 5), (None, None))
        self.inner, self.deep = _Inner(), _Deep()

    def __call__(self, x):
        return fused_projection(self, "x_proj", x, self.members, jnp.float32)


def _tree(rng):
    return {
        "wq_a": {"kernel": rng.standard_normal((6, 5))},
        "inner": {"wkv": {"kernel": rng.standard_normal((6, 3, 2))}, "norm": {"scale": np.ones(3)}},
        "deep": {"more": {"w": {"kernel": rng.standard_normal((6, 4))}}},
        "other": {"kernel": rng.standard_normal((7, 2))},
    }


def test_fused_projection_equals_each_member_product():
    rng = np.random.default_rng(0)
    tree = _tree(rng)
    members = ("wq_a", "inner/wkv", "deep/more/w")
    fused = fuse_projections(tree, "x_proj", members)
    # members' kernels gone, subtrees left empty dropped, everything else kept; the input tree untouched
    assert set(fused) == {"inner", "other", "x_proj"}
    assert set(fused["inner"]) == {"norm"}
    assert fused["x_proj"].shape == (6, 5 + 6 + 4)
    assert "kernel" in tree["wq_a"] and "kernel" in tree["inner"]["wkv"]

    x = rng.standard_normal((2, 3, 6))
    outputs = ((5,), (3, 2), (4,))
    variables = {"params": {"x_proj": jnp.asarray(fused["x_proj"], jnp.float32)}}
    parts = _Reads(members).apply(variables, jnp.asarray(x, jnp.float32))
    for part, member, shape in zip(parts, members, outputs, strict=True):
        kernel = tree
        for key in member.split("/"):
            kernel = kernel[key]
        expected = np.einsum("btk,kn->btn", x, kernel["kernel"].reshape(6, -1)).reshape(2, 3, *shape)
        np.testing.assert_allclose(np.asarray(part, np.float64), expected, rtol=1e-5, atol=1e-5)


def test_fused_projection_errors_name_the_problem():
    rng = np.random.default_rng(1)
    with pytest.raises(ValueError, match="contract inputs of different widths"):
        fuse_projections(_tree(rng), "x_proj", ("wq_a", "other"))
    with pytest.raises(ValueError, match="inference parameter layout"):
        _Reads(("wq_a",)).apply({"params": {}}, jnp.zeros((1, 1, 6)))


def test_decoding_steps_refuse_the_training_layout():
    """A decode step given unfused attention params says which layout it needs (no silent fallback)."""
    from v4jax import model
    from v4jax.sampling import engine

    cfg = presets.get("tiny_v4")
    params = model.unstack_layers(cfg, model.init_params(cfg, jax.random.key(0)))
    layer = dict(params[model.unstacked_name(0)])
    attn = dict(layer["attn"])
    del attn["x_proj"]
    params = {**params, model.unstacked_name(0): {**layer, "attn": attn}}
    with pytest.raises(ValueError, match="no fused kernel 'x_proj'"):
        engine.extend(cfg, params, engine.new_cache(cfg, 1, 8), np.zeros((1, 2), np.int32))


@pytest.mark.parametrize(
    ("eqn", "x_shape", "w_shape", "row_dots"),
    [
        ("BTD,DQ->BTQ", (1, 2, 6), (6, 5), 2),  # two rows: one matrix-vector product each
        ("BTD,DQ->BTQ", (2, 1, 6), (6, 5), 2),
        ("BTNH,NHC->BTNC", (1, 2, 3, 4), (3, 4, 5), 2),  # a batch axis N shared with the kernel
        ("BTNA,NAD->BTD", (2, 1, 3, 4), (3, 4, 6), 2),  # two contracted axes, merged into one
        ("BTD,DQ->BTQ", (1, 3, 6), (6, 5), 1),  # more rows than ROWS_AS_VECTORS: one product
        ("OBTH,OHA->OBTA", (3, 1, 2, 4), (3, 4, 5), 1),  # rows that do not lead: one product
    ],
)
def test_project_runs_few_rows_one_at_a_time_with_the_same_values_and_gradients(eqn, x_shape, w_shape, row_dots):
    rng = np.random.default_rng(3)
    x = rng.normal(size=x_shape).astype(np.float32)
    w = rng.normal(size=w_shape).astype(np.float32)
    fn = jax.jit(lambda x, w: linear.project(eqn, x, w, jnp.float32))
    assert fn.lower(x, w).as_text().count("dot_general") == row_dots
    np.testing.assert_allclose(fn(x, w), np.einsum(eqn, x.astype(np.float64), w), rtol=1e-5, atol=1e-6)
    cot = rng.normal(size=np.einsum(eqn, x, w).shape).astype(np.float32)
    grads = jax.grad(lambda x, w: jnp.sum(fn(x, w) * cot), argnums=(0, 1))(x, w)
    expected = jax.grad(lambda x, w: jnp.sum(jnp.einsum(eqn, x, w, precision="highest") * cot), argnums=(0, 1))(x, w)
    for g, g_ref in zip(grads, expected, strict=True):
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)
