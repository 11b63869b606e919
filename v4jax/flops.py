"""Model FLOPs per training token and the machine's measured matmul peak: the two halves of MFU.

MFU = tokens/s · `train_flops_per_token` / `matmul_peak_flops`, the peak being a large square matmul timed
on the same machine (in the same process), so the ratio says how close the model's step runs to what this
hardware does on the best-case kernel.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from v4jax.config import ModelConfig
from v4jax.params import param_counts


def matmul_peak_flops(dtype=jnp.float32, size: int = 2048, repeats: int = 5) -> float:
    """Measured FLOP/s of a jitted square matmul of `size` in `dtype` (best of `repeats`, after a warm-up)."""
    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    b = jax.random.normal(jax.random.key(1), (size, size), dtype)
    f = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(f(a, b))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(a, b))
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def train_flops_per_token(cfg: ModelConfig, length: int) -> float:
    """Model FLOPs of one training token (forward + backward = 3x forward), MTP excluded.

    Weight matmuls: 2 FLOPs per active weight (the embedding and Engram table lookups are not matmuls).
    Attention: scores and values over the keys a token attends to on average, 2·N·(score dim + value dim) per
    key per layer.
    """
    _, active = param_counts(cfg)
    matmul_params = active - cfg.vocab_size * cfg.hidden_size - len(cfg.engram_layer_ids) * cfg.engram_dim
    return 3 * (2 * matmul_params + attention_flops_per_token(cfg, length))


def attention_flops_per_token(cfg: ModelConfig, length: int) -> float:
    """Forward attention FLOPs per token, averaged over a causal sequence of `length` tokens.

    MLA: T/2 keys of qk_head_dim scores and v_head_dim values. V4: the window (≤ W keys) plus, for CSA, the
    indexer's top-k of the T/(2·4) visible entries and, for HCA, all T/(2·128) visible entries; key = value
    width head_dim.
    """
    n = cfg.num_attention_heads
    if not cfg.is_v4:
        return 2 * n * (cfg.qk_head_dim + cfg.v_head_dim) * length / 2 * cfg.num_hidden_layers
    total = 0.0
    for layer_type in cfg.layer_types:
        keys = min(cfg.sliding_window, length / 2)
        if layer_type == "compressed_sparse_attention":
            keys += min(cfg.index_topk, length / 2 / cfg.compress_rate_csa)
        elif layer_type == "heavily_compressed_attention":
            keys += length / 2 / cfg.compress_rate_hca
        total += 2 * n * 2 * cfg.head_dim * keys
    return total
