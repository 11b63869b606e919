"""Decode throughput: v4jax `generate` against transformers' `generate`, and against the memory-bandwidth roofline.

    python -m benchmarks.decode --presets small,small_v4 --batches 1,16 --prompt-len 32 --new-tokens 64
    python -m benchmarks.decode --presets small --batches 1 --skip-torch --profile      # where a step's time goes
    python -m benchmarks.decode --speculative-run runs/default                          # MTP drafts vs greedy

Both sides decode the same random weights: transformers builds the preset's causal LM in float32 with every
weight random (as `tests/reference.py`), `save_pretrained` writes it and `v4jax.hf.load_checkpoint` reads it
(the MTP module is not in HF's model, so neither side runs it). Greedy, no stop tokens, the same random prompts
[B, prompt-len], float32; transformers runs eager PyTorch (no torch.compile) with its default attention and
experts kernels and `torch.set_num_threads` = this process's CPUs (XLA:CPU sizes its pool from the same
affinity). Only decoding is timed: each side generates `new-tokens + 1` tokens and 1 token (prefill only), and
decode tokens/s = B · new-tokens / (difference of the two times); best of `--repeats` runs after a warm-up run
(compilation), the two sides alternating so that both see the same machine load.

Roofline: a decode step must read the weights it uses once and each row's cache once, so at batch B it
takes at least (weight bytes + B · cache bytes) / bandwidth, for B tokens. Weight bytes: 4 B × (active
parameters (`v4jax.param_counts`: all but the routed experts a token is not sent to) minus the input
embedding (a step reads B rows of it), plus the routed experts that the other B − 1 rows add: E·(1 − (1 −
K/E)^B) distinct experts per MoE layer under uniform routing instead of K). Cache bytes: float32
`v4jax.cache_size.kv_cache_bytes_per_token` × the mean context (prompt + new/2). Bandwidth: the best of a
NumPy copy, a jitted `x + 1` (each counted as bytes read + written) and a jitted sum (bytes read) of a 256 MiB
float32 array, measured in this process at the start and after every round of decoding: this machine's
bandwidth swings by ±30% over seconds (other tenants of the host), so both the bandwidth and the decode times
are the best seen, i.e. both measure the machine's quiet moments.

`--profile` traces decode steps (the jitted step under `engine.decode_step`, one token per row after the prompt)
with `jax.profiler` and sums the XLA operations' times by model part and operation.
`--speculative-run DIR` loads a training run (`experiments.sample.load`) and compares
`speculative_generate` with `generate` at batch 1 on prompts cut from the standard-library validation
documents: acceptance rate, tokens/s, the cost of a pass and of a 1- and 2-token cache extension.
Not a test: results go to benchmarks/README.md and experiments/results/speculative.md.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import math
import os
import pathlib
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import v4jax
from benchmarks.train import PARTS, cpu_threads, op_table, operation
from v4jax.cache_size import kv_cache_bytes_per_token
from v4jax.config import ModelConfig
from v4jax.sampling import engine, generate, speculative_generate

F32 = 4


# ---------------------------------------------------------------------------------------------- machine
def memory_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5) -> dict[str, float]:
    """Bytes/s moved by a NumPy copy, a jitted `x + 1` (read + write) and a jitted sum (read) of `nbytes`."""
    x = np.random.default_rng(0).random(nbytes // F32, dtype=np.float32)
    y = np.empty_like(x)
    xj = jnp.asarray(x)
    add, total = jax.jit(lambda a: a + 1.0), jax.jit(jnp.sum)
    cases = {
        "numpy copy": (lambda: np.copyto(y, x), 2 * nbytes),
        "jax x+1": (lambda: add(xj).block_until_ready(), 2 * nbytes),
        "jax sum": (lambda: total(xj).block_until_ready(), nbytes),
    }
    out = {}
    for name, (fn, moved) in cases.items():
        fn()
        best = min(_timed(fn) for _ in range(repeats))
        out[name] = moved / best
    return out


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- roofline
def decode_bytes(cfg: ModelConfig, batch: int, context: int) -> tuple[float, float]:
    """(weight bytes, cache bytes) one decode step of `batch` rows at `context` tokens must read (float32)."""
    _, active = v4jax.param_counts(cfg)
    d, e, k = cfg.hidden_size, cfg.n_routed_experts, cfg.num_experts_per_tok
    expert = 3 * d * cfg.moe_intermediate_size
    distinct = e * (1 - (1 - k / e) ** batch)  # expected experts hit per MoE layer, uniform routing
    weights = active - cfg.vocab_size * d + batch * d + cfg.num_moe_layers * (distinct - k) * expert
    cache = batch * kv_cache_bytes_per_token(cfg, "float32", context) * context
    return F32 * weights, cache


# ---------------------------------------------------------------------------------------------- models
def random_hf_model(cfg: ModelConfig, seed: int = 0):
    """transformers' causal LM of `cfg`, float32, every weight random (the parity tests' `hf_causal_lm`)."""
    from tests.reference import hf_causal_lm

    m = hf_causal_lm(cfg, seed)
    if cfg.model_type != "deepseek_v4":  # transformers' default kernel (the parity tests pin eager attention)
        m.config._attn_implementation = "sdpa"
    return m


class TorchDecoder:
    def __init__(self, model, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.torch, self.model = torch, model
        model.generation_config.eos_token_id = None  # exactly n tokens

    def __call__(self, prompts: np.ndarray, n: int) -> np.ndarray:
        torch = self.torch
        with torch.no_grad():
            ids = torch.from_numpy(prompts).long()
            out = self.model.generate(
                ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, use_cache=True
            )
        return out[:, prompts.shape[1] :].numpy()

    @property
    def kernels(self) -> str:
        config = self.model.config
        return f"attention={config._attn_implementation}, experts={getattr(config, '_experts_implementation', '?')}"


class JaxDecoder:
    def __init__(self, cfg: ModelConfig, params):
        self.cfg, self.params = cfg, engine.inference_params(cfg, params)  # converted once, outside the timing

    def __call__(self, prompts: np.ndarray, n: int) -> np.ndarray:
        return np.asarray(generate(self.cfg, self.params, prompts.tolist(), n))


def decode_rate(decoder, prompts: np.ndarray, new: int, times: dict) -> None:
    """One round: time `new + 1` and 1 generated tokens, appending to times['long'] / times['short']."""
    times.setdefault("long", []).append(_timed(lambda: decoder(prompts, new + 1)))
    times.setdefault("short", []).append(_timed(lambda: decoder(prompts, 1)))


def _rate(times: dict, batch: int, new: int) -> tuple[float, float, float]:
    long, short = min(times["long"]), min(times["short"])
    return batch * new / (long - short), short, long


# ---------------------------------------------------------------------------------------------- profile
def _part(op_name: str) -> str:
    if "Transformer" not in op_name:
        return "outside the model (cache bookkeeping, loop)"
    components = op_name.split("/")
    return next((part for part, test in PARTS if test(components)), "other model ops")


def profile_decode(cfg: ModelConfig, params, batch: int, prompt_len: int, steps: int, trace_dir: str) -> None:
    """Trace `steps` decode steps after a prompt and print the summed XLA operation times by part / operation."""
    params = engine.inference_params(cfg, params)
    prompts = np.random.default_rng(1).integers(0, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
    lengths = np.full((batch,), prompt_len, np.int32)

    def fresh():
        cache = engine.new_cache(cfg, batch, prompt_len + steps + 1)
        return engine.prefill(cfg, params, cache, prompts, lengths)

    token = jnp.zeros((batch, 1), jnp.int32)
    count = jnp.ones((batch,), jnp.int32)
    _, cache = fresh()
    hlo = engine._extend.lower(cfg, params, cache, token, count, last_only=True).compile().as_text()
    ops = op_table(hlo)
    for _ in range(2):  # compile and warm up
        _, cache = fresh()
        for _ in range(steps):
            logits, cache = engine._extend(cfg, params, cache, token, count, last_only=True)
        jax.block_until_ready(logits)
    _, cache = fresh()
    jax.block_until_ready(cache)
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir):
        for _ in range(steps):
            logits, cache = engine._extend(cfg, params, cache, token, count, last_only=True)
        jax.block_until_ready(logits)
    wall = time.perf_counter() - start
    trace_file = sorted(pathlib.Path(trace_dir).rglob("*.trace.json.gz"), key=os.path.getmtime)[-1]
    with gzip.open(trace_file) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    totals: dict[tuple[str, str], float] = collections.Counter()
    for event in events:
        if event.get("ph") != "X" or event.get("name") not in ops:
            continue
        op_name, container = ops[event["name"]]
        if not container:
            totals[(_part(op_name), operation(op_name))] += event.get("dur", 0) * 1e-6 / steps
    traced = sum(totals.values())
    print(
        f"\nprofile: {cfg.model_type} batch {batch}, {steps} decode steps: {wall / steps * 1e3:.1f} ms per step "
        f"(traced), {traced * 1e3:.1f} ms of it in XLA operations"
    )
    for title, key in (("part", lambda k: k[0]), ("operation", lambda k: f"{k[0]} | {k[1]}")):
        sums = collections.Counter()
        for k, t in totals.items():
            sums[key(k)] += t
        print(f"\n| {title} | ms per step | share |\n|---|---|---|")
        for name, t in sums.most_common(20):
            print(f"| {name} | {t * 1e3:.2f} | {t / traced:.1%} |")


# ---------------------------------------------------------------------------------------------- speculative
def speculative_prompts(tokenizer, count: int, length: int, seed: int = 0) -> list[list[int]]:
    """`count` windows of `length` tokens from the standard library's validation documents (one per document,
    at a random offset)."""
    _, val = v4jax.data.split(v4jax.data.load_documents(None))
    rng = np.random.default_rng(seed)
    prompts = []
    for doc in val:
        ids = tokenizer.encode(doc.text)
        if len(ids) < 2 * length:
            continue
        start = int(rng.integers(0, len(ids) - 2 * length))
        prompts.append(ids[start : start + length])
        if len(prompts) == count:
            break
    return prompts


def extend_seconds(cfg: ModelConfig, params, prompt: list[int], width: int, reps: int = 20) -> float:
    """Best time of one main-model cache extension by `width` tokens at batch 1 (logits of the last one)."""
    params = engine.inference_params(cfg, params)
    cache = engine.new_cache(cfg, 1, len(prompt) + width * (reps + 2))
    _, cache = engine.prefill(cfg, params, cache, [prompt], [len(prompt)])
    tokens, count = jnp.asarray([prompt[-width:]], jnp.int32), jnp.asarray([width], jnp.int32)
    best = math.inf
    for i in range(reps + 1):
        start = time.perf_counter()
        logits, cache = engine._extend(cfg, params, cache, tokens, count, last_only=True)
        logits.block_until_ready()
        if i:  # the first call compiles
            best = min(best, time.perf_counter() - start)
    return best


def run_speculative(args: argparse.Namespace) -> None:
    from experiments.sample import load

    cfg, params, tokenizer, what = load(args.speculative_run, with_mtp=True)
    prompts = speculative_prompts(tokenizer, args.spec_prompts, args.spec_prompt_len)
    new = args.new_tokens
    print(f"{what}: {cfg.model_type}, {len(prompts)} prompts of {args.spec_prompt_len} tokens, {new} new tokens")
    runs = {
        "greedy": lambda p, n: (generate(cfg, params, [p], n), None),
        "speculative": lambda p, n: speculative_generate(cfg, params, [p], n),
    }
    for fn in runs.values():  # compile both lengths
        fn(prompts[0], new)
        fn(prompts[0], 1)
    totals = {name: {"long": 0.0, "short": 0.0} for name in runs}
    counts = collections.Counter()
    for prompt in prompts:
        outs = {}
        for name, fn in runs.items():
            long, short = math.inf, math.inf
            for _ in range(args.repeats):
                start = time.perf_counter()
                outs[name], stats = fn(prompt, new)
                long = min(long, time.perf_counter() - start)
                start = time.perf_counter()
                fn(prompt, 1)
                short = min(short, time.perf_counter() - start)
            totals[name]["long"] += long
            totals[name]["short"] += short
        counts.update(stats)  # the speculative run's
        counts["same"] += outs["greedy"] == outs["speculative"]
        print(f"  {stats}  {tokenizer.decode(outs['speculative'][0])[:70]!r}")
    n_tok, n_prompts = len(prompts) * new, len(prompts)
    print(f"\noutputs equal to greedy: {counts['same']}/{n_prompts}")
    print(
        f"acceptance: {counts['accepted']}/{counts['drafted']} = {counts['accepted'] / counts['drafted']:.1%}; "
        f"{counts['steps']} verification passes for {n_tok} tokens"
    )
    rates = {}
    for name, t in totals.items():
        decode = t["long"] - t["short"]
        rates[name] = (n_tok / t["long"], (n_tok - n_prompts) / decode)
        print(
            f"{name:>12}: end to end {rates[name][0]:8.1f} tokens/s; decode only {rates[name][1]:8.1f} tokens/s "
            f"({decode:.2f} s for {n_tok - n_prompts} tokens)"
        )
    speedup = [rates["speculative"][i] / rates["greedy"][i] for i in (0, 1)]
    print(f"speed-up: end to end {speedup[0]:.2f}x, decode only {speedup[1]:.2f}x")
    greedy_step = (totals["greedy"]["long"] - totals["greedy"]["short"]) / (n_tok - n_prompts)
    spec_step = (totals["speculative"]["long"] - totals["speculative"]["short"]) / (counts["steps"] - n_prompts)
    print(
        f"cost per pass: greedy decode step {greedy_step * 1e3:.2f} ms, speculative draft + verify step "
        f"{spec_step * 1e3:.2f} ms ({spec_step / greedy_step:.2f}x)"
    )
    one, two = (extend_seconds(cfg, params, prompts[0], width) for width in (1, 2))
    print(f"main model alone, one cache extension: 1 token {one * 1e3:.2f} ms, 2 tokens {two * 1e3:.2f} ms")


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="small", help="comma-separated presets")
    p.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64, help="timed decode steps")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--moe-impl", default=None, help="v4jax ModelConfig.moe_impl (default: the preset's)")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--profile", action="store_true", help="trace v4jax decode steps and summarise them")
    p.add_argument("--profile-steps", type=int, default=8)
    p.add_argument("--speculative-run", default=None, help="a run directory: speculative vs greedy at batch 1")
    p.add_argument("--spec-prompts", type=int, default=8)
    p.add_argument("--spec-prompt-len", type=int, default=64)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.speculative_run:
        run_speculative(args)
        return
    threads = cpu_threads()
    bandwidth = memory_bandwidth()
    best_bw = max(bandwidth.values())
    print(
        f"backend {jax.default_backend()}, {threads} CPU threads; bandwidth "
        + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in bandwidth.items())
        + " GB/s"
    )
    new, batches = args.new_tokens, [int(b) for b in args.batches.split(",")]
    context = args.prompt_len + new / 2
    rows = []
    for preset in args.presets.split(","):
        base = v4jax.presets.get(preset).replace(dtype="float32", param_dtype="float32")
        hf_model = random_hf_model(base)
        with tempfile.TemporaryDirectory() as tmp:
            hf_model.save_pretrained(tmp)
            cfg, params = v4jax.hf.load_checkpoint(tmp, mtp="drop")
        if args.moe_impl:
            cfg = cfg.replace(moe_impl=args.moe_impl)
        torch_dec = None if args.skip_torch else TorchDecoder(hf_model, threads)
        jax_dec = JaxDecoder(cfg, params)
        total, active = v4jax.param_counts(cfg)
        print(
            f"\n{preset}: {total / 1e6:.1f}M parameters, {active / 1e6:.1f}M active per token; moe_impl={cfg.moe_impl}"
        )
        if torch_dec is not None:
            print(f"transformers kernels: {torch_dec.kernels}")
        for batch in batches:
            prompts = np.random.default_rng(batch).integers(0, cfg.vocab_size, (batch, args.prompt_len))
            sides = {"v4jax": jax_dec} | ({"PyTorch": torch_dec} if torch_dec is not None else {})
            outputs = {}
            for name, dec in sides.items():  # warm-up: compilation, first-call allocations
                outputs[name] = dec(prompts, new + 1)
                dec(prompts, 1)
            if torch_dec is not None:
                agree = [int(np.argmin(np.append(a == b, False))) for a, b in zip(*outputs.values(), strict=True)]
                print(f"batch {batch}: greedy tokens equal to transformers' before the first difference: {agree}")
            times = {name: {} for name in sides}
            for _ in range(args.repeats):
                for name, dec in sides.items():
                    decode_rate(dec, prompts, new, times[name])
                best_bw = max(best_bw, *memory_bandwidth().values())
            weights, cache = decode_bytes(cfg, batch, int(context))
            ceiling = batch * best_bw / (weights + cache)
            result = {name: _rate(t, batch, new) for name, t in times.items()}
            jax_rate = result["v4jax"][0]
            line = (
                f"{preset} batch {batch:>2}: v4jax {jax_rate:8.1f} decode tokens/s (prefill {result['v4jax'][1]:.3f} s)"
            )
            if "PyTorch" in result:
                line += f"; PyTorch {result['PyTorch'][0]:8.1f} (prefill {result['PyTorch'][1]:.3f} s)"
                line += f"; ratio {jax_rate / result['PyTorch'][0]:.2f}x"
            line += (
                f"; roofline {ceiling:8.1f} tokens/s ({weights / 1e6:.0f} MB weights + {cache / 1e6:.2f} MB cache "
                f"per step at {best_bw / 1e9:.1f} GB/s): {jax_rate / ceiling:.1%}"
            )
            print(line, flush=True)
            rows.append((preset, batch, result, ceiling))
        if args.profile:
            with tempfile.TemporaryDirectory(prefix="v4jax_decode_trace_") as trace_dir:
                for batch in batches:
                    profile_decode(cfg, params, batch, args.prompt_len, args.profile_steps, trace_dir)
        del hf_model, torch_dec, jax_dec, params


if __name__ == "__main__":
    main()
