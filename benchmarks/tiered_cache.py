"""Decode speed and bytes per tier of the tiered cache against the all-on-device cache, in one run.

    python -m benchmarks.tiered_cache --preset small --prompt 768 --new 64 --device-tokens 128 --block 128

Both runs generate the same tokens (checked) from the same prompts with the same per-step program
(`v4jax.sampling.tiered.generate_tiered`; the on-device run keeps every block hot). Reports decode tokens/s
of each, the slowdown, and the bytes held per tier at the end, for host memory and for disk.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import numpy as np

import v4jax
from v4jax.sampling.tiered import Tiers, generate_tiered


def timed(cfg, params, prompts, new, tiers, repeats: int = 3) -> tuple[list, dict, float]:
    """(tokens, bytes per tier, decode seconds): the best full run minus the best one-token run (prefill and
    set-up), each compiled first (the two runs' caches differ in length, so each compiles its own steps)."""
    seconds = {}
    for n in (new, 1):
        generate_tiered(cfg, params, prompts, n, tiers)  # compile
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            out = generate_tiered(cfg, params, prompts, n, tiers)
            best = min(best, time.perf_counter() - start)
            if n == new:
                tokens, stats = out
        seconds[n] = best
    return tokens, stats, seconds[new] - seconds[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=sorted(v4jax.presets.PRESETS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=768)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--device-tokens", type=int, default=128)
    parser.add_argument("--block", type=int, default=128)
    args = parser.parse_args()
    cfg = v4jax.presets.get(args.preset)
    params = v4jax.model.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, args.prompt).tolist() for _ in range(args.batch)]
    base, base_stats, base_s = timed(cfg, params, prompts, args.new, Tiers(device_tokens=10**9, block=args.block))
    print(f"{args.preset}: batch {args.batch}, prompt {args.prompt}, {args.new} new tokens; {jax.devices()[0]}")
    print(f"  all on device : {args.new * args.batch / base_s:8.1f} tokens/s   bytes {base_stats}")
    with tempfile.TemporaryDirectory() as spill:
        for name, tiers in (
            ("host", Tiers(device_tokens=args.device_tokens, block=args.block)),
            ("disk", Tiers(device_tokens=args.device_tokens, block=args.block, spill_dir=spill)),
        ):
            tokens, stats, seconds = timed(cfg, params, prompts, args.new, tiers)
            assert tokens == base, f"{name} tier changed the generated tokens"
            print(
                f"  cold on {name:5s}: {args.new * args.batch / seconds:8.1f} tokens/s   slowdown "
                f"{seconds / base_s:5.2f}x   bytes {stats}"
            )


if __name__ == "__main__":
    main()
