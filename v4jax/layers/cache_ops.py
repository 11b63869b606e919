"""Position-addressed updates of inference caches (MLA latents, V4 sliding windows, compressor buffers).

A cache row b holds the state after `start[b]` tokens. One call appends `count[b]` ≤ T new tokens at
positions start[b] .. start[b] + count[b] - 1 (positions [B, T] = start + 0..T-1); the tokens past `count`
are padding of a ragged batch and are never written. Rows advance independently, so prompts of different
lengths keep contiguous positions from 0 (no left padding).

Two layouts:
  position-indexed  [B, S, ...]  slot s holds position s (MLA latents, indexer keys, compressed entries)
  ring of size R    [B, R, ...]  slot j holds the latest position p ≡ j (mod R) (V4 window, pending tokens)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def valid_tokens(count: jax.Array, t: int) -> jax.Array:
    """bool [B, T]: which of the T new tokens of each row are real (index < count[b])."""
    return jnp.arange(t)[None, :] < count[:, None]


def write_at(cache: jax.Array, values: jax.Array, slots: jax.Array, keep: jax.Array) -> jax.Array:
    """cache [B, S, ...] with values [B, T, ...] written at slots [B, T] where keep [B, T]; others untouched."""
    b, s = cache.shape[:2]
    index = jnp.where(keep, slots, s)  # out of range: dropped
    return cache.at[jnp.arange(b)[:, None], index].set(values.astype(cache.dtype), mode="drop")


def ring_in_order(ring: jax.Array, start: jax.Array) -> jax.Array:
    """The R slots of a ring [B, R, ...] in position order: row k holds position start - R + k."""
    r = ring.shape[1]
    slots = (start[:, None] - r + jnp.arange(r)[None, :]) % r
    return jnp.take_along_axis(ring, slots.reshape(slots.shape + (1,) * (ring.ndim - 2)), axis=1)


def latest_ring(ordered: jax.Array, first: jax.Array, end: jax.Array, size: int) -> jax.Array:
    """A ring [B, size, ...] from a position-ordered buffer [B, L, ...] whose row k holds position first + k:
    slot j gets the latest position p ≡ j (mod size) with p < end (slots without one get any row)."""
    j = jnp.arange(size)[None, :]
    latest = end[:, None] - 1 - (end[:, None] - 1 - j) % size
    rows = jnp.clip(latest - first[:, None], 0, ordered.shape[1] - 1)
    return jnp.take_along_axis(ordered, rows.reshape(rows.shape + (1,) * (ordered.ndim - 2)), axis=1)
