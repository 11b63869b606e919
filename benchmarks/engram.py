"""Training step time with the Engram table in host memory against the table in device memory, in one run.

    python -m benchmarks.engram --rows-per-head 1048576 --batch 8 --seq-len 128 --steps 6

Model: `tiny_v4_engram` cut to two layers (D=64; layer 0 sliding attention + hash MoE, layer 1 CSA + MoE with
Engram: 2 orders × 4 hash heads of W=16; no MTP module) with its table grown to 8 heads of about
`--rows-per-head` rows each (float32), so the table is far larger than the rest of the model. The same
initial params and token batches [B, T+1] for both; the two kinds of step alternate (device step i, then
host step i) so both see the same load on a shared machine.

  device  `Trainer.step`: the table is a param; the step gathers its rows, scatters their gradient into a
          dense table gradient and AdamW updates every row (moments 2 × the table).
  host    `HostTables` (`v4jax.engram_memory`) + `Trainer(engram_tables='host').step_with_rows`, timed in parts:
            lookup  hash the batch's n-grams on the host (needs only token ids: can run ahead in a loader)
            gather  table[ids] on the host + device_put of the rows [B, T, Z, W]
            step    the device step (the rest of the model), returning ∂L/∂rows
            update  ∂L/∂rows to the host, summed per row id, row-wise Adagrad on the rows looked up
          host step = gather + step + update (lookup ahead); serial = all four.

Both run AdamW (constant learning rate 3e-4) on the other params. Reported: median seconds of each part over
`--steps` timed steps (after one warm-up step that compiles), the ratios host / device, and with `--forward`
the logits alone (no training: device table vs host-gathered rows, the paper's inference setting). Not a test:
results go to benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import v4jax
from v4jax.engram_memory import HostTables, RowOptimizer
from v4jax.layers.engram import hash_plan
from v4jax.model import Transformer, split_collections
from v4jax.sharding import make_mesh
from v4jax.train import TrainConfig, Trainer


def config(rows_per_head: int) -> v4jax.config.ModelConfig:
    """`tiny_v4_engram` cut to its first two layers (sliding attention + hash MoE; CSA + Engram + MoE), no MTP
    module (a short compilation), with 8 table heads of about `rows_per_head` rows each."""
    return v4jax.presets.tiny_v4_engram().replace(
        num_hidden_layers=2,
        layer_types=("sliding_attention", "compressed_sparse_attention"),
        num_nextn_predict_layers=0,
        engram_vocab_size=(rows_per_head, rows_per_head),
    )


def timed(fn):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows-per-head", type=int, default=1 << 20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--forward", action="store_true", help="also time the logits alone")
    args = parser.parse_args()

    cfg = config(args.rows_per_head)
    rows, w = hash_plan(cfg).layers[1].table_rows, cfg.engram_head_dim
    tcfg = TrainConfig(learning_rate=3e-4, schedule="constant", warmup_steps=0, total_steps=10**6)
    mesh = make_mesh(fsdp=1, devices=jax.devices()[:1])
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, cfg.vocab_size, (args.batch, args.seq_len + 1), dtype=np.int32)
               for _ in range(args.steps + 1)]  # fmt: skip

    start = time.perf_counter()
    params = v4jax.model.init_params(cfg, jax.random.key(0))
    params = jax.tree.map(np.asarray, params)  # host copies: each trainer places its own
    init_s = time.perf_counter() - start
    tables, without = HostTables.from_params(cfg, params, RowOptimizer(learning_rate=1e-2))
    table_bytes = tables.nbytes
    other = sum(x.size for x in jax.tree.leaves(without) if x.dtype == np.float32)
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; init {init_s:.1f} s")
    print(f"table: {rows:,} rows x W={w} float32 = {table_bytes / 2**20:.0f} MiB; other params {other:,} "
          f"({other * 4 / 2**20:.1f} MiB); batch {args.batch} x {args.seq_len} tokens, "
          f"{args.batch * args.seq_len * cfg.engram_num_hash_heads:,} row lookups per step")  # fmt: skip

    device = Trainer(cfg, tcfg, mesh)
    host = Trainer(cfg, tcfg, mesh, engram_tables="host")
    d_state = device.init(params=params)
    h_state = host.init(params=without)
    del params

    times: dict[str, list[float]] = {k: [] for k in ("device", "lookup", "gather", "step", "update")}
    for i, batch in enumerate(batches):
        compile_run = i == 0
        (d_state, d_metrics), t_device = timed(lambda b=batch, s=d_state: device.step(s, b))
        ids, t_lookup = timed(lambda b=batch: tables.lookup(b[:, :-1]))
        rows_on_device, t_gather = timed(lambda ids=ids: tables.gather(ids, host.engram_rows_sharding))
        (h_state, h_metrics, row_grads), t_step = timed(
            lambda b=batch, r=rows_on_device, s=h_state: host.step_with_rows(s, b, r)
        )
        _, t_update = timed(lambda ids=ids, g=row_grads: tables.apply_gradients(ids, g))
        if compile_run:
            print(f"compile + first step: device {t_device:.1f} s, host {t_step:.1f} s")
            print(f"step 0 loss: device {float(d_metrics['loss']):.6f}, host {float(h_metrics['loss']):.6f}")
            continue
        for key, value in zip(times, (t_device, t_lookup, t_gather, t_step, t_update), strict=True):
            times[key].append(value)

    med = {k: median(v) for k, v in times.items()}
    host_step = med["gather"] + med["step"] + med["update"]
    serial = host_step + med["lookup"]
    print(f"median of {args.steps} steps (seconds):")
    print(f"  device table step              {med['device']:.4f}")
    print(f"  host: lookup (hash, ahead)     {med['lookup']:.4f}")
    print(f"        gather + device_put      {med['gather']:.4f}")
    print(f"        device step              {med['step']:.4f}")
    print(f"        grads back + row update  {med['update']:.4f}")
    print(f"        step (lookup ahead)      {host_step:.4f}   host / device = {host_step / med['device']:.3f}")
    print(f"        serial (all four)        {serial:.4f}   host / device = {serial / med['device']:.3f}")

    if args.forward:
        d_params = d_state["params"]
        h_params = h_state["params"]
        forward_device = jax.jit(lambda p, t: Transformer(cfg).apply(split_collections(p), t, with_mtp=False)[0])
        forward_host = jax.jit(
            lambda p, t, r: Transformer(cfg).apply(split_collections(p), t, with_mtp=False, engram_rows=r)[0]
        )
        f_times: dict[str, list[float]] = {"device": [], "prefetch": [], "host": []}
        for i, batch in enumerate(batches):
            tokens = jnp.asarray(batch[:, :-1])
            _, t_device = timed(lambda t=tokens: forward_device(d_params, t))
            fetched, t_prefetch = timed(lambda b=batch: tables.prefetch(b[:, :-1]).rows)
            _, t_host = timed(lambda t=tokens, r=fetched: forward_host(h_params, t, r))
            if i:
                for key, value in zip(f_times, (t_device, t_prefetch, t_host), strict=True):
                    f_times[key].append(value)
        fm = {k: median(v) for k, v in f_times.items()}
        print(f"logits only: device table {fm['device']:.4f} s; host rows {fm['host']:.4f} s + prefetch "
              f"{fm['prefetch']:.4f} s; host / device = {fm['host'] / fm['device']:.3f} (prefetch ahead), "
              f"{(fm['host'] + fm['prefetch']) / fm['device']:.3f} (serial)")  # fmt: skip
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak resident memory {peak:.2f} GiB")


if __name__ == "__main__":
    main()
