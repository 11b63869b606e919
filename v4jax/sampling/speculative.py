"""Self-speculative greedy decoding: the model's first MTP module drafts one token, the main model verifies it.

Per step, with the main cache holding positions ..p and x the main model's greedy token for p+1:
    draft     d = argmax MTP(h_p, x)              the MTP block appends position p to its own cache
    verify    main model on [x, d] at p+1, p+2    logits l1 (for p+2), l2 (for p+3), streams h_p+1, h_p+2
    accept    d == argmax l1: emit x, d; next x = argmax l2                      (2 tokens for one pass)
    reject    emit x; next x = argmax l1; the main cache drops position p+2 by lowering its length
Every emitted token is the main model's greedy choice, so the output equals plain greedy decoding. Rolling
one token back is exact for every cache: its slots (MLA position p+2, the V4 window and compressor rings)
are rewritten before anything reads them, and an entry it completed is pooled again when its window
completes (`v4jax.layers.compressor.CompressorState`). The MTP cache lags the main cache by one position:
MTP position q needs h_q and the token at q+1.

    tokens, stats = speculative_generate(cfg, params, prompts, max_new_tokens, stop_tokens=())
    stats: {'drafted': drafts that could be accepted, 'accepted': accepted drafts, 'steps': main passes}
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from v4jax import model
from v4jax.config import ModelConfig
from v4jax.model import Transformer, split_collections
from v4jax.sampling import engine
from v4jax.sampling.generate import check_prompts, check_stop_tokens


def _check_mtp(cfg: ModelConfig, params: dict[str, Any]) -> None:
    if cfg.num_nextn_predict_layers < 1 or "mtp_0" not in params:
        raise ValueError(
            "speculative decoding drafts with MTP module 1: the config needs num_nextn_predict_layers >= 1 and "
            f"the parameters an 'mtp_0' subtree (num_nextn_predict_layers={cfg.num_nextn_predict_layers}, "
            f"mtp_0 {'present' if 'mtp_0' in params else 'absent'})"
        )


def _apply(cfg, params, body):
    return Transformer(cfg).apply(split_collections(params), method=body)


def _positions(length: jax.Array, t: int) -> jax.Array:
    return length[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]


@functools.partial(
    jax.jit, static_argnames=("cfg",), donate_argnames=("cache", "mtp"), compiler_options=engine.COMPILER_OPTIONS
)
def _prefill_chunk(cfg, params, cache, mtp, tokens, next_tokens, count, mtp_count):
    """One prompt chunk through the main model and the MTP block -> (logits [B,V] and streams [B,R,D] at each
    row's last real token, cache, mtp)."""
    positions = _positions(cache["length"], tokens.shape[1])

    def body(m: Transformer):
        streams, layers = m.extend(m.embed(tokens), positions, tokens, count, cache["layers"])
        _, mtp_layers = m.draft(streams, next_tokens, positions, mtp_count, mtp["layers"])
        last = jnp.take_along_axis(streams, jnp.maximum(count - 1, 0)[:, None, None, None], axis=1)
        return m.logits(last)[:, 0], last[:, 0], layers, mtp_layers

    logits, last, layers, mtp_layers = _apply(cfg, params, body)
    cache = {"layers": layers, "length": cache["length"] + count}
    return logits, last, cache, {"layers": mtp_layers, "length": mtp["length"] + mtp_count}


def speculative_generate(
    cfg: ModelConfig,
    params: dict[str, Any],
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    stop_tokens: Sequence[int] = (),
    prefill_chunk: int = engine.PREFILL_CHUNK,
) -> tuple[list[list[int]], dict[str, int]]:
    """Greedy generation with MTP drafts (see the module docstring) -> (token ids per prompt, stats)."""
    lengths = check_prompts(cfg, prompts, max_new_tokens + 1)  # verification runs one token ahead
    stops = check_stop_tokens(cfg, stop_tokens)
    _check_mtp(cfg, params)
    params = engine.inference_params(cfg, params)
    b, longest = len(prompts), int(lengths.max())
    capacity = longest + max_new_tokens + 1
    cache = engine.new_cache(cfg, b, capacity)
    mtp_layers = model.empty_layer_cache(cfg, model.mtp_layer_kind(cfg), b, capacity)
    mtp = {"layers": mtp_layers, "length": jnp.zeros((b,), jnp.int32)}
    chunk = max(1, min(prefill_chunk, longest))
    padded = np.zeros((b, -(-longest // chunk) * chunk + 1), np.int32)
    for i, prompt in enumerate(prompts):
        padded[i, : lengths[i]] = prompt
    logits = last = None
    for start in range(0, padded.shape[1] - 1, chunk):
        count = np.clip(lengths - start, 0, chunk).astype(np.int32)
        mtp_count = np.clip(lengths - 1 - start, 0, chunk).astype(np.int32)  # MTP position q needs token q+1
        step_logits, step_last, cache, mtp = _prefill_chunk(
            cfg, params, cache, mtp, jnp.asarray(padded[:, start : start + chunk]),
            jnp.asarray(padded[:, start + 1 : start + chunk + 1]), jnp.asarray(count), jnp.asarray(mtp_count),
        )  # fmt: skip
        ends = jnp.asarray((lengths > start) & (lengths <= start + chunk))
        logits = step_logits if logits is None else jnp.where(ends[:, None], step_logits, logits)
        last = step_last if last is None else jnp.where(ends[:, None, None], step_last, last)
    out, n, stats = _loop(cfg, params, cache, mtp, logits, last, jnp.asarray(stops), max_new_tokens)
    out, n = np.asarray(out), np.asarray(n)
    return [out[i, : n[i]].tolist() for i in range(b)], {k: int(v) for k, v in stats.items()}


@functools.partial(jax.jit, static_argnames=("cfg", "steps"), compiler_options=engine.LOOP_COMPILER_OPTIONS)
def _loop(cfg, params, cache, mtp, logits, last, stops, steps):
    """Draft, verify, accept or roll back, until every row has `steps` tokens or stopped."""
    b = logits.shape[0]
    x = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    backlog_h = jnp.stack([last, last], axis=1)  # [B, 2, R, D]: the MTP positions still to feed
    backlog_tok = jnp.stack([x, x], axis=1)  # [B, 2]
    backlog_n = jnp.ones((b,), jnp.int32)

    def body(state):
        out, n, done, cache, mtp, x, backlog_h, backlog_tok, backlog_n, stats = state
        active = ~done
        mtp_count = jnp.where(active, backlog_n, 0)
        verify_count = jnp.where(active, 2, 0)
        mtp_positions, positions = _positions(mtp["length"], 2), _positions(cache["length"], 2)

        def step(m: Transformer):
            draft_logits, mtp_layers = m.draft(backlog_h, backlog_tok, mtp_positions, mtp_count, mtp["layers"])
            d = jnp.argmax(draft_logits, axis=-1).astype(jnp.int32)
            tokens = jnp.stack([x, d], axis=1)
            streams, layers = m.extend(m.embed(tokens), positions, tokens, verify_count, cache["layers"])
            return d, jnp.argmax(m.logits(streams), axis=-1).astype(jnp.int32), streams, layers, mtp_layers

        d, y, streams, layers, mtp_layers = _apply(cfg, params, step)
        x_stops = jnp.isin(x, stops)
        can_draft = active & ~x_stops & (n + 2 <= steps)
        accepted = can_draft & (y[:, 0] == d)
        out = out.at[jnp.arange(b), n].set(jnp.where(active, x, out[jnp.arange(b), n]))
        out = out.at[jnp.arange(b), n + 1].set(jnp.where(accepted, d, out[jnp.arange(b), n + 1]))
        n = n + active.astype(jnp.int32) + accepted.astype(jnp.int32)
        kept = jnp.where(accepted, 2, 1) * active  # the rejected draft's position is dropped
        cache = {"layers": layers, "length": cache["length"] + kept}
        mtp = {"layers": mtp_layers, "length": mtp["length"] + mtp_count}
        done = done | x_stops | (accepted & jnp.isin(d, stops)) | (n >= steps)
        x = jnp.where(accepted, y[:, 1], y[:, 0])
        backlog_h = jnp.where(accepted[:, None, None, None], streams, streams[:, :1])
        backlog_tok = jnp.where(accepted[:, None], jnp.stack([d, y[:, 1]], 1), jnp.stack([y[:, 0], y[:, 0]], 1))
        backlog_n = jnp.where(accepted, 2, 1)
        stats = {
            "drafted": stats["drafted"] + jnp.sum(can_draft),
            "accepted": stats["accepted"] + jnp.sum(accepted),
            "steps": stats["steps"] + 1,
        }
        return out, n, done, cache, mtp, x, backlog_h, backlog_tok, backlog_n, stats

    zero = jnp.zeros((), jnp.int32)
    state = (
        jnp.zeros((b, steps + 1), jnp.int32), jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool), cache, mtp, x,
        backlog_h, backlog_tok, backlog_n, {"drafted": zero, "accepted": zero, "steps": zero},
    )  # fmt: skip
    out, n, *_, stats = jax.lax.while_loop(lambda s: ~jnp.all(s[2]), body, state)
    return out, n, stats
