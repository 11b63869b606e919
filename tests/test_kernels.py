"""The CPU routed-experts kernel (`v4jax.kernels.cpu`) against a float64 NumPy loop, its use by the 'gather'
dispatch, its gradients, and its build errors."""

from __future__ import annotations

import os
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from v4jax.kernels import cpu as cpu_kernels
from v4jax.layers import moe_dispatch as md

HAS_COMPILER = shutil.which(os.environ.get("CXX", "g++")) is not None
needs_kernel = pytest.mark.skipif(
    not HAS_COMPILER or os.environ.get("V4JAX_CPU_KERNELS") == "0",
    reason="no C++ compiler ($CXX or g++) to build the CPU kernel, or V4JAX_CPU_KERNELS=0",
)


def np_rows(x, expert, w1, w3, w2, limit):
    """float64 out[t, k] = swiglu(x[t] W1[e], x[t] W3[e]) W2[e] (zero for ids outside [0, E))."""
    x, w1, w3, w2 = (np.asarray(a, np.float64) for a in (x, w1, w3, w2))
    big = np.inf if limit is None else limit
    t, k = expert.shape
    out = np.zeros((t, k, x.shape[1]))
    for i in range(t):
        for j in range(k):
            e = int(expert[i, j])
            if 0 <= e < w1.shape[0]:
                g, u = np.minimum(x[i] @ w1[e], big), np.clip(x[i] @ w3[e], -big, big)
                out[i, j] = (g / (1 + np.exp(-g)) * u) @ w2[e]
    return out


def random_case(seed, t=3, k=4, e=9, d=37, m=23):
    """Odd sizes (no vector-width multiples); two padding ids (−1 and E, when t ≥ 3)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(t, d)).astype(np.float32)
    w1, w3 = (rng.normal(size=(e, d, m)).astype(np.float32) / np.sqrt(d) for _ in range(2))
    w2 = rng.normal(size=(e, m, d)).astype(np.float32) / np.sqrt(m)
    expert = np.stack([rng.choice(e, k, replace=False) for _ in range(t)]).astype(np.int32)
    expert[0, 1], expert[min(2, t - 1), 3] = -1, e
    return x, expert, w1, w3, w2


@needs_kernel
def test_the_kernel_builds_on_a_machine_with_a_compiler():
    assert cpu_kernels.routed_experts_available()


@needs_kernel
@pytest.mark.parametrize("limit", [None, 0.5])
@pytest.mark.parametrize("split", [1, 3, 23])  # one task per expert and phase; uneven chunks; one row of W2 each
@pytest.mark.parametrize("tokens", [3, 11])  # 11 tokens × 4 of 9 experts: groups of 1 to 11 rows per expert
def test_kernel_matches_a_float64_loop(limit, split, tokens):
    assert cpu_kernels.routed_experts_available()
    x, expert, w1, w3, w2 = random_case(0, t=tokens)
    if tokens > 3:
        assert np.bincount(expert[(expert >= 0) & (expert < 9)]).max() > 4  # more rows than a block of 4
    out = jax.jit(cpu_kernels.routed_experts, static_argnums=(5, 6))(x, expert, w1, w3, w2, limit, split)
    expected = np_rows(x, expert, w1, w3, w2, limit)
    if limit is not None:  # the clamp is active on part of the pre-activations
        assert 0.05 < np.mean(np.einsum("TD,EDM->TEM", x, w1) > limit) < 0.5
    assert out.shape == expected.shape and out.dtype == jnp.float32
    np.testing.assert_array_equal(out[0, 1], 0.0)
    np.testing.assert_array_equal(out[2, 3], 0.0)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("tokens", [2, 3])  # 8 rows ≤ 9 experts: derivative through the scan; 12: through 'sorted'
def test_gather_dispatch_runs_the_kernel_on_cpu_and_its_gradients_match_the_scans(tokens):
    assert cpu_kernels.routed_experts_available()
    x, expert, w1, w3, w2 = random_case(1, t=tokens)
    hlo = jax.jit(md.gathered_experts).lower(x, expert, w1, w3, w2).as_text()
    assert cpu_kernels.TARGET in hlo
    cot = np.random.default_rng(2).normal(size=(*expert.shape, x.shape[1])).astype(np.float32)

    def loss(fn, x, w1, w3, w2):
        return jnp.sum(fn(x, expert, w1, w3, w2, limit=0.5) * cot)

    value, grads = jax.jit(jax.value_and_grad(lambda *a: loss(md.gathered_experts, *a), argnums=(0, 1, 2, 3)))(
        x, w1, w3, w2
    )
    value_ref, grads_ref = jax.jit(jax.value_and_grad(lambda *a: loss(md.scanned_experts, *a), argnums=(0, 1, 2, 3)))(
        x, w1, w3, w2
    )
    np.testing.assert_allclose(value, value_ref, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)


def test_default_split_and_bad_split():
    assert cpu_kernels.default_split(37, 23) == 1
    assert cpu_kernels.default_split(512, 256) == 2  # small_v4: 512 KB per expert matrix, 256 KB per task
    assert cpu_kernels.default_split(7168, 2048) == 64  # DeepSeek-V3: capped
    assert cpu_kernels.default_split(512, 256, rows=96) == 2  # small_v4 at batch 16: 0.8 MB of partial sums
    assert cpu_kernels.default_split(7168, 2048, rows=8) == 46  # 8 rows · 46 · 11264 floats ≤ 16 MiB
    assert cpu_kernels.default_split(7168, 2048, rows=2048) == 1
    x, expert, w1, w3, w2 = random_case(0)
    with pytest.raises(ValueError, match=re.escape("split=24 must lie in [1, min(D, M) = 23]")):
        cpu_kernels.routed_experts(x, expert, w1, w3, w2, None, split=24)


def test_bfloat16_operands_keep_the_xla_path():
    x, expert, w1, w3, w2 = (a.astype(jnp.bfloat16) if a.dtype == np.float32 else a for a in random_case(3))
    hlo = jax.jit(md.gathered_experts).lower(x, expert, w1, w3, w2).as_text()
    assert cpu_kernels.TARGET not in hlo


def test_a_missing_compiler_is_a_clear_error(tmp_path: pathlib.Path):
    with pytest.raises(RuntimeError, match=re.escape("no C++ compiler 'no-such-c++' on PATH")):
        cpu_kernels.build(cpu_kernels.SOURCE, tmp_path, compiler="no-such-c++")
    assert not list(tmp_path.iterdir())


@needs_kernel
def test_a_failed_build_quotes_the_compiler_and_leaves_no_library(tmp_path: pathlib.Path):
    broken = tmp_path / "broken.cc"
    broken.write_text("this is not C++;\n")
    with pytest.raises(RuntimeError, match="building broken.cc with .* failed:\n.*error"):
        cpu_kernels.build(broken, tmp_path / "out")
    assert not list((tmp_path / "out").iterdir())


def random_shared(seed, d=37, s=29):
    """A shared expert's (sw1 [D, S], sw3 [D, S], sw2 [S, D]), float32, S unlike the routed M."""
    rng = np.random.default_rng(seed)
    sw1, sw3 = (rng.normal(size=(d, s)).astype(np.float32) / np.float32(np.sqrt(d)) for _ in range(2))
    return sw1, sw3, rng.normal(size=(s, d)).astype(np.float32) / np.float32(np.sqrt(s))


