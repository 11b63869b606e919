"""Shared benchmark helpers: timing, plus the MFU halves from `v4jax.flops` (re-exported)."""

from __future__ import annotations

import time
from collections.abc import Callable

import jax

from v4jax.flops import attention_flops_per_token, matmul_peak_flops, train_flops_per_token

__all__ = ["attention_flops_per_token", "best_time", "matmul_peak_flops", "train_flops_per_token"]


def best_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Best wall time in seconds of `fn()` (blocking on its result) after `warmup` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)
