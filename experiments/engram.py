"""Engram against MoE at equal activated compute per token, on the bundled corpus (architecture.md §9).

    python -m experiments.engram                          # 4 runs of 150 steps, batch 8 × 128 (about 15 CPU minutes)
    python -m experiments.engram --steps 40 --no-repeat   # a quick look: 3 runs, no second baseline seed

Runs, all with `experiments.train` from the same seed, batches, steps and optimizer settings:

    baseline          tiny_v4
    engram            tiny_v4_engram (Engram at layer 1, the tokenizer's canonical map), with
                      moe_intermediate_size shrunk until its activated training FLOPs per token match baseline's
    engram, no gate   engram with engram_gate=False (gate α = 1, no key projection): the same backbone, so it
                      runs below baseline's compute by the key projection
    baseline, seed 1  baseline with another seed (init and batch order): the run-to-run noise

Activated compute: `v4jax.flops.train_flops_per_token` (3 × 2 FLOPs per active weight + attention, MTP
excluded; a token reads the Engram table's rows by a gather, so `param_counts` counts only the Z rows it reads
as active and the FLOPs leave them out, like the embedding). Engram's value and key projections, biases, norms
and short conv are counted. The Engram variant's extra activated FLOPs are removed by shrinking `moe_intermediate_size`
of every MoE layer (routed and shared experts; the MTP block's MoE follows, outside the matched count). The
activated FLOPs are affine in it, so two counts give the line and the match is the integer closest to its
solution (the results table recounts it).

Results: `experiments/results/engram.md` (table and setup; the reading below it is written by hand) and
`engram.json` (every validation curve); the runs go to `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time
from typing import Any

import numpy as np

from experiments import train
from v4jax import data
from v4jax.config import ModelConfig
from v4jax.flops import train_flops_per_token
from v4jax.layers.engram import hash_plan
from v4jax.params import engram_table_params, param_counts

RESULTS = pathlib.Path(__file__).parent / "results"
BASE, ENGRAM = "tiny_v4", "tiny_v4_engram"


# ----------------------------------------------------------------- compute accounting
def matched_moe_intermediate_size(base: ModelConfig, engram: ModelConfig, length: int) -> int:
    """The moe_intermediate_size I of `engram` whose activated training FLOPs per token are closest to `base`'s.

    The count is affine in I (every MoE layer's routed and shared experts: 3 matrices of D × I each), so the
    counts at I and I - 1 give the line; of the two integers around its solution the closer one is taken."""
    target = train_flops_per_token(base, length)
    hi = base.moe_intermediate_size
    at_hi = train_flops_per_token(engram.replace(moe_intermediate_size=hi), length)
    slope = at_hi - train_flops_per_token(engram.replace(moe_intermediate_size=hi - 1), length)
    if slope <= 0:
        raise ValueError(f"activated FLOPs do not grow with moe_intermediate_size (slope {slope})")
    exact = hi + (target - at_hi) / slope
    if exact < 1:
        raise ValueError(
            f"Engram adds more activated FLOPs ({at_hi - target:,.0f}/token) than the MoE's "
            f"moe_intermediate_size={hi} can give up"
        )
    candidates = {max(1, int(np.floor(exact))), int(np.ceil(exact))}
    return min(candidates, key=lambda size: (abs(at_hi + slope * (size - hi) - target), -size))


# ----------------------------------------------------------------- the variants
@dataclasses.dataclass(frozen=True)
class Variant:
    """One run: its `experiments.train` flags beyond the shared ones, and its model config (vocabulary and
    tokenizer compression applied, as `experiments.train.model_setup` builds it)."""

    name: str
    flags: tuple[str, ...]
    cfg: ModelConfig
    canonical: np.ndarray | None


def build_variants(tokenizer: data.Tokenizer, seq_len: int, seed: int = 0, repeat: bool = True) -> list[Variant]:
    """The runs of the experiment (module docstring), configs built by `experiments.train.model_setup`."""

    def variant(name: str, flags: list[str]) -> Variant:
        flags = [*flags, "--seq-len", str(seq_len)]
        cfg, _, canonical = train.model_setup(train.parse_args(flags), tokenizer)
        return Variant(name, tuple(flags), cfg, canonical)

    base = variant("baseline (tiny_v4)", ["--preset", BASE, "--seed", str(seed)])
    unmatched = variant("engram, unmatched", ["--preset", ENGRAM])
    size = matched_moe_intermediate_size(base.cfg, unmatched.cfg, seq_len)
    engram_flags = ["--preset", ENGRAM, "--seed", str(seed), "--set", f"moe_intermediate_size={size}"]
    runs = [
        base,
        variant("engram (compute-matched)", engram_flags),
        variant("engram, no gate", [*engram_flags, "--set", "engram_gate=false"]),
    ]
    if repeat:
        runs.append(variant(f"baseline, seed {seed + 1}", ["--preset", BASE, "--seed", str(seed + 1)]))
    return runs


def describe(cfg: ModelConfig, seq_len: int) -> dict[str, Any]:
    """Sizes of one config: parameters (total and activated, MTP excluded), Engram table rows, FLOPs/token."""
    total, _ = param_counts(cfg)
    plan = hash_plan(cfg) if cfg.engram_layer_ids else None
    return {
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "params_total": total,
        "params_activated": param_counts(cfg)[1],
        "engram_table_params": engram_table_params(cfg),
        "engram_table_rows": sum(layer.rows for layer in plan.layers.values()) if plan else 0,
        "engram_compressed_vocab": cfg.engram_vocab if cfg.engram_layer_ids else None,
        "activated_train_flops": train_flops_per_token(cfg, seq_len),
        "activated_train_flops_with_mtp": train_flops_per_token(cfg, seq_len)
        + 3 * 2 * (param_counts(cfg, include_mtp=True)[1] - param_counts(cfg)[1]),
    }


# ----------------------------------------------------------------- running and reporting
def run(variant: Variant, common: list[str], out: pathlib.Path) -> dict[str, Any]:
    """Train one variant with `experiments.train.main`; its sizes, validation curve and timings."""
    slug = "".join(c if c.isalnum() else "-" for c in variant.name.lower()).strip("-")
    directory = out / slug
    start = time.perf_counter()
    summary = train.main([*common, *variant.flags, "--out", str(directory), "--no-progress"])
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines() if line]
    steps = [r for r in records if r["kind"] == "train"]
    settings = json.loads((directory / "config.json").read_text())
    cfg = ModelConfig.from_dict(settings["model"])
    if cfg != variant.cfg:
        raise RuntimeError(f"{variant.name}: experiments.train built another config than build_variants")
    return {
        "variant": variant.name,
        "flags": list(variant.flags),
        **describe(cfg, settings["args"]["seq_len"]),
        "val_ce": {r["step"]: r["val_ce"] for r in records if r["kind"] == "eval"},
        "final_train_ce_last10": float(np.mean([r["ce"] for r in steps[-10:]])),
        "tokens_per_s": summary["median_tokens_per_s"],
        "wall_s": wall,
        "val_unigram_entropy": summary["val_unigram_entropy"],
    }


def write_markdown(
    rows: list[dict[str, Any]], args: argparse.Namespace, command: str, tokenizer_info: str, steps_per_epoch: float
) -> str:
    base = rows[0]
    evals = sorted(base["val_ce"])
    lines = ["# engram", "", f"Command: `{command}`", "", "## Validation cross-entropy (nats/token) over training", ""]
    header = ["variant"] + [f"@{s}" for s in evals]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join([r["variant"]] + [f"{r['val_ce'][s]:.3f}" for s in evals]) + " |")
    lines += ["", f"Validation unigram entropy (a context-free model's loss): {base['val_unigram_entropy']:.3f}.", ""]
    lines += ["## Sizes and cost", ""]
    header = [
        "variant",
        "MoE I",
        "params total",
        "params activated",
        "Engram table rows (weights)",
        "activated train FLOPs/token",
        "vs baseline",
        "with MTP",
        "train CE (last 10)",
        "tokens/s",
        "wall s",
    ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        table = f"{r['engram_table_rows']:,} ({r['engram_table_params']:,})" if r["engram_table_rows"] else "-"
        flops = r["activated_train_flops"]
        cells = [
            r["variant"],
            str(r["moe_intermediate_size"]),
            f"{r['params_total']:,}",
            f"{r['params_activated']:,}",
            table,
            f"{flops:,.0f}",
            f"{flops / base['activated_train_flops'] - 1:+.2%}",
            f"{r['activated_train_flops_with_mtp'] / base['activated_train_flops_with_mtp'] - 1:+.2%}",
            f"{r['final_train_ce_last10']:.3f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['wall_s']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    tokens = args.steps * args.batch * args.seq_len
    lines += [
        "",
        "## Setup",
        "",
        f"- {args.steps} steps of {args.batch} × {args.seq_len} tokens ({tokens:,} training tokens, "
        f"{args.steps / steps_per_epoch:.0%} of an epoch), AdamW at peak learning rate {args.lr} with "
        f"{args.warmup} warm-up steps and cosine decay, the same batches in every run of seed 0; validation "
        f"cross-entropy on {args.eval_windows} fixed windows every {args.eval_every} steps.",
        f"- Tokenizer: {tokenizer_info}",
        "- Compute matching: activated training FLOPs per token = `train_flops_per_token` (3 × (2 per weight a "
        "token uses + attention), MTP excluded) less the Engram table (a gather, no multiplies). Engram at layer "
        "1 adds its value projection (Z·W·D), key projection (Z·W·R·D), biases, gate norms and short conv; "
        "the MoE of every layer gives the same back through `moe_intermediate_size` (routed top-k and shared "
        "experts, 3·D weights per unit each). 'with MTP' adds the MTP block, whose MoE shrinks too.",
        "- Parameters: total = trained weights of the main model (MTP excluded), with the whole Engram table; "
        "activated = what one token uses, with the table counted as the Z·W weights a token reads.",
        "- tokens/s: median over the last 80% of steps; wall s: the whole run with compilation (about two "
        "minutes of it), evaluation and the final checkpoint (no sample), on a shared 2-core CPU.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-repeat", action="store_true", help="skip the second baseline seed (the noise estimate)")
    p.add_argument("--out", default="runs/engram")
    p.add_argument("--results", default=str(RESULTS), help="directory for engram.md and engram.json")
    args = p.parse_args(argv)
    bundle = data.prepare(seq_len=args.seq_len, global_batch=args.batch, seed=args.seed)
    variants = build_variants(bundle.tokenizer, args.seq_len, args.seed, repeat=not args.no_repeat)
    common = ["--steps", str(args.steps), "--batch", str(args.batch), "--lr", str(args.lr)]
    common += ["--warmup", str(args.warmup), "--eval-every", str(args.eval_every)]
    common += ["--eval-windows", str(args.eval_windows), "--save-every", str(args.steps), "--sample-tokens", "0"]
    rows = [run(v, common, pathlib.Path(args.out)) for v in variants]
    engram = next(v for v in variants if v.cfg.engram_layer_ids)
    vocab = bundle.tokenizer.vocab_size
    tokenizer_info = (
        f"the bundled byte-level BPE of {vocab:,} ids trained on the Python standard library; its canonical map "
        f"(`canonical_ids_from_tokenizer`) has V' = {engram.cfg.engram_compressed_vocab_size:,} ids "
        f"({engram.cfg.engram_compressed_vocab_size / vocab - 1:+.1%}), installed in the Engram runs by "
        "`experiments.train`."
    )
    results = pathlib.Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m experiments.engram", *(sys.argv[1:] if argv is None else argv)])
    markdown = write_markdown(rows, args, command, tokenizer_info, bundle.train.steps_per_epoch)
    (results / "engram.md").write_text(markdown)
    (results / "engram.json").write_text(json.dumps(rows, indent=2))
    print(markdown)
    return rows


if __name__ == "__main__":
    main()
