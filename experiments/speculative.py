"""MTP self-speculative decoding on a trained run: draft acceptance and decode speed against plain greedy.

    python -m experiments.speculative runs/default --new 32 --prompts 6

Prompts are 32-token windows of the run's validation split (the corpus and tokenizer of `experiments.train`);
batch 1. Decode speed is (2N - N) new tokens over t(2N) - t(N) per prompt, both lengths compiled first, so
prefill and compilation cancel out. Results: experiments/results/speculative.md.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

from experiments.sample import load_run
from v4jax.data import prepare
from v4jax.sampling import generate, speculative_generate


def decode_rate(fn, prompts, n) -> float:
    """Tokens/s of fn(prompt, length) between lengths n and 2n, summed over the prompts."""
    fn(prompts[0], n), fn(prompts[0], 2 * n)  # compile both
    seconds = 0.0
    for prompt in prompts:
        start = time.perf_counter()
        fn(prompt, n)
        middle = time.perf_counter()
        fn(prompt, 2 * n)
        seconds += (time.perf_counter() - middle) - (middle - start)
    return n * len(prompts) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=pathlib.Path)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=6)
    args = parser.parse_args()
    cfg, params, _, what = load_run(args.run, None)
    val = np.asarray(prepare(seq_len=128, global_batch=16, vocab_size=cfg.vocab_size).val_tokens)
    starts = np.random.default_rng(0).integers(0, len(val) - 32, args.prompts)
    prompts = [val[s : s + 32].tolist() for s in starts]
    plain = [generate(cfg, params, [p], 2 * args.new)[0] for p in prompts]
    drafted = [speculative_generate(cfg, params, [p], 2 * args.new) for p in prompts]
    totals = {k: sum(stats[k] for _, stats in drafted) for k in ("drafted", "accepted", "steps")}
    plain_rate = decode_rate(lambda p, n: generate(cfg, params, [p], n), prompts, args.new)
    spec_rate = decode_rate(lambda p, n: speculative_generate(cfg, params, [p], n), prompts, args.new)
    print(what)
    print(json.dumps({
        "same_output": all(a == b[0][0] for a, b in zip(plain, drafted, strict=True)),
        "acceptance": totals["accepted"] / max(1, totals["drafted"]), **totals,
        "tokens_per_main_pass": len(prompts) * 2 * args.new / max(1, totals["steps"]),
        "plain_tokens_per_s": plain_rate, "speculative_tokens_per_s": spec_rate, "speedup": spec_rate / plain_rate,
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
