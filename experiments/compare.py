"""Small controlled comparisons on the bundled corpus: the same run of `experiments.train` with one setting varied.

    python -m experiments.compare balancing     # aux-loss-free bias vs auxiliary loss vs none
    python -m experiments.compare residual      # mHC vs HC vs plain residual
    python -m experiments.compare balancing --steps 150 --batch 8 --eval-every 50   # other train flags pass on

Every variant trains the default tiny V4 preset from the same seed on the same batches; only the listed
overrides differ. Results (a markdown table plus the per-step curves in each run's metrics.jsonl) go to
`experiments/results/<experiment>.md`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re

import numpy as np

from experiments import train
from v4jax import data, model
from v4jax.model import layer_kinds

EXPERIMENTS = {
    "balancing": {
        "aux-loss-free bias, γ=1e-3 (V3)": ["train.bias_update_speed=0.001", "train.balance_alpha=0"],
        "aux-loss-free bias, γ=1e-2": ["train.bias_update_speed=0.01", "train.balance_alpha=0"],
        "auxiliary loss only, α=1e-2": ["train.bias_update_speed=0", "train.balance_alpha=0.01"],
        "none": ["train.bias_update_speed=0", "train.balance_alpha=0"],
    },
    "residual": {
        "mhc (V4)": ["residual_mode=mhc"],
        "hc (unconstrained)": ["residual_mode=hc"],
        "none (plain residual)": ["residual_mode=none"],
    },
}
RESULTS = pathlib.Path(__file__).parent / "results"


def _records(run: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _learned_moe_rows(cfg) -> list[int]:
    """Rows of the per-MoE-layer metrics that belong to learned (not hash-routed) routers."""
    moe = [kind for kind in layer_kinds(cfg) if kind.ffn != "dense"]
    return [row for row, kind in enumerate(moe) if kind.ffn == "moe"]


def summarise(name: str, run: pathlib.Path, experiment: str) -> dict:
    records = _records(run)
    settings = json.loads((run / "config.json").read_text())
    cfg = model.ModelConfig.from_dict(settings["model"])
    evals = [r for r in records if r["kind"] == "eval"]
    steps = [r for r in records if r["kind"] == "train"]
    row = {"variant": name, "val_ce": {r["step"]: r["val_ce"] for r in evals}, "final_val_ce": evals[-1]["val_ce"]}
    if experiment == "balancing":
        learned = _learned_moe_rows(cfg)
        vio = np.array([[r["max_vio"][i] for i in learned] for r in steps])  # [steps, learned layers]
        quarters = np.array_split(np.arange(len(steps)), 4)
        row["max_vio_by_quarter"] = [float(vio[q].mean()) for q in quarters]
        row["final_max_vio_per_layer"] = vio[-len(steps) // 10 :].mean(0).tolist()
    else:
        summary = json.loads((run / "summary.json").read_text())
        bundle = data.prepare(seq_len=settings["args"]["seq_len"], global_batch=settings["args"]["batch"],
                              vocab_size=settings["args"]["vocab"])  # fmt: skip
        tokens = data.eval_windows(bundle.val_tokens, settings["args"]["seq_len"], 8)[:, :-1]
        from v4jax.checkpointing import Checkpointer
        from v4jax.sharding import make_mesh
        from v4jax.train import TrainConfig, Trainer

        trainer = Trainer(cfg, TrainConfig(**settings["train"]), make_mesh())
        with Checkpointer(run / "checkpoints", save_every=1, keep=10) as ckpt:
            state, _ = ckpt.restore(target=trainer.abstract_state())
        gains = model.residual_gains(cfg, state["params"], tokens)
        row["gain_forward"] = gains["forward"].tolist()
        row["gain_backward"] = gains["backward"].tolist()
        row["tokens_per_s"] = summary["median_tokens_per_s"]
    return row


def write_table(experiment: str, rows: list[dict], command: str, entropy: float) -> str:
    lines = [f"# {experiment}", "", f"Command: `{command}`", ""]
    eval_steps = sorted(rows[0]["val_ce"])
    picks = [eval_steps[i] for i in sorted({0, len(eval_steps) // 2, len(eval_steps) - 1})]
    header = ["variant"] + [f"val CE @{s}" for s in picks]
    if experiment == "balancing":
        header += ["MaxVio q1", "q2", "q3", "q4", "final MaxVio per learned layer"]
    else:
        header += ["max fwd gain", "max bwd gain", "gain per site (fwd)", "tokens/s"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["variant"]] + [f"{r['val_ce'][s]:.3f}" for s in picks]
        if experiment == "balancing":
            cells += [f"{v:.2f}" for v in r["max_vio_by_quarter"]]
            cells += [", ".join(f"{v:.2f}" for v in r["final_max_vio_per_layer"])]
        else:
            cells += [f"{max(r['gain_forward']):.3f}", f"{max(r['gain_backward']):.3f}"]
            cells += [" ".join(f"{v:.2f}" for v in r["gain_forward"]), f"{r['tokens_per_s']:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Validation unigram entropy (the context-free baseline): {entropy:.3f} nats/token.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=sorted(EXPERIMENTS))
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--results", default=str(RESULTS), help="directory for <experiment>.md and .json")
    args, extra = p.parse_known_args(argv)  # any other flag goes to experiments.train
    rows, entropy = [], None
    for name, overrides in EXPERIMENTS[args.experiment].items():
        run = pathlib.Path(args.out) / args.experiment / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        flags = ["--steps", str(args.steps), "--out", str(run), "--no-progress", *extra]
        for override in overrides:
            flags += ["--set", override]
        summary = train.main(flags)
        entropy = summary["val_unigram_entropy"]
        rows.append(summarise(name, run, args.experiment))
    results = pathlib.Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    command = f"python -m experiments.compare {args.experiment} --steps {args.steps}"
    if extra:
        command += " " + " ".join(extra)
    (results / f"{args.experiment}.md").write_text(write_table(args.experiment, rows, command, entropy))
    (results / f"{args.experiment}.json").write_text(json.dumps(rows, indent=2))
    print((results / f"{args.experiment}.md").read_text())


if __name__ == "__main__":
    main()
