"""How fast XLA streams the weights of one decoding matrix-vector product, by weight shape.

    python -m benchmarks.matvec --shapes 512x128,512x256,512x1024,512x2048,256x1024 --rows 1

A batch-1 decoding step is a chain of [rows, K] @ [K, N] products, each waiting for the one before. This runs
such a chain of distinct float32 weights of one shape (`--total-mib`, default 64 MiB, twice this CPU's L3, so
that the weights come from memory; at most 256 products, which keeps compilation short: the smallest shapes
hold less) in one jitted function and reports the weight bytes streamed per second, next to
the machine's copy bandwidth measured in the same process (`benchmarks.decode.memory_bandwidth`). It shows how
much of a decoding step's time is the per-product cost rather than the bytes: the bandwidth a product reaches
grows with its size. Not a test.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import best_time
from benchmarks.decode import F32, memory_bandwidth


def chained_products(rows: int, k: int, n: int, total_bytes: int, repeats: int) -> tuple[int, float]:
    """(number of products, best seconds for the whole chain) of [rows, K] @ [K, N] products, each one's input
    depending on the previous output."""
    count = int(np.clip(total_bytes // (k * n * F32), 8, 256))
    rng = np.random.default_rng(0)
    weights = [jnp.asarray(rng.standard_normal((k, n), np.float32) / np.sqrt(k)) for _ in range(count)]
    x = jnp.asarray(rng.standard_normal((rows, k), np.float32))

    @jax.jit
    def chain(x, weights):
        outs = []
        for w in weights:
            y = x @ w
            outs.append(y[:, :1])
            x = x + 0.0 * y[:, :1]  # the next product waits for this one
        return jnp.concatenate(outs, axis=1)

    return count, best_time(lambda: chain(x, weights), repeats=repeats, warmup=1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="512x64,512x128,512x256,512x512,512x1024,512x2048,256x1024,1024x512")
    p.add_argument("--rows", type=int, default=1, help="rows of x (the decoding batch)")
    p.add_argument("--total-mib", type=int, default=64, help="weight bytes of one chain (past the L3 cache)")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    bandwidth = memory_bandwidth()
    print(
        f"backend {jax.default_backend()}; bandwidth "
        + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in bandwidth.items())
        + " GB/s"
    )
    best_bw = max(bandwidth.values())
    print("\n| weight K×N | MB | products | µs per product | weight GB/s | of the best copy bandwidth |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        count, seconds = chained_products(args.rows, k, n, args.total_mib * 2**20, args.repeats)
        rate = count * k * n * F32 / seconds
        print(
            f"| {k}×{n} | {k * n * F32 / 1e6:.2f} | {count} | {seconds / count * 1e6:.1f} | {rate / 1e9:.1f} "
            f"| {rate / best_bw:.0%} |",
            flush=True,
        )
    print(f"\nbandwidth after: {max(memory_bandwidth().values()) / 1e9:.1f} GB/s (best)")


if __name__ == "__main__":
    main()
