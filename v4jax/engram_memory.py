"""Engram tables kept outside the device parameters: in host memory (NumPy) or memory-mapped on disk.

A table row is read only where a token's hashed n-gram points, and the row ids depend on the token ids alone,
so a batch's rows can be looked up on the host before its step and only they cross to the device:

    tables, params = HostTables.from_params(cfg, params)        # the `table` leaves leave the params tree
    fetched = tables.prefetch(inputs)                           # host: hash, gather; then device_put
    logits, _, _ = Transformer(cfg).apply(split_collections(params), inputs, engram_rows=fetched.rows)

Per Engram layer l (letters of `v4jax.layers.engram`):
    ids_l   = ngram_hash_ids_np(canonical[tokens])          int32 [B, T, Z]   (`lookup`; the data loader)
    rows_l  = table_l[ids_l]                                 [B, T, Z, W]      (`gather`, then to the device)
The model reads rows_l where it would read table_l[ids_l] (`DecoderLayer`'s `engram_rows`), so the logits
equal those of the device-resident table. Training (`Trainer(..., engram_tables='host').step_with_rows`)
returns ∂L/∂rows_l; its rows are summed per unique id, which is ∂L/∂table_l on the rows looked up (zero
elsewhere), and the row optimizer updates only those rows on the host (`apply_gradients`).

Row optimizer (`RowOptimizer`). Dense Adam moments would add 2 × the table (architecture.md §9.6) and touch
every row on every step. Rows of a hashed n-gram table are hit with very uneven frequency, mostly not at all
in a given step, so the default is row-wise Adagrad (the rule large recommendation-embedding trainers use):
one float32 accumulator per row, 1/W of the table, and a step that reads and writes only the rows hit:
    G_r   = Σ over the batch's occurrences of row r of ∂L/∂rows                     [W]
    a_r  += mean_w G_r²                                                              a: float32 [rows]
    row_r -= lr · G_r / (√a_r + eps)
No weight decay (the device recipe does not decay the tables either). 'sgd' (row_r -= lr · G_r) is the
stateless alternative. The table rows are not part of the device step's global-norm clipping.

Ordering. Hashing (`lookup`) needs only token ids and can run any number of batches ahead; the rows must be
gathered after the previous step's row update (`gather` is the cheap part), else rows shared by
consecutive batches are one update stale.

Placement (`placement`). 'numpy' (default): writable NumPy arrays in host RAM, updated in place row by row.
'pinned_host': jax arrays in the JAX memory kind `pinned_host`; the batch's rows are gathered by a jitted
gather whose output lands in device memory (the ids go to pinned_host memory too: XLA gathers within one
memory space), and the row update is a jitted scatter of the changed rows into the donated table, which
stays in pinned_host memory. With `spill_dir` the tables are `np.memmap` files on disk instead. On a GPU the
pinned_host copy is what the device reads over PCIe; on a CPU backend "host" and "device" memory are the same
DRAM, so there the placement only changes which program touches the table. One process holds every row of a
table; over several hosts each would hold its row shard (rows split like ENGRAM_ROWS) and answer the lookups
for it (not implemented).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import traverse_util

from v4jax.config import ModelConfig
from v4jax.layers.engram import layer_plan, ngram_hash_ids_np
from v4jax.model import is_unstacked, layer_location, unstacked_name

ROW_OPTIMIZERS = ("rowwise_adagrad", "sgd")
PLACEMENTS = ("numpy", "pinned_host")
_ROWS = jax.lax.GatherDimensionNumbers(offset_dims=(1,), collapsed_slice_dims=(0,), start_index_map=(0,))


def _take_rows(table: jax.Array, ids: jax.Array) -> jax.Array:
    """table[ids] for ids int32 [N] already checked to lie in the table: [N, W] (a plain `lax.gather`, which
    unlike `jnp.take` adds no bound-check constants living in another memory space)."""
    return jax.lax.gather(
        table, ids[:, None], _ROWS, (1, table.shape[1]), mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS
    )


class _PinnedOps(NamedTuple):
    """Jitted row access to a table in pinned_host memory of one device."""

    host: jax.sharding.Sharding  # pinned_host memory of the device
    read: Any  # (table, ids in pinned_host) -> rows [N, W] in device memory
    write: Any  # (table (donated), ids [N], rows [N, W]) -> the table with those rows replaced, in pinned_host


@functools.cache
def _pinned_ops(device: jax.Device) -> _PinnedOps:
    host = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
    on_device = jax.sharding.SingleDeviceSharding(device, memory_kind="device")
    read = jax.jit(_take_rows, out_shardings=on_device)
    write = jax.jit(lambda table, ids, rows: table.at[ids].set(rows), out_shardings=host, donate_argnums=0)
    return _PinnedOps(host, read, write)


# ----------------------------------------------------------------- where the tables are in a params tree
def table_location(cfg: ModelConfig, layer: int, unstacked: bool = False) -> tuple[tuple[str, ...], int | None]:
    """(path of the Engram module of decoder layer `layer` in the params tree, index on the leading `layers`
    axis of its leaves, or None in the inference layout `unstacked`)."""
    layer_plan(cfg, layer)  # names the config field when `layer` carries no Engram
    if unstacked:
        return (unstacked_name(layer), "engram"), None
    group, repeat, sub = layer_location(cfg, layer)
    return ((group, "engram") if sub is None else (group, sub, "engram")), repeat


def table_paths(cfg: ModelConfig, unstacked: bool = False) -> dict[int, tuple[str, ...]]:
    """{Engram layer: path of its `table` leaf} in a params tree (stacked layout unless `unstacked`)."""
    return {layer: (*table_location(cfg, layer, unstacked)[0], "table") for layer in cfg.engram_layer_ids}


def without_tables(cfg: ModelConfig, tree: dict[str, Any]) -> dict[str, Any]:
    """`tree` (params, or anything shaped like them: logical specs, shardings, abstract arrays) without the
    Engram `table` leaves; the other leaves are the same objects."""
    flat = traverse_util.flatten_dict(tree)
    for path in table_paths(cfg, is_unstacked(tree)).values():
        flat.pop(path, None)
    return traverse_util.unflatten_dict(flat)


def has_tables(cfg: ModelConfig, tree: dict[str, Any]) -> list[int]:
    """The Engram layers whose `table` is in `tree`."""
    flat = traverse_util.flatten_dict(tree)
    return [layer for layer, path in table_paths(cfg, is_unstacked(tree)).items() if path in flat]


# ----------------------------------------------------------------- gradient scatter
def scatter_row_grads(ids: np.ndarray, grads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum the gradients of gathered rows per row id: ids int [B, T, Z], grads [B, T, Z, W] ->
    (unique ids int64 [U] ascending, float32 [U, W] sums); dense: ∂L/∂table[unique] (zero at other rows)."""
    ids = np.asarray(ids)
    grads = np.asarray(grads)
    if grads.shape[:-1] != ids.shape:
        raise ValueError(f"row gradients of shape {grads.shape} do not match row ids of shape {ids.shape} [..., W]")
    flat_ids = ids.reshape(-1).astype(np.int64)
    flat = grads.reshape(flat_ids.size, grads.shape[-1]).astype(np.float32, copy=False)
    order = np.argsort(flat_ids, kind="stable")
    unique, starts = np.unique(flat_ids[order], return_index=True)
    return unique, np.add.reduceat(flat[order], starts, axis=0)


