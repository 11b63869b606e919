"""Sampling: inference caches, jitted prefill / decode steps, samplers and `generate`.

generate(cfg, params, prompts, max_new_tokens, *, temperature=0.0, key=None, ...)  token ids per prompt
engine: new_cache, extend, prefill, decode_step      the cache and the steps that advance it
samplers: sample, filter_logits                      greedy / temperature / top-k / top-p
"""

from v4jax.sampling import engine, samplers
from v4jax.sampling.engine import decode_step, extend, new_cache, prefill
from v4jax.sampling.generate import generate, stream
from v4jax.sampling.samplers import sample
from v4jax.sampling.speculative import speculative_generate

__all__ = [
    "decode_step",
    "engine",
    "extend",
    "generate",
    "new_cache",
    "prefill",
    "sample",
    "samplers",
    "speculative_generate",
    "stream",
]
