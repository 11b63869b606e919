"""Train a v4jax model on a text corpus, then sample from it: the README's main job.

    python -m experiments.train                                  # tiny_v4 on the Python stdlib, 300 steps
    python -m experiments.train --preset small_v4 --steps 2000 --batch 8 --seq-len 512 --out runs/small
    python -m experiments.train --set residual_mode=none --set train.balance_alpha=0 --out runs/ablation
    python -m experiments.train --out runs/default --resume      # continue from the last checkpoint

`--set key=value` overrides a `ModelConfig` field, or a `TrainConfig` field as `train.key`; unknown keys are
an error. The model's vocabulary is set to the tokenizer's. A model with Engram layers also gets the
tokenizer's compression: `engram_compressed_vocab_size` = its V', and its canonical-id map in the params'
`canonical` constants (`v4jax.data.canonical`). The run directory gets `config.json` (model, training and
data settings), `metrics.jsonl` (one line per step, plus evaluation lines), `loss.png`, `checkpoints/`
(orbax; the data position and tokenizer beside the state), `sample.txt` and `summary.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time
from typing import Any

import jax
import numpy as np

from v4jax import data, presets
from v4jax import sharding as shd
from v4jax.checkpointing import Checkpointer, check_meta
from v4jax.config import ModelConfig
from v4jax.data.canonical import compressed_config, install_canonical
from v4jax.flops import matmul_peak_flops, train_flops_per_token
from v4jax.model import init_params
from v4jax.sampling import generate
from v4jax.train import TrainConfig, Trainer

SAMPLE_PROMPT = "def fibonacci(n):\n"


def parse_overrides(pairs: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`key=value` strings -> (ModelConfig changes, TrainConfig changes). Values are JSON when they parse
    as JSON (numbers, true/false, null, lists), else strings."""
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    model, train = {}, {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if isinstance(value, list):
            value = tuple(value)
        if key.startswith("train."):
            if key[6:] not in train_fields:
                raise SystemExit(f"--set {key}: TrainConfig has no field {key[6:]!r} (fields: {sorted(train_fields)})")
            train[key[6:]] = value
        elif key in model_fields:
            model[key] = value
        else:
            raise SystemExit(
                f"--set {key}: not a ModelConfig field (use train.<field> for TrainConfig; model fields: "
                f"{sorted(model_fields)})"
            )
    return model, train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny_v4", choices=sorted(presets.PRESETS))
    p.add_argument("--steps", type=int, default=300, help="total optimizer steps")
    p.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--optimizer", default=None, choices=("adamw", "muon"), help="shortcut for --set train.optimizer")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--data", default=None, help="text file, .jsonl or directory (default: the Python stdlib)")
    p.add_argument("--tokenizer", default=None, help="a tokenizer.json to use instead of training a BPE")
    p.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/default", help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-windows", type=int, default=64, help="validation windows per evaluation")
    p.add_argument("--mesh", default="fsdp=-1", help="mesh axis sizes, e.g. data=2,fsdp=4 (default: all fsdp)")
    p.add_argument("--rules", default="fsdp", choices=sorted(shd.RULES))
    p.add_argument("--sample-tokens", type=int, default=64)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs go to metrics.jsonl)")
    return p.parse_args(argv)


def build_configs(args: argparse.Namespace, vocab_size: int) -> tuple[ModelConfig, TrainConfig]:
    model_changes, train_changes = parse_overrides(args.set)
    if args.optimizer:
        train_changes.setdefault("optimizer", args.optimizer)
    cfg = presets.get(args.preset).replace(vocab_size=vocab_size, **model_changes)
    if args.seq_len > cfg.max_position_embeddings:
        raise SystemExit(f"--seq-len {args.seq_len} exceeds max_position_embeddings={cfg.max_position_embeddings}")
    tcfg = TrainConfig(learning_rate=args.lr, warmup_steps=min(args.warmup, args.steps), total_steps=args.steps)
    return cfg, tcfg.replace(**train_changes)


def model_setup(
    args: argparse.Namespace, tokenizer: data.Tokenizer
) -> tuple[ModelConfig, TrainConfig, np.ndarray | None]:
    """`build_configs` for `tokenizer`'s vocabulary, with Engram's tokenizer compression: a config with Engram
    layers gets `engram_compressed_vocab_size` = the tokenizer's V', and its canonical map int32 [vocab] comes
    back third (None without Engram) for `initial_params`."""
    cfg, tcfg = build_configs(args, tokenizer.vocab_size)
    try:
        cfg, canonical = compressed_config(cfg, tokenizer)
    except ValueError as e:
        raise SystemExit(f"--set engram_compressed_vocab_size: {e}") from e
    return cfg, tcfg, canonical


def initial_params(cfg: ModelConfig, seed: int, canonical: np.ndarray | None) -> dict[str, Any]:
    """`init_params(cfg, key(seed))` (what `Trainer.init(key)` draws), with the canonical map written into every
    Engram layer's `canonical` constant when there is one."""
    params = init_params(cfg, jax.random.key(seed))
    return params if canonical is None else install_canonical(params, canonical)


def parse_mesh(spec: str) -> jax.sharding.Mesh:
    sizes = {}
    for part in filter(None, spec.split(",")):
        name, value = part.split("=")
        if name not in shd.MESH_AXES:
            raise SystemExit(f"--mesh: unknown axis {name!r} (axes: {shd.MESH_AXES})")
        sizes[name] = int(value)
    return shd.make_mesh(**sizes)