@needs_kernel
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("tokens", [1, 3, 11])
def test_kernel_with_a_shared_expert_matches_a_float64_loop(split, tokens):
    """The shared expert runs on every token as slot K of the output, the routed slots as without it."""
    assert cpu_kernels.routed_experts_available()
    x, expert, w1, w3, w2 = random_case(4, t=max(tokens, 3))
    x, expert = x[:tokens], expert[:tokens]
    shared = random_shared(5)
    fn = jax.jit(cpu_kernels.routed_experts, static_argnums=(5, 6))
    out = fn(x, expert, w1, w3, w2, 0.5, split, shared)
    routed = np_rows(x, expert, w1, w3, w2, 0.5)
    own = np_rows(x, np.zeros((tokens, 1), np.int32), *(w[None] for w in shared), 0.5)
    assert out.shape == (tokens, expert.shape[1] + 1, x.shape[1])
    np.testing.assert_allclose(out, np.concatenate([routed, own], axis=1), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_gather_dispatch_with_a_shared_expert_and_its_gradients():
    """`gathered_experts(..., shared=...)` runs the shared kernel; values and gradients (of x, the routed and
    the shared weights) equal the scans: the routed rows, and the shared expert as a stack of one."""
    assert cpu_kernels.routed_experts_available()
    x, expert, w1, w3, w2 = random_case(6, t=3)
    shared = random_shared(7)
    cot = np.random.default_rng(8).normal(size=(3, expert.shape[1] + 1, x.shape[1])).astype(np.float32)
    hlo = jax.jit(lambda *a: md.gathered_experts(*a, shared=shared)).lower(x, expert, w1, w3, w2).as_text()
    assert cpu_kernels.SHARED_TARGET in hlo

    def ours(x, w1, w3, w2, *shared):
        return jnp.sum(md.gathered_experts(x, expert, w1, w3, w2, limit=0.5, shared=shared) * cot)

    def scans(x, w1, w3, w2, *shared):
        routed = md.scanned_experts(x, expert, w1, w3, w2, limit=0.5)
        own = md.scanned_experts(x, jnp.zeros((3, 1), jnp.int32), *(w[None] for w in shared), limit=0.5)
        return jnp.sum(jnp.concatenate([routed, own], axis=1) * cot)

    args, argnums = (x, w1, w3, w2, *shared), tuple(range(7))
    value, grads = jax.jit(jax.value_and_grad(ours, argnums))(*args)
    value_ref, grads_ref = jax.jit(jax.value_and_grad(scans, argnums))(*args)
    np.testing.assert_allclose(value, value_ref, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)
