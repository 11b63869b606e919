"""Token samplers against a float64 NumPy reference of the filtered, renormalised softmax."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from v4jax.sampling.samplers import filter_logits, sample

# Small-vocabulary logits with no ties and well-separated cumulative masses (see `reference_probs`).
LOGITS = np.array(
    [
        [2.0, -1.0, 0.5, 1.3, -0.2, 3.1, 0.0, -2.5],
        [0.1, 0.4, -0.3, 0.9, 1.7, -1.1, 0.6, 0.2],
        [-3.0, 1.0, 1.5, -0.5, 0.7, 2.2, -1.4, 0.3],
    ],
    np.float32,
)
SETTINGS = [  # (temperature, top_k, top_p)
    (1.0, None, None),
    (0.7, 5, None),
    (1.3, None, 0.8),
    (2.0, 6, 0.7),
    (0.5, 3, 0.95),
]


def reference_probs(logits, temperature, top_k, top_p):
    """float64 [B, V]: softmax(logits / T) restricted to the top_k, then to the nucleus, renormalised."""
    out = np.zeros(logits.shape, np.float64)
    for b, row in enumerate(logits.astype(np.float64) / temperature):
        order = list(np.argsort(-row))
        keep = order[: top_k or len(order)]
        if top_p is not None:
            p = np.exp(row[keep] - row[keep].max())
            p /= p.sum()
            mass, nucleus = 0.0, []
            for token, pt in zip(keep, p, strict=True):
                nucleus.append(token)
                mass += pt
                if mass >= top_p:
                    # float32 cumulative sums must not be able to land on the other side of top_p
                    assert abs(mass - top_p) > 1e-4 and abs(mass - pt - top_p) > 1e-4
                    break
            keep = nucleus
        e = np.exp(row[keep] - row[keep].max())
        out[b, keep] = e / e.sum()
    return out


def test_greedy_is_argmax_and_needs_no_key():
    logits = jax.random.normal(jax.random.key(1), (4, 50))
    np.testing.assert_array_equal(sample(logits, None, temperature=0.0), np.argmax(np.asarray(logits), -1))
    assert sample(logits, None, temperature=0.0).dtype == jnp.int32
    greedy = jax.jit(functools.partial(sample, temperature=0.0, top_k=3, top_p=0.5))
    np.testing.assert_array_equal(greedy(logits, None), np.argmax(np.asarray(logits), -1))


@pytest.mark.parametrize("temperature", [0.3, 1.0, 10.0])
def test_top_k_1_is_argmax_at_any_temperature(temperature):
    logits = jax.random.normal(jax.random.key(2), (6, 40))
    draws = jax.vmap(lambda k: sample(logits, k, temperature=temperature, top_k=1))(
        jax.random.split(jax.random.key(3), 50)
    )
    np.testing.assert_array_equal(draws, np.broadcast_to(np.argmax(np.asarray(logits), -1), (50, 6)))


@pytest.mark.parametrize("temperature, top_k, top_p", SETTINGS)
def test_filtered_softmax_matches_float64_reference(temperature, top_k, top_p):
    got = jax.nn.softmax(filter_logits(jnp.asarray(LOGITS), temperature=temperature, top_k=top_k, top_p=top_p))
    want = reference_probs(LOGITS, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.asarray(got) > 0, want > 0)  # the same kept set
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)  # float32 softmax


@pytest.mark.parametrize("temperature, top_k, top_p", SETTINGS)
def test_empirical_distribution_matches_reference(temperature, top_k, top_p):
    """20k draws per row: total variation to the float64 reference < 0.02 (its sampling noise is ~0.01 at
    V=8), and no draw outside the kept set. The reference must differ from the plain softmax by more than
    the tolerance whenever something is filtered, so a sampler that ignored the filters would fail."""
    n = 20_000
    draw = jax.jit(jax.vmap(functools.partial(sample, temperature=temperature, top_k=top_k, top_p=top_p), (None, 0)))
    tokens = np.asarray(draw(jnp.asarray(LOGITS), jax.random.split(jax.random.key(0), n)))  # [n, B]
    want = reference_probs(LOGITS, temperature, top_k, top_p)
    plain = reference_probs(LOGITS, 1.0, None, None)
    for b in range(LOGITS.shape[0]):
        freq = np.bincount(tokens[:, b], minlength=LOGITS.shape[1]) / n
        assert np.all(freq[want[b] == 0] == 0), f"row {b} drew filtered tokens: {freq}"
        tv = 0.5 * np.abs(freq - want[b]).sum()
        assert tv < 0.02, f"row {b}: total variation {tv:.4f} (empirical {freq}, reference {want[b]})"
        if (temperature, top_k, top_p) != (1.0, None, None):
            assert 0.5 * np.abs(plain[b] - want[b]).sum() > 0.05


def test_bad_arguments_are_named():
    logits, key = jnp.zeros((2, 8)), jax.random.key(0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        sample(logits, key, temperature=-0.5)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        sample(logits, key, temperature=float("nan"))
    for top_k in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="top_k must be an integer >= 1"):
            sample(logits, key, temperature=1.0, top_k=top_k)
    for top_p in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"top_p must lie in \(0, 1\]"):
            sample(logits, key, temperature=1.0, top_p=top_p)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        sample(logits, None, temperature=0.8)
    with pytest.raises(ValueError, match="needs temperature > 0"):
        filter_logits(logits, temperature=0.0)
    with pytest.raises(AssertionError):  # chex: logits must be [B, V]
        sample(jnp.zeros((8,)), key, temperature=1.0)
