"""Training throughput of v4jax against PyTorch transformers on the same architecture, in the same process.

    python -m benchmarks.train --preset small_v4 --batch 2 --seq-len 512 --steps 5 [--moe-impl sorted]
    python -m benchmarks.train --preset small --skip-torch --dtype bfloat16 --batch 16   # on a GPU
    python -m benchmarks.train --preset small --profile                               # where the time goes

Three runs of full training steps (forward, backward, gradient clipping, AdamW, parameter update) on the same
random token batches [B, T+1]:

  v4jax       `Trainer.step` with MTP off (num_nextn_predict_layers=0): CE + 1e-4 · sequence balance loss,
              then the aux-loss-free router-bias update. The head-to-head run.
  PyTorch     transformers' DeepseekV3ForCausalLM / DeepseekV4ForCausalLM built from `cfg.to_hf()` (HF keeps no
              MTP module), eager PyTorch (no torch.compile), float32, HF's default attention and experts kernels
              unless --torch-attn / --torch-experts say otherwise; loss: HF's causal-LM loss (CE); grad clip 1.0,
              torch.optim.AdamW (β 0.9/0.95, weight decay 0.1 on matrices).
  v4jax+MTP   the preset's MTP module on, loss CE + 0.3 · MTP + 1e-4 · balance.

Both sides train at a constant learning rate 3e-4, in float32, with the same number of CPU threads (this
process's CPU affinity: XLA:CPU sizes its pool from it, and torch.set_num_threads is set to it; run under
`taskset` to use fewer). The v4jax and PyTorch steps alternate (v4jax step i, then PyTorch step i) so both see
the same load on a shared machine; warm-up steps (compilation included) are not timed. Reported: median and
best step time, tokens/s, the ratio v4jax/PyTorch of median tokens/s, and MFU = tokens/s · model FLOPs per token
/ the matmul peak that each framework reaches on a square matmul in this process (JAX's and torch's are
measured and reported separately; the best of two measurements, before and after the steps).

--profile traces one v4jax step with jax.profiler and sums the time of each XLA operation by where it came from
(forward / backward / optimizer, and model part: attention, MoE experts, router, ...), from the op_name
metadata of the compiled step. Not a test: results go to benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import math
import os
import pathlib
import re
import statistics
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import v4jax
from benchmarks.common import matmul_peak_flops, train_flops_per_token
from v4jax.config import ModelConfig
from v4jax.layers.moe_dispatch import resolve_impl
from v4jax.params import param_counts
from v4jax.sharding import make_mesh
from v4jax.train import TrainConfig, Trainer

LEARNING_RATE = 3e-4
HF_CLASSES = {  # model_type -> (transformers config class, causal LM class)
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
    "deepseek_v32": ("DeepseekV32Config", "DeepseekV32ForCausalLM"),
    "deepseek_v4": ("DeepseekV4Config", "DeepseekV4ForCausalLM"),
}


# ---------------------------------------------------------------------------------------------- configs
def model_config(args: argparse.Namespace) -> ModelConfig:
    """The preset with the run's dtype (bf16 compute keeps float32 params), MoE dispatch and remat policy."""
    cfg = v4jax.presets.get(args.preset)
    changes = {"dtype": args.dtype, "param_dtype": "float32", "remat_policy": args.remat}
    if args.moe_impl is not None:
        changes["moe_impl"] = args.moe_impl
    if args.capacity_factor is not None:
        changes["capacity_factor"] = args.capacity_factor
    return cfg.replace(**changes)


def train_config(total_steps: int, with_mtp: bool) -> TrainConfig:
    """Constant learning rate (no warm-up: step 0 already updates); MTP weight 0.3 with MTP, else 0."""
    return TrainConfig(
        learning_rate=LEARNING_RATE,
        schedule="constant",
        warmup_steps=0,
        total_steps=total_steps,
        mtp_weight=0.3 if with_mtp else 0.0,
    )


