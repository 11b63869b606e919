"""Text generation: prefill the prompts, then a jitted `lax.while_loop` of decode steps and samplers.

    generate(cfg, params, prompts, max_new_tokens, *, temperature=0.0, key=None, top_k=None, top_p=None,
             stop_tokens=()) -> [[generated ids] per prompt]
    stream(cfg, params, prompt, max_new_tokens, ...) -> iterator of ids, one prompt, as they are decoded

Prompts of different lengths share one batch without left padding: each row decodes at its own positions
(`v4jax.sampling.engine`). A row stops after `max_new_tokens` tokens or after emitting a stop token (which
is included in its output); the loop ends when every row has stopped. All checks on the prompts (empty,
token ids outside the vocabulary, too long for the model) run before anything is compiled.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from v4jax.config import ModelConfig
from v4jax.sampling import engine
from v4jax.sampling.samplers import check_settings, sample


def check_prompts(cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> np.ndarray:
    """Validate prompts (lists of token ids) and the length budget; returns their lengths int32 [B]."""
    if isinstance(prompts, (str, bytes)) or not len(prompts):
        raise ValueError("prompts must be a non-empty list of token-id lists")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    lengths = []
    for i, prompt in enumerate(prompts):
        ids = np.asarray(prompt)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"prompt {i} must be a non-empty list of token ids, got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"prompt {i} must hold integer token ids, got dtype {ids.dtype}")
        bad = ids[(ids < 0) | (ids >= cfg.vocab_size)]
        if bad.size:
            raise ValueError(f"prompt {i}: token id {int(bad[0])} is outside the vocabulary [0, {cfg.vocab_size})")
        if ids.size + max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(
                f"prompt {i} has {ids.size} tokens; with max_new_tokens={max_new_tokens} that exceeds "
                f"ModelConfig.max_position_embeddings={cfg.max_position_embeddings}"
            )
        lengths.append(ids.size)
    return np.asarray(lengths, np.int32)


def check_stop_tokens(cfg: ModelConfig, stop_tokens: Sequence[int]) -> np.ndarray:
    """The stop tokens as int32 [K], checked against the vocabulary."""
    stops = np.asarray(sorted(set(int(s) for s in stop_tokens)), np.int32)
    if stops.size and (stops.min() < 0 or stops.max() >= cfg.vocab_size):
        raise ValueError(f"stop_tokens {stops.tolist()} must lie in the vocabulary [0, {cfg.vocab_size})")
    return stops


def prefill_prompts(
    cfg: ModelConfig,
    params: dict[str, Any],
    prompts: Sequence[Sequence[int]],
    lengths: np.ndarray,
    capacity: int,
    chunk: int = engine.PREFILL_CHUNK,
) -> tuple[jax.Array, dict[str, Any]]:
    """A new cache of `capacity` tokens per row with the (checked) prompts prefilled -> (logits [B, V] after
    each prompt, cache)."""
    padded = np.zeros((len(prompts), int(lengths.max())), np.int32)
    for i, prompt in enumerate(prompts):
        padded[i, : lengths[i]] = prompt
    cache = engine.new_cache(cfg, len(prompts), capacity)
    return engine.prefill(cfg, params, cache, padded, lengths, chunk)


def generate(
    cfg: ModelConfig,
    params: dict[str, Any],
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    key: jax.Array | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    prefill_chunk: int = engine.PREFILL_CHUNK,
) -> list[list[int]]:
    """Generate up to `max_new_tokens` ids after each prompt; greedy when temperature is 0."""
    lengths = check_prompts(cfg, prompts, max_new_tokens)
    check_settings(temperature, top_k, top_p, key)
    stops = check_stop_tokens(cfg, stop_tokens)
    b, params = len(prompts), engine.inference_params(cfg, params)
    logits, cache = prefill_prompts(cfg, params, prompts, lengths, int(lengths.max()) + max_new_tokens, prefill_chunk)
    key = jax.random.key(0) if key is None else key  # unused when greedy
    out, n = _decode_loop(
        cfg, params, cache, logits, key, jnp.asarray(stops), max_new_tokens, temperature, top_k, top_p
    )
    out, n = np.asarray(out), np.asarray(n)
    return [out[i, : n[i]].tolist() for i in range(b)]


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "steps", "temperature", "top_k", "top_p"),
    compiler_options=engine.LOOP_COMPILER_OPTIONS,
)
def _decode_loop(cfg, params, cache, logits, key, stops, steps, temperature, top_k, top_p):
    """Sample, append, repeat: -> (tokens int32 [B, steps], number generated per row [B])."""
    b = logits.shape[0]
    pick = functools.partial(sample, temperature=temperature, top_k=top_k, top_p=top_p)

    def sample_next(i, out, done, n, logits, key):  # token i of every row still going (0 for finished rows)
        key, sub = jax.random.split(key)
        token = jnp.where(done, 0, pick(logits, sub))
        n = n + (~done).astype(jnp.int32)
        return token, out.at[:, i].set(token), done | jnp.isin(token, stops), n, key

    def cond(state):
        i, _, done, *_ = state
        return (i < steps - 1) & ~jnp.all(done)

    def body(state):
        i, out, done, n, cache, logits, key = state
        token, out, done, n, key = sample_next(i, out, done, n, logits, key)
        logits, cache = engine.advance(cfg, params, cache, token[:, None], (~done).astype(jnp.int32))
        return i + 1, out, done, n, cache, logits, key

    # the loop runs the forward passes; the last token needs none (a `lax.cond` skipping it made XLA copy
    # weights and cache buffers in every step), so it is sampled after the loop
    state = (0, jnp.zeros((b, steps), jnp.int32), jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32), cache, logits, key)
    i, out, done, n, _, logits, key = jax.lax.while_loop(cond, body, state)
    _, out, _, n, _ = sample_next(i, out, done, n, logits, key)
    return out, n


def stream(
    cfg: ModelConfig,
    params: dict[str, Any],
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    key: jax.Array | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    prefill_chunk: int = engine.PREFILL_CHUNK,
) -> Iterator[int]:
    """Yield the ids `generate` would give for one prompt, each as soon as it is decoded (for streamed output).

    The same tokens as `generate(cfg, params, [prompt], ...)` with the same key; each step is one jitted
    call (sample, then append the token) instead of one loop on the device."""
    lengths = check_prompts(cfg, [prompt], max_new_tokens)
    check_settings(temperature, top_k, top_p, key)
    stops = set(check_stop_tokens(cfg, stop_tokens).tolist())
    params = engine.inference_params(cfg, params)
    logits, cache = prefill_prompts(cfg, params, [prompt], lengths, int(lengths[0]) + max_new_tokens, prefill_chunk)
    # committed like the step's outputs, so the first step and the later ones compile to one program
    key, logits = jax.device_put((jax.random.key(0) if key is None else key, logits), jax.devices()[0])
    for i in range(max_new_tokens):
        last = i + 1 == max_new_tokens
        token, logits, cache, key = sample_and_append(cfg, params, cache, logits, key, temperature, top_k, top_p, last)
        token = int(token[0])
        yield token
        if token in stops:
            return


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "temperature", "top_k", "top_p", "last"),
    donate_argnames=("cache",),
    compiler_options=engine.LOOP_COMPILER_OPTIONS,
)
def sample_and_append(cfg, params, cache, logits, key, temperature, top_k, top_p, last):
    """One step of `stream`, with the same key schedule as `_decode_loop`."""
    key, sub = jax.random.split(key)
    token = sample(logits, sub, temperature=temperature, top_k=top_k, top_p=top_p)
    if not last:
        logits, cache = engine.advance(cfg, params, cache, token[:, None], jnp.ones_like(token))
    return token, logits, cache, key
