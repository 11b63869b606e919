"""Token samplers: next-token ids from the last position's logits, for `generate`.

    sample(logits [B, V] float32, key, *, temperature, top_k=None, top_p=None) -> tokens [B] int32

`temperature == 0` is greedy argmax (no key needed). Otherwise the logits are divided by the temperature,
filtered by top-k and then by nucleus (top-p) on what top-k kept, and one token per row is drawn with
`jax.random.categorical`. The filters replace dropped logits by -inf (`filter_logits`, exposed for tests).

The three settings are Python scalars, checked in Python before tracing: bind them with
`functools.partial` (or mark them static) when jitting. Ties at a filter's boundary are all kept (the
filters compare against a threshold logit), so top-k may keep more than k tokens when logits tie.
"""

from __future__ import annotations

import numbers
from typing import Any

import chex
import jax
import jax.numpy as jnp


def check_settings(temperature: float, top_k: int | None, top_p: float | None, key: Any = "unchecked") -> None:
    """Raise a ValueError naming the bad sampler setting (and a missing key when temperature > 0)."""
    if not temperature >= 0:  # also rejects NaN
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1] or be None, got {top_p!r}")
    if temperature > 0 and key is None:
        raise ValueError(f"temperature={temperature} > 0 samples, so it needs a PRNG key (got key=None)")


def filter_logits(
    logits: jax.Array, *, temperature: float, top_k: int | None = None, top_p: float | None = None
) -> jax.Array:
    """logits [B, V] -> float32 [B, V]: divided by `temperature` (> 0), top-k then top-p filtered (-inf)."""
    check_settings(temperature, top_k, top_p)
    if temperature == 0:
        raise ValueError("filter_logits needs temperature > 0 (temperature 0 is greedy: use sample)")
    chex.assert_rank(logits, 2)
    x = logits.astype(jnp.float32) / temperature
    if top_k is not None and top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, int(top_k))[0][:, -1:]  # [B, 1], the k-th largest logit
        x = jnp.where(x >= kth, x, -jnp.inf)
    if top_p is not None and top_p < 1:
        # keep a token iff the probability of the tokens ranked strictly above it is < top_p: the smallest
        # prefix of the sorted distribution whose mass reaches top_p (the top token always has 0 above it)
        x_sorted = -jnp.sort(-x, axis=-1)  # [B, V] descending
        p_sorted = jax.nn.softmax(x_sorted, axis=-1)
        mass_above = jnp.cumsum(p_sorted, axis=-1) - p_sorted
        kept = mass_above < top_p
        threshold = jnp.min(jnp.where(kept, x_sorted, jnp.inf), axis=-1, keepdims=True)  # [B, 1]
        x = jnp.where(x >= threshold, x, -jnp.inf)
    return x


def sample(
    logits: jax.Array,
    key: jax.Array | None,
    *,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
) -> jax.Array:
    """logits [B, V] -> token ids int32 [B]; greedy when `temperature == 0`, else one categorical draw per row."""
    check_settings(temperature, top_k, top_p, key)
    chex.assert_rank(logits, 2)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)