def mtp_flops_per_token(cfg: ModelConfig, length: int) -> float:
    """Training FLOPs per token of the MTP modules (3x forward): their active matmul weights, the shared head
    applied once more per module, and one attention layer each (V3: causal MLA; V4: a sliding-window layer)."""
    if cfg.num_nextn_predict_layers == 0:
        return 0.0
    _, main = param_counts(cfg)
    _, with_mtp = param_counts(cfg, include_mtp=True)
    head = cfg.vocab_size * cfg.hidden_size
    n = cfg.num_attention_heads
    if cfg.is_v4:
        attention = 2 * n * 2 * cfg.head_dim * min(cfg.sliding_window, length / 2)
    else:
        attention = 2 * n * (cfg.qk_head_dim + cfg.v_head_dim) * length / 2
    per_module = 2 * ((with_mtp - main) / cfg.num_nextn_predict_layers + head) + attention
    return 3 * per_module * cfg.num_nextn_predict_layers


def token_batches(vocab_size: int, count: int, batch: int, length: int, seed: int = 0) -> list[np.ndarray]:
    """`count` random token windows int32 [batch, length + 1] (the same ones for every run)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, (batch, length + 1), dtype=np.int32) for _ in range(count)]


def cpu_threads() -> int:
    """CPUs this process may run on (XLA:CPU's thread pool follows this affinity)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------- v4jax
class JaxRun:
    """A v4jax `Trainer` on one device; `step(batch)` runs one training step and returns (seconds, metrics)."""

    def __init__(self, cfg: ModelConfig, tcfg: TrainConfig):
        self.cfg = cfg
        self.trainer = Trainer(cfg, tcfg, make_mesh(fsdp=1, devices=jax.devices()[:1]), rules="fsdp")
        self.state = self.trainer.init(jax.random.key(0))

    def step(self, batch: np.ndarray) -> tuple[float, dict[str, float]]:
        start = time.perf_counter()
        self.state, metrics = self.trainer.step(self.state, batch)
        jax.block_until_ready(metrics)
        seconds = time.perf_counter() - start
        return seconds, {k: float(metrics[k]) for k in ("loss", "ce", "mtp", "balance")}


# ---------------------------------------------------------------------------------------------- PyTorch
class TorchRun:
    """transformers' causal LM of `cfg` trained in float32 eager PyTorch with AdamW and gradient clipping."""

    def __init__(self, cfg: ModelConfig, threads: int, attn: str | None, experts: str | None, seed: int = 0):
        import torch
        import transformers

        torch.set_num_threads(threads)
        config_class, model_class = HF_CLASSES[cfg.model_type]
        hf_cfg = getattr(transformers, config_class)(
            **{k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "dtype")}
        )
        kwargs = {"dtype": torch.float32}
        if attn is not None:
            kwargs["attn_implementation"] = attn
        if experts is not None:
            kwargs["experts_implementation"] = experts
        torch.manual_seed(seed)
        model = getattr(transformers, model_class)._from_config(hf_cfg, **kwargs)
        with torch.no_grad():  # transformers initialises the V4 hash tables to expert 0: use random valid experts
            for name, buffer in model.named_buffers():
                if name.endswith("tid2eid"):
                    buffer.random_(0, cfg.n_routed_experts)
        model.train()
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
            lr=LEARNING_RATE,
            betas=(0.9, 0.95),
            eps=1e-8,
        )
        self.model, self.torch, self.vocab_size = model, torch, cfg.vocab_size
        self.kernels = f"attention={model.config._attn_implementation}, experts={model.config._experts_implementation}"

    def step(self, batch: np.ndarray) -> tuple[float, dict[str, float]]:
        torch = self.torch
        tokens = torch.from_numpy(batch).long()
        start = time.perf_counter()
        logits = self.model(input_ids=tokens[:, :-1], use_cache=False).logits
        labels = tokens[:, 1:].contiguous()
        loss = self.model.loss_function(logits, None, vocab_size=self.vocab_size, shift_labels=labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        return time.perf_counter() - start, {"loss": value, "ce": value}


def torch_matmul_peak_flops(size: int = 2048, repeats: int = 5) -> float:
    """Measured float32 FLOP/s of a square torch.mm of `size` (best of `repeats`, after a warm-up)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


# ---------------------------------------------------------------------------------------------- timing
def run_steps(runs: dict[str, Callable], batches: list[np.ndarray], warmup: int) -> dict[str, dict]:
    """Step every run on batch i in turn (run a step i, run b step i, ...): warm-up steps first, untimed.

    Returns per run {'times': timed step seconds, 'first': metrics of step 0, 'last': metrics of the last step}.
    """
    out = {name: {"times": []} for name in runs}
    for i, batch in enumerate(batches):
        for name, step in runs.items():
            seconds, metrics = step(batch)
            print(f"  {name:<10} step {i}: {seconds:8.2f} s  loss {metrics['loss']:.4f}", flush=True)
            if i == 0:
                out[name]["first"] = metrics
            if i >= warmup:
                out[name]["times"].append(seconds)
            out[name]["last"] = metrics
    return out


# ---------------------------------------------------------------------------------------------- profile
PHASES = (("backward", "transpose("), ("forward", "jvp("))
# (part, test on the op_name's path components), first match wins; the loss and the optimizer are told apart
# by having no model component in their path
PARTS: tuple[tuple[str, Callable[[list[str]], bool]], ...] = (
    ("MoE routed experts", lambda c: "routed_experts" in c),
    ("MoE router", lambda c: "router" in c or any(x.startswith("gate") for x in c)),
    ("MoE shared expert", lambda c: "shared_experts" in c),
    ("attention: indexer", lambda c: "indexer" in c),
    ("attention: compressor", lambda c: "compressor" in c),
    ("attention", lambda c: any(x.startswith("attn") for x in c)),
    ("dense FFN", lambda c: "ffn" in c),
    ("mHC", lambda c: any(x.startswith("hc_") for x in c)),
    ("head / logits", lambda c: "head" in c or "Transformer.logits" in c),
    ("embedding", lambda c: "embed" in c),
    ("norms", lambda c: any(x.endswith("norm") for x in c)),
    ("MTP projections", lambda c: any(x.startswith("mtp_") for x in c)),
)
CONTAINERS = (" while(", " conditional(", " call(")  # thunks whose time is that of the thunks inside them


def op_table(hlo_text: str) -> dict[str, tuple[str, bool]]:
    """{instruction name: (op_name metadata, is a control-flow container)} of a compiled HLO module's text."""
    table = {}
    for line in hlo_text.splitlines():
        match = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+) = ", line)
        if not match:
            continue
        op_name = re.search(r'op_name="([^"]*)"', line)
        head = line.split(", metadata=")[0]
        table[match.group(1)] = (op_name.group(1) if op_name else "", any(c in head for c in CONTAINERS))
    return table