def greedy_sample(cfg: ModelConfig, params: Any, tokenizer: data.Tokenizer, prompt: str, new_tokens: int) -> str:
    """The prompt and its greedy continuation (`v4jax.sampling.generate` with the KV cache), up to `new_tokens`
    tokens or the end-of-text token (not included), within the model's maximum length."""
    ids = tokenizer.encode(prompt)
    new_tokens = min(new_tokens, cfg.max_position_embeddings - len(ids))
    if new_tokens < 1:
        return tokenizer.decode(ids)
    (out,) = generate(cfg, params, [ids], new_tokens, stop_tokens=[tokenizer.eos_id])
    if out and out[-1] == tokenizer.eos_id:
        out = out[:-1]
    return tokenizer.decode(ids + out)


def plot_losses(path: pathlib.Path, records: list[dict[str, Any]], entropy: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["ce"]) for r in records if r["kind"] == "train"]
    val = [(r["step"], r["val_ce"]) for r in records if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), lw=0.8, alpha=0.7, label="train cross-entropy")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation cross-entropy")
    ax.axhline(entropy, color="gray", ls="--", label=f"validation unigram entropy ({entropy:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = data.prepare(
        args.data,
        seq_len=args.seq_len,
        global_batch=args.batch,
        vocab_size=args.vocab,
        seed=args.seed,
        tokenizer_path=args.tokenizer,
    )
    cfg, tcfg, canonical = model_setup(args, bundle.tokenizer)
    mesh = parse_mesh(args.mesh)
    trainer = Trainer(cfg, tcfg, mesh, args.rules)
    settings = {"model": cfg.to_dict(), "train": tcfg.to_dict(), "args": vars(args)}
    checkpoints = Checkpointer(
        out / "checkpoints",
        save_every=args.save_every,
        keep=args.keep,
        tokenizer_json=bundle.tokenizer.to_json(),
    )

    start_step = 0
    if args.resume and checkpoints.latest_step() is not None:
        state, meta = checkpoints.restore(target=trainer.abstract_state())
        check_meta(meta, {"model": settings["model"], "train": settings["train"]}, ["model", "train"])
        start_step = bundle.train.check_state(meta["data"])
        print(f"resumed from step {start_step} in {out}", file=sys.stderr)
    else:
        state = trainer.init(params=initial_params(cfg, args.seed, canonical))
        (out / "metrics.jsonl").write_text("")
    (out / "config.json").write_text(json.dumps(settings, indent=2))
    bundle.tokenizer.save(out / "tokenizer.json")

    peak = matmul_peak_flops(cfg.compute_dtype)
    flops_per_token = train_flops_per_token(cfg, args.seq_len)
    tokens_per_step = args.batch * args.seq_len
    val_batches = data.eval_windows(bundle.val_tokens, args.seq_len, args.eval_windows)
    val_batches = [val_batches[i : i + args.batch] for i in range(0, len(val_batches) - args.batch + 1, args.batch)]

    def evaluate(step: int) -> dict[str, Any]:
        ce = float(np.mean([float(trainer.evaluate(state["params"], b)["ce"]) for b in val_batches]))
        return {"kind": "eval", "step": step, "val_ce": ce, "val_unigram_entropy": bundle.val_unigram_entropy}

    records: list[dict[str, Any]] = [
        json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()
    ]
    log = (out / "metrics.jsonl").open("a")
    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=args.steps, initial=start_step, unit="step", dynamic_ncols=True)
    last = time.perf_counter()
    for step in range(start_step, args.steps):
        batch = bundle.train.device_batch(step, trainer.batch_sharding)
        state, metrics = trainer.step(state, batch)
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        tokens_per_s = tokens_per_step / (now - last)
        last = now
        record = {"kind": "train", "step": step + 1, "tokens_per_s": tokens_per_s}
        record["mfu"] = tokens_per_s * flops_per_token / peak
        for name, value in metrics.items():
            value = np.asarray(value)
            record[name] = value.tolist() if value.ndim else value.item()
        records.append(record)
        log.write(json.dumps(record) + "\n")
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            records.append(evaluate(step + 1))
            log.write(json.dumps(records[-1]) + "\n")
            log.flush()
        meta = {**settings, "data": bundle.train.state(step + 1)}
        checkpoints.maybe_save(step + 1, state, meta, force=step + 1 == args.steps)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{record['ce']:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
    if progress is not None:
        progress.close()
    log.close()
    checkpoints.wait()
    checkpoints.close()

    sample = greedy_sample(cfg, state["params"], bundle.tokenizer, SAMPLE_PROMPT, args.sample_tokens)
    (out / "sample.txt").write_text(sample)
    plot_losses(out / "loss.png", records, bundle.val_unigram_entropy)
    train_records = [r for r in records if r["kind"] == "train"]
    timed = train_records[len(train_records) // 5 :] or train_records  # skip compilation and warm-up
    evals = [r for r in records if r["kind"] == "eval"]
    summary = {
        "steps": args.steps,
        "final_val_ce": evals[-1]["val_ce"] if evals else None,
        "val_unigram_entropy": bundle.val_unigram_entropy,
        "final_train_ce": train_records[-1]["ce"] if train_records else None,
        "median_tokens_per_s": float(np.median([r["tokens_per_s"] for r in timed])) if timed else None,
        "median_mfu": float(np.median([r["mfu"] for r in timed])) if timed else None,
        "matmul_peak_flops": peak,
        "skipped_steps": train_records[-1]["skipped"] if train_records else 0,
        "sample": sample,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"\nvalidation cross-entropy {summary['final_val_ce']:.3f} nats/token vs unigram entropy "
        f"{bundle.val_unigram_entropy:.3f}; {summary['median_tokens_per_s']:,.0f} tokens/s, "
        f"MFU {summary['median_mfu']:.1%}\n--- greedy sample ---\n{sample}\n---------------------"
    )
    return summary


if __name__ == "__main__":
    main()
