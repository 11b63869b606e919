"""Forward+backward of the routed experts alone, per MoE dispatch, against this machine's matmul peak.

    python -m benchmarks.moe_dispatch --impls ragged,capacity,capacity@2.0,sorted,sorted@16,sorted@64

Times jit(value_and_grad) of Σ cotangent ⊙ routed_experts(x) w.r.t. x, the gating weights, w1, w3 and w2
at the `small` preset's size by default (T = 2×512 tokens, D=512, E=64, K=6, M=256, float32). 'capacity@F'
sets capacity_factor F (plain 'capacity' is dropless, X = T), 'sorted@S' the block size S. Routing is the
top-K of Gaussian logits plus a per-expert offset N(0, skew²) (`--skew`, default 0.5), so expert loads are
uneven as under a real router; the run prints them. Useful work is 9 · 2·T·K·D·M FLOPs (three matmuls
forward, six backward); GFLOP/s and the fraction of the float32 matmul peak measured in the same process
count only that work, so padding and dropped rows count as overhead. Timings alternate between the impls
over `--rounds` rounds and keep each one's best, which resists other jobs on the machine; the process CPU
time of the best call (all threads) is printed too, as a load-independent measure of the work done. Not a
test: results go to benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import matmul_peak_flops
from v4jax.layers import moe_dispatch as md


def routing(t: int, d: int, e: int, k: int, m: int, skew: float = 0.5, seed: int = 0):
    """float32 (x [T, D], weights [T, K], w1/w3 [E, D, M], w2 [E, M, D], cotangent [T, D]), int32 indices [T, K]."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(t, e)) + skew * rng.normal(size=e)
    indices = np.argsort(-logits, axis=-1)[:, :k]
    arrays = (
        rng.normal(size=(t, d)),
        rng.uniform(0.1, 1.0, size=(t, k)),
        rng.normal(0.0, d**-0.5, size=(e, d, m)),
        rng.normal(0.0, d**-0.5, size=(e, d, m)),
        rng.normal(0.0, m**-0.5, size=(e, m, d)),
        rng.normal(size=(t, d)),
    )
    return tuple(jnp.asarray(a, jnp.float32) for a in arrays), jnp.asarray(indices, jnp.int32)


def train_step(spec: str):
    """jit(value_and_grad) of the routed experts for 'impl', 'capacity@F' or 'sorted@S'."""
    impl, _, arg = spec.partition("@")
    factor = float(arg) if impl == "capacity" and arg else None
    block_size = int(arg) if impl == "sorted" and arg else md.SORTED_BLOCK_SIZE

    def loss(x, weights, w1, w3, w2, cotangent, indices):
        if impl == "sorted":
            y = md.sorted_dispatch(x, indices, weights, w1, w3, w2, block_size=block_size)
        else:
            y = md.routed_experts(x, indices, weights, w1, w3, w2, impl=impl, capacity_factor=factor)
        return jnp.sum(y * cotangent)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impls", default="ragged,capacity,capacity@2.0,sorted")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--topk", type=int, default=6)
    parser.add_argument("--expert-hidden", type=int, default=256)
    parser.add_argument("--skew", type=float, default=0.5, help="std of the per-expert logit offset")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per impl and round (best kept)")
    args = parser.parse_args()
    t, d, e, k, m = args.tokens, args.hidden, args.experts, args.topk, args.expert_hidden
    inputs, indices = routing(t, d, e, k, m, args.skew)
    load = np.bincount(np.asarray(indices).ravel(), minlength=e)
    useful = 9 * 2 * t * k * d * m
    print(
        f"backend {jax.default_backend()}; T={t} D={d} E={e} K={k} M={m}: {useful / 1e9:.1f} GFLOP of useful work; "
        f"rows per expert min {load.min()} mean {load.mean():.0f} max {load.max()}"
    )
    steps = {spec: train_step(spec) for spec in args.impls.split(",")}
    for step in steps.values():
        jax.block_until_ready(step(*inputs, indices))  # compile
    best = dict.fromkeys(steps, (float("inf"), float("inf")))
    peak = 0.0
    for _ in range(args.rounds):
        peak = max(peak, matmul_peak_flops())
        for spec, step in steps.items():
            for _ in range(args.repeats):
                best[spec] = min(best[spec], timed(lambda step=step: step(*inputs, indices)))
    print(f"float32 matmul peak {peak / 1e9:.1f} GFLOP/s (best of the rounds)")
    for spec, (seconds, cpu) in best.items():
        rate = useful / seconds
        print(
            f"{spec:>14}  fwd+bwd {seconds * 1e3:9.1f} ms  {rate / 1e9:6.1f} GFLOP/s  {rate / peak:6.1%} of peak  "
            f"(CPU time {cpu * 1e3:8.1f} ms)"
        )


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call of `fn`, blocking on its result."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu, start = usage.ru_utime + usage.ru_stime, time.perf_counter()
    jax.block_until_ready(fn())
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter() - start, usage.ru_utime + usage.ru_stime - cpu


if __name__ == "__main__":
    main()