def categorise(op_name: str) -> tuple[str, str]:
    """(phase, part) of an XLA operation from its op_name: forward/backward of a model part, or the rest."""
    phase = next((p for p, key in PHASES if key in op_name), "optimizer & update")
    if "Transformer" not in op_name:
        return phase, "optimizer, clipping, bias update" if phase == "optimizer & update" else "loss"
    components = op_name.split("/")
    for part, test in PARTS:
        if test(components):
            return phase, part
    return phase, "other model ops"


def operation(op_name: str) -> str:
    """An op_name without the transformation wrappers, loop plumbing and layer names: one name for the same
    operation in every layer, e.g. 'attn.attend/wq_b/BTQ,QNC->BTNC/dot_general'."""
    skip = ("while", "body", "closed_call", "cond", "checkpoint", "Transformer.decode")
    parts = [p for p in op_name.split("/") if p not in skip and not p.startswith(("jit(", "jvp(", "transpose("))]
    parts = [p for p in parts if not re.fullmatch(r"(layers?_\d+|dense_layers|moe_layers|mtp_\d+)", p)]
    return "/".join(parts) or "(no op_name)"


def profile_step(run: JaxRun, batch: np.ndarray, trace_dir: str) -> tuple[float, dict[tuple[str, str, str], float]]:
    """Trace one step of `run` and sum each XLA operation's traced time by (phase, part, operation).

    Returns (the traced step's wall seconds, {(phase, part, operation): seconds}). Times are summed over threads:
    an operation runs on one pool thread (its matmuls may use the others), so the sum is close to wall time
    when operations run one after another.
    """
    trainer = run.trainer
    hlo = trainer._step.lower(run.state, trainer.check_batch(batch)).compile().as_text()
    ops = op_table(hlo)
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        seconds, _ = run.step(batch)
    trace_file = sorted(pathlib.Path(trace_dir).rglob("*.trace.json.gz"), key=os.path.getmtime)[-1]
    with gzip.open(trace_file) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    totals: dict[tuple[str, str, str], float] = collections.Counter()
    for event in events:
        if event.get("ph") != "X" or event.get("name") not in ops:
            continue
        op_name, container = ops[event["name"]]
        if not container:
            totals[(*categorise(op_name), operation(op_name))] += event.get("dur", 0) * 1e-6
    return seconds, dict(totals)


