"""Inference state and the jitted steps that advance it: chunked prefill and single-token decoding.

    cache = new_cache(cfg, batch, max_length)       {'layers': per-layer state, 'length': int32 [B]}
    logits, cache = extend(cfg, params, cache, tokens [B,T], count [B])     all T positions, float32 [B,T,V]
    logits, cache = prefill(cfg, params, cache, prompts [B,T], lengths [B])  last real token's [B,V]
    logits, cache = decode_step(cfg, params, cache, tokens [B], active [B])  [B,V]

Row b of the cache holds the state after `length[b]` tokens at positions 0..length[b]-1; each call appends
the next tokens of every row at its own positions, so prompts of different lengths need no left padding
(V4's compressors and windows need contiguous positions from 0). The per-layer state is each attention's:
MLA's latent c_kv + shared rope key (+ V3.2 indexer keys), V4's window ring, compressed entries,
compressor rings (pending and overlap tokens) and CSA indexer keys (`v4jax.layers.attention_*`,
`compressor`). The cache is donated to every step and comes back updated; shapes never change, so each
step compiles once per (batch, max_length, chunk). The steps run on the inference parameter layout
(`inference_params`, one array per layer); the public functions here convert stacked parameters on entry,
so convert once yourself when calling them repeatedly.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from v4jax import model
from v4jax import sharding as shd
from v4jax.config import ModelConfig
from v4jax.model import Transformer, split_collections

PREFILL_CHUNK = 256  # prompt tokens per prefill call: activations grow with the chunk, not the prompt


def new_cache(cfg: ModelConfig, batch: int, max_length: int) -> dict[str, Any]:
    """An empty cache for `batch` sequences of up to `max_length` tokens (prompt + generated)."""
    if max_length > cfg.max_position_embeddings:
        raise ValueError(
            f"max_length {max_length} exceeds ModelConfig.max_position_embeddings={cfg.max_position_embeddings}"
        )
    return {"layers": model.empty_cache(cfg, batch, max_length), "length": jnp.zeros((batch,), jnp.int32)}


def inference_params(cfg: ModelConfig, params: dict[str, Any]) -> dict[str, Any]:
    """`params` in the inference layout (`model.unstack_layers`); parameters already in it are returned as is."""
    return params if model.is_unstacked(params) else model.unstack_layers(cfg, params)


def cache_shardings(cache: dict[str, Any], mesh: jax.sharding.Mesh, preset: str) -> dict[str, Any]:
    """NamedShardings splitting a cache's batch over the mesh axes that carry the batch (`act_batch`) in the
    rule preset, as `make_forward` splits tokens. Place a cache with `jax.device_put(cache, shardings)`;
    the jitted steps keep that layout (params placed by `model.shard_params`)."""
    batch = shd.logical_to_spec((shd.ACT_BATCH,), shd.rules(preset))[0]

    def sharding(leaf):  # every leaf is [B, ...]
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(batch, *([None] * (leaf.ndim - 1))))

    return jax.tree.map(sharding, cache)


def _logits_at(transformer: Transformer, streams: jax.Array, index: jax.Array) -> jax.Array:
    """float32 logits [B, V] of the positions index [B] of streams [B, T, R, D]."""
    picked = jnp.take_along_axis(streams, index[:, None, None, None], axis=1)  # [B, 1, R, D]
    return transformer.logits(picked)[:, 0]


def advance(cfg: ModelConfig, params, cache, tokens, count, last_only: bool = True):
    """The traceable step under `extend` / `prefill` / `decode_step`: params in the inference layout
    (`inference_params`), tokens int32 [B,T], count int32 [B] -> (logits float32 [B,V] after each row's last
    real token if `last_only`, else [B,T,V]; cache)."""
    if not model.is_unstacked(params):
        raise ValueError(
            "the decoding steps take parameters in the inference layout: engine.inference_params(cfg, params)"
        )
    b, t = tokens.shape
    positions = cache["length"][:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    transformer = Transformer(cfg)

    def body(module: Transformer):
        streams, layers = module.extend(module.embed(tokens), positions, tokens, count, cache["layers"])
        if last_only:
            logits = _logits_at(module, streams, jnp.maximum(count - 1, 0))
        else:
            logits = module.logits(streams)
        return logits, layers

    logits, layers = transformer.apply(split_collections(params), method=body)
    return logits, {"layers": layers, "length": cache["length"] + count}


# XLA options of the jitted decoding steps: copy insertion by region analysis, without which XLA:CPU copied
# each layer's donated cache before writing the new tokens into it (the CPU option; other backends ignore it)
COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}
# ... and of the generation loops, whose products have a few rows: also without XLA:CPU's YNNPACK dot fusions,
# which cost more than they save there (A/B of `generate`: `small` 7.61 → 7.15 ms a step at batch 1, 46.7 →
# 45.0 at 16; `small_v4` 7.64 → 7.59 and 48.9 → 46.6) but not in a prefill of many tokens (`small_v4`, 512
# tokens: 631 ms with them, 715 ms without), and with single-threaded Eigen, whose thread hand-offs cost more
# than they save on few-row matrix products (A/B: `small_v4` 6.95 → 6.86 ms at batch 1, 46.1 → 44.8 at 16;
# `small` 5.77 → 5.66 and 37.9 → 38.6; tiny_v4 0.157 → 0.144, its speculative pass 0.28 → 0.25)
LOOP_COMPILER_OPTIONS = COMPILER_OPTIONS | {
    "xla_cpu_experimental_ynn_fusion_type": "",
    "xla_cpu_multi_thread_eigen": False,
}

_extend = jax.jit(
    advance, static_argnames=("cfg", "last_only"), donate_argnames=("cache",), compiler_options=COMPILER_OPTIONS
)


def _check_step_inputs(cfg: ModelConfig, cache: dict[str, Any], tokens: Any, count: Any) -> tuple[jax.Array, jax.Array]:
    tokens = jnp.asarray(tokens)
    b = cache["length"].shape[0]
    if tokens.ndim != 2 or tokens.shape[0] != b:
        raise ValueError(f"tokens must be [batch={b}, T], got shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    count = jnp.asarray(count, jnp.int32)
    chex.assert_shape(count, (b,))
    return tokens.astype(jnp.int32), count


def extend(
    cfg: ModelConfig, params: dict[str, Any], cache: dict[str, Any], tokens: Any, count: Any = None
) -> tuple[jax.Array, dict[str, Any]]:
    """Append tokens [B, T] (the first count[b] of row b are real; default all) -> (logits float32 [B,T,V] at
    every new position, cache). The cache passed in is donated (invalid afterwards)."""
    count = np.full((np.shape(tokens)[0],), np.shape(tokens)[1]) if count is None else count
    tokens, count = _check_step_inputs(cfg, cache, tokens, count)
    return _extend(cfg, inference_params(cfg, params), cache, tokens, count, last_only=False)


def prefill(
    cfg: ModelConfig,
    params: dict[str, Any],
    cache: dict[str, Any],
    prompts: Any,
    lengths: Any,
    chunk: int = PREFILL_CHUNK,
) -> tuple[jax.Array, dict[str, Any]]:
    """Feed prompts [B, T] (row b's first lengths[b] ids are its prompt) in chunks of `chunk` tokens.

    Returns (float32 logits [B, V] after each prompt's last token, cache). Every chunk call has the same
    shape, so a prompt of any length compiles one program. Rows whose prompt ended wait (count 0).
    """
    prompts = np.asarray(prompts)
    lengths = np.asarray(lengths, np.int32)
    b, t = prompts.shape
    chunk = max(1, min(chunk, t))
    padded = -(-t // chunk) * chunk
    prompts = np.pad(prompts, ((0, 0), (0, padded - t)))
    params, logits = inference_params(cfg, params), None
    for start in range(0, padded, chunk):
        count = np.clip(lengths - start, 0, chunk).astype(np.int32)
        tokens, count_j = _check_step_inputs(cfg, cache, prompts[:, start : start + chunk], count)
        step_logits, cache = _extend(cfg, params, cache, tokens, count_j, last_only=True)
        ends_here = jnp.asarray((lengths > start) & (lengths <= start + chunk))[:, None]
        logits = step_logits if logits is None else jnp.where(ends_here, step_logits, logits)
    return logits, cache


def decode_step(
    cfg: ModelConfig, params: dict[str, Any], cache: dict[str, Any], tokens: Any, active: Any = None
) -> tuple[jax.Array, dict[str, Any]]:
    """Append one token per row (tokens [B]; rows with active[b] False are left as they are) ->
    (float32 logits [B, V] for the next token, cache)."""
    tokens = jnp.asarray(tokens)[:, None]
    count = jnp.ones(tokens.shape[:1], jnp.int32) if active is None else jnp.asarray(active).astype(jnp.int32)
    tokens, count = _check_step_inputs(cfg, cache, tokens, count)
    return _extend(cfg, inference_params(cfg, params), cache, tokens, count, last_only=True)