# ----------------------------------------------------------------- the host tables
@dataclasses.dataclass(frozen=True)
class RowOptimizer:
    """The sparse update of host-table rows (see the module docstring): 'rowwise_adagrad' or 'sgd'."""

    kind: str = "rowwise_adagrad"
    learning_rate: float = 1e-2
    eps: float = 1e-8  # rowwise_adagrad: added to √a_r
    initial_accumulator: float = 0.0  # rowwise_adagrad: a_r before the first step

    def __post_init__(self):
        if self.kind not in ROW_OPTIMIZERS:
            raise ValueError(f"RowOptimizer.kind={self.kind!r}; choose one of {ROW_OPTIMIZERS}")


class Prefetched(NamedTuple):
    """One batch's Engram lookups: host row ids {str(layer): int32 [B, T, Z]} (for the gradient update) and
    the gathered rows {str(layer): [B, T, Z, W]} on the device (`Transformer.__call__`'s `engram_rows`)."""

    ids: dict[str, np.ndarray]
    rows: dict[str, jax.Array]


class HostTables:
    """The Engram tables of a model outside its device params, with their canonical maps and row optimizer.

    Attributes: `tables` {layer: [table_rows, W]} (NumPy, np.memmap, or a jax array in pinned_host memory;
    weight dtype), `canonical` {layer:
    int32 [vocab]}, `optimizer`, `accumulators` {layer: float32 [table_rows]} (row-wise Adagrad), `steps`.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        tables: dict[int, np.ndarray],
        canonical: dict[int, np.ndarray],
        optimizer: RowOptimizer | None = None,
        spill_dir: str | None = None,
        placement: str = "numpy",
    ):
        if placement not in PLACEMENTS:
            raise ValueError(f"HostTables placement={placement!r}; choose one of {PLACEMENTS}")
        if placement != "numpy" and spill_dir is not None:
            raise ValueError("HostTables: spill_dir (memory-mapped tables) takes placement='numpy'")
        self.cfg = cfg
        self.optimizer = optimizer or RowOptimizer()
        self.placement = placement
        self.spill_dir = None
        if spill_dir is not None:
            os.makedirs(spill_dir, exist_ok=True)
            self.spill_dir = tempfile.mkdtemp(prefix="v4jax-engram-", dir=spill_dir)
        self.tables, self.canonical, self.accumulators = {}, {}, {}
        w = cfg.engram_head_dim
        for layer in cfg.engram_layer_ids:
            if layer not in tables or layer not in canonical:
                raise ValueError(f"HostTables: no table or canonical map for Engram layer {layer} "
                                 f"(ModelConfig.engram_layer_ids={cfg.engram_layer_ids})")  # fmt: skip
            rows = layer_plan(cfg, layer).table_rows
            table = tables[layer]
            if tuple(table.shape) != (rows, w):
                raise ValueError(f"Engram layer {layer}: table of shape {tuple(table.shape)}, expected {(rows, w)} "
                                 "(table_rows, engram_head_dim)")  # fmt: skip
            self.tables[layer] = self._store(layer, table)
            self.canonical[layer] = np.asarray(canonical[layer], np.int32)
            if self.canonical[layer].shape != (cfg.vocab_size,):
                raise ValueError(f"Engram layer {layer}: canonical map of shape {self.canonical[layer].shape}, "
                                 f"expected ({cfg.vocab_size},) (vocab_size)")  # fmt: skip
            if self.optimizer.kind == "rowwise_adagrad":
                self.accumulators[layer] = np.full(rows, self.optimizer.initial_accumulator, np.float32)
        self.steps = 0

    def _store(self, layer: int, table: Any) -> np.ndarray | jax.Array:
        """A writable host copy of `table`: NumPy, a memory-mapped file under spill_dir, or a jax array in
        pinned_host memory (`placement`)."""
        if self.placement == "pinned_host":
            return jax.device_put(np.asarray(table), _pinned_ops(jax.devices()[0]).host)
        if self.spill_dir is None:
            return np.array(table)  # a copy: the update writes into it
        path = os.path.join(self.spill_dir, f"engram_table_{layer}.npy")
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=table.dtype, shape=table.shape)
        mm[...] = np.asarray(table)
        mm.flush()
        return mm

    @classmethod
    def from_params(
        cls,
        cfg: ModelConfig,
        params: dict[str, Any],
        optimizer: RowOptimizer | None = None,
        spill_dir: str | None = None,
        placement: str = "numpy",
    ) -> tuple[HostTables, dict[str, Any]]:
        """Move every Engram `table` out of a merged params tree (`model.init_params`, stacked or inference
        layout) into host memory (`placement`, or disk with `spill_dir`) -> (HostTables, the params without the
        tables; other leaves as given)."""
        if not cfg.engram_layer_ids:
            raise ValueError("HostTables.from_params: the config has no Engram layers (ModelConfig.engram_layer_ids)")
        unstacked = is_unstacked(params)
        flat = traverse_util.flatten_dict(params)
        tables, canonical = {}, {}
        for layer in cfg.engram_layer_ids:
            module, repeat = table_location(cfg, layer, unstacked)
            name = "/".join(module)
            if (*module, "table") not in flat:
                raise ValueError(f"HostTables.from_params: no Engram table at {name}/table (already moved out?)")
            if (*module, "canonical") not in flat:
                raise ValueError(f"HostTables.from_params: no canonical map at {name}/canonical: pass the merged "
                                 "params tree (`model.init_params`, params and constants)")  # fmt: skip
            table, canon = np.asarray(flat[(*module, "table")]), np.asarray(flat[(*module, "canonical")])
            if repeat is not None:
                if table.shape[0] != 1:
                    raise ValueError(f"{name}/table has {table.shape[0]} stacked layers; an Engram layer is its own "
                                     "layer group (1 expected)")  # fmt: skip
                table, canon = table[repeat], canon[repeat]
            tables[layer], canonical[layer] = table, canon
        return cls(cfg, tables, canonical, optimizer, spill_dir, placement), without_tables(cfg, params)

    def to_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """`params` (without tables, as from `from_params`) with copies of the current tables put back (NumPy
        arrays, with the leading `layers` axis in the stacked layout): for checkpoints and sampling."""
        unstacked = is_unstacked(params)
        flat = traverse_util.flatten_dict(params)
        for layer, table in self.tables.items():
            module, repeat = table_location(self.cfg, layer, unstacked)
            if (*module, "table") in flat:
                raise ValueError(f"HostTables.to_params: {'/'.join(module)}/table is already in the params")
            flat[(*module, "table")] = np.array(table) if repeat is None else np.array(table)[None]
        return traverse_util.unflatten_dict(flat)

    @property
    def nbytes(self) -> int:
        """Bytes of all tables (optimizer state not included)."""
        return sum(t.nbytes for t in self.tables.values())

    # ------------------------------------------------------------- prefetch
    def lookup(self, token_ids: np.ndarray, positions: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Row ids {str(layer): int32 [B, T, Z]} of raw token ids int [B, T] (the model's inputs), hashed on the
        host exactly as `Engram.hash_ids` (pad before the start; `positions` [B, T] restart documents)."""
        tokens = np.asarray(token_ids)
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"token_ids must be integers [B, T], got {tokens.dtype} {tokens.shape}")
        cfg, out = self.cfg, {}
        for layer, canonical in self.canonical.items():
            inside = (tokens >= 0) & (tokens < cfg.vocab_size)  # as `canonicalize`: others pass through
            ids = np.where(inside, canonical[np.clip(tokens, 0, cfg.vocab_size - 1)], tokens)
            pad = int(canonical[cfg.engram_pad_id])
            previous = np.full((tokens.shape[0], cfg.engram_max_ngram_size - 1), pad, np.int64)
            out[str(layer)] = ngram_hash_ids_np(cfg, layer, ids, previous, positions, pad)
        return out

    def gather(self, ids: dict[str, np.ndarray], sharding: jax.sharding.Sharding | None = None) -> dict[str, jax.Array]:
        """table[ids] per layer -> rows {str(layer): [B, T, Z, W]} in the compute dtype, placed by `sharding`
        (e.g. `Trainer.engram_rows_sharding`; None: the default device)."""
        rows = {}
        for key, layer_ids in ids.items():
            layer_ids = np.asarray(layer_ids)
            found = self._read(key, layer_ids.reshape(-1)).reshape(*layer_ids.shape, -1)
            rows[key] = jax.device_put(found.astype(self.cfg.compute_dtype), sharding)
        return rows

    def _read(self, key: str, ids: np.ndarray) -> np.ndarray | jax.Array:
        """Rows ids [N] of layer `key`'s table: [N, W] (NumPy, or in device memory from a pinned_host table)."""
        table = self._table(key)
        if isinstance(table, np.ndarray):
            return np.take(table, ids, axis=0)
        ops = _pinned_ops(jax.devices()[0])
        return ops.read(table, jax.device_put(ids.astype(np.int32), ops.host))

    def prefetch(
        self,
        token_ids: np.ndarray,
        positions: np.ndarray | None = None,
        sharding: jax.sharding.Sharding | None = None,
    ) -> Prefetched:
        """`lookup` then `gather`: one batch's rows on the device (and their ids, for `apply_gradients`)."""
        ids = self.lookup(token_ids, positions)
        return Prefetched(ids, self.gather(ids, sharding))

    # ------------------------------------------------------------- training
    def apply_gradients(
        self,
        ids: dict[str, np.ndarray],
        row_grads: dict[str, Any],
        learning_rate: float | None = None,
    ) -> bool:
        """The row optimizer's step from the gradients w.r.t. gathered rows {str(layer): [B, T, Z, W]} whose ids
        are `ids` (`Prefetched.ids`); only the rows looked up change. A non-finite gradient skips the whole
        update (as the device step does) and returns False. `learning_rate` overrides the optimizer's."""
        if set(row_grads) != set(ids):
            raise ValueError(f"row gradients for layers {sorted(row_grads)} but row ids for {sorted(ids)}")
        summed = {key: scatter_row_grads(ids[key], np.asarray(g)) for key, g in row_grads.items()}
        if not all(np.all(np.isfinite(g)) for _, g in summed.values()):
            return False
        opt = self.optimizer
        lr = opt.learning_rate if learning_rate is None else learning_rate
        for key, (unique, grad) in summed.items():
            table = self._table(key)
            if opt.kind == "sgd":
                step = grad
            else:
                acc = self.accumulators[int(key)]
                acc[unique] += np.mean(np.square(grad), axis=-1)
                step = grad / (np.sqrt(acc[unique])[:, None] + opt.eps)
            rows = (np.asarray(self._read(key, unique), np.float32) - lr * step).astype(table.dtype)
            if isinstance(table, np.ndarray):
                table[unique] = rows
            else:  # pinned_host: a scatter into the donated table
                self.tables[int(key)] = _pinned_ops(jax.devices()[0]).write(table, unique.astype(np.int32), rows)
        self.steps += 1
        return True

    def _table(self, key: str) -> np.ndarray | jax.Array:
        try:
            return self.tables[int(key)]
        except (KeyError, ValueError):
            raise ValueError(f"no host Engram table for layer {key!r} (host tables: {sorted(self.tables)})") from None