def print_profile(seconds: float, totals: dict[tuple[str, str, str], float], top: int = 15) -> None:
    traced = sum(totals.values())
    print(f"\nProfile of one v4jax step: {seconds:.2f} s wall, {traced:.2f} s in traced XLA operations")
    for title, key in (
        ("phase", lambda k: k[0]),
        ("part (forward + backward)", lambda k: k[1]),
        ("phase | part", lambda k: f"{k[0]} | {k[1]}"),
        ("phase | operation", lambda k: f"{k[0]} | {k[2]}"),
    ):
        sums = collections.Counter()
        for k, t in totals.items():
            sums[key(k)] += t
        print(f"\n| {title} | seconds | share |\n|---|{'---|' * title.count('|')}---|---|")
        for name, t in sums.most_common(top):
            print(f"| {name} | {t:.3f} | {t / traced:.1%} |")


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small_v4", choices=sorted(v4jax.presets.PRESETS))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
    parser.add_argument("--moe-impl", default=None, help="ModelConfig.moe_impl (default: the preset's, 'auto')")
    parser.add_argument("--capacity-factor", type=float, default=None, help="ModelConfig.capacity_factor")
    parser.add_argument("--remat", default="none", help="ModelConfig.remat_policy")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="v4jax compute dtype")
    parser.add_argument("--skip-torch", action="store_true", help="no PyTorch run (e.g. on a GPU)")
    parser.add_argument("--skip-mtp", action="store_true", help="no v4jax run with MTP on")
    parser.add_argument("--torch-attn", default=None, help="transformers attn_implementation (default: HF's)")
    parser.add_argument("--torch-experts", default=None, help="transformers experts_implementation (default: HF's)")
    parser.add_argument("--profile", action="store_true", help="trace one v4jax step and summarise it")
    parser.add_argument("--profile-dir", default=None, help="keep the trace here (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.dtype != "float32" and not args.skip_torch:
        parser.error("the PyTorch comparison runs in float32 only: pass --skip-torch with --dtype bfloat16")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be ≥ 1 and --warmup ≥ 0")
    return args


def summary_row(name: str, times: list[float], tokens: int, flops_per_token: float, peak: float) -> dict:
    """Median and best step of a run, as seconds, tokens/s and MFU against `peak` FLOP/s."""
    row = {"run": name}
    for stat, seconds in (("median", statistics.median(times)), ("best", min(times))):
        row[f"{stat}_s"] = seconds
        row[f"{stat}_tokens_per_s"] = tokens / seconds
        row[f"{stat}_mfu"] = tokens / seconds * flops_per_token / peak
    return row


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = model_config(args)
    head_cfg = cfg.replace(num_nextn_predict_layers=0)
    threads = cpu_threads()
    backend = jax.default_backend()
    peak_size = 2048 if backend == "cpu" else 8192
    compute_dtype = jnp.dtype(args.dtype)
    load = os.getloadavg()
    print(
        f"{args.preset}: backend {backend} ({jax.devices()[0].device_kind}), {threads} CPU threads, "
        f"batch {args.batch}x{args.seq_len}, dtype {args.dtype}, moe_impl {cfg.moe_impl} -> "
        f"{resolve_impl(cfg.moe_impl)}, capacity_factor {cfg.capacity_factor}, remat {cfg.remat_policy}; "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        flush=True,
    )
    batches = token_batches(cfg.vocab_size, 1 + args.warmup + args.steps, args.batch, args.seq_len)
    warmup = 1 + args.warmup  # step 0 compiles
    tokens = args.batch * args.seq_len
    peaks = {"jax": matmul_peak_flops(compute_dtype, size=peak_size)}
    if backend != "cpu" or args.dtype != "float32":
        other = jnp.float32 if args.dtype != "float32" else jnp.bfloat16
        peaks[f"jax {jnp.dtype(other).name}"] = matmul_peak_flops(other, size=peak_size)

    jax_run = JaxRun(head_cfg, train_config(len(batches), with_mtp=False))
    runs: dict[str, Callable] = {"v4jax": jax_run.step}
    torch_run = None
    if not args.skip_torch:
        torch_run = TorchRun(head_cfg, threads, args.torch_attn, args.torch_experts)
        peaks["torch"] = torch_matmul_peak_flops(peak_size)
        runs["PyTorch"] = torch_run.step
        print(f"PyTorch {torch_run.torch.__version__}: {torch_run.kernels}", flush=True)
    results = run_steps(runs, batches, warmup)
    profile = None
    if args.profile:
        trace_dir = args.profile_dir or tempfile.mkdtemp(prefix="v4jax_trace_")
        profile = profile_step(jax_run, batches[-1], trace_dir)
    del runs, jax_run, torch_run

    if not args.skip_mtp and cfg.num_nextn_predict_layers > 0:
        mtp_run = JaxRun(cfg, train_config(len(batches), with_mtp=True))
        results.update({"v4jax+MTP": run_steps({"v4jax+MTP": mtp_run.step}, batches, warmup)["v4jax+MTP"]})
        del mtp_run

    peaks["jax"] = max(peaks["jax"], matmul_peak_flops(compute_dtype, size=peak_size))
    if "torch" in peaks:
        peaks["torch"] = max(peaks["torch"], torch_matmul_peak_flops(peak_size))
    flops = train_flops_per_token(head_cfg, args.seq_len)
    rows = [summary_row("v4jax", results["v4jax"]["times"], tokens, flops, peaks["jax"])]
    if "PyTorch" in results:
        rows.append(summary_row("PyTorch", results["PyTorch"]["times"], tokens, flops, peaks["torch"]))
    if "v4jax+MTP" in results:
        mtp_flops = flops + mtp_flops_per_token(cfg, args.seq_len)
        rows.append(summary_row("v4jax+MTP", results["v4jax+MTP"]["times"], tokens, mtp_flops, peaks["jax"]))

    load = os.getloadavg()
    print(f"\nload average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(
        "matmul peaks ("
        + ", ".join(f"{k}: {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items())
        + f"); model FLOPs/token {flops / 1e6:.1f} M (MTP run: +{mtp_flops_per_token(cfg, args.seq_len) / 1e6:.1f} M)"
    )
    print(f"ln(vocab) = {math.log(cfg.vocab_size):.4f}\n")
    print(
        f"| {args.preset} | median step | tokens/s | MFU | best step | tokens/s | MFU | CE at step 0 | CE at the end |"
        "\n|---|---|---|---|---|---|---|---|---|"
    )
    for row in rows:
        first, last = results[row["run"]]["first"], results[row["run"]]["last"]
        cells = [
            f"{row[f'{stat}_s']:.2f} s | {row[f'{stat}_tokens_per_s']:.1f} | {row[f'{stat}_mfu']:.1%}"
            for stat in ("median", "best")
        ]
        print(f"| {row['run']} | {' | '.join(cells)} | {first['ce']:.4f} | {last['ce']:.4f} |")
    if "PyTorch" in results:
        ratios = [rows[0][f"{s}_tokens_per_s"] / rows[1][f"{s}_tokens_per_s"] for s in ("median", "best")]
        print(f"\nv4jax / PyTorch tokens/s: {ratios[0]:.2f}x (median steps), {ratios[1]:.2f}x (best steps)")
    if profile is not None:
        print_profile(*profile)


if __name__ == "__main__":
    main()
