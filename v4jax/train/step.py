"""The jitted, sharded training step and the state it carries.

    state = {'params':    the public parameter tree (trainable leaves and the hash tables, `model.init_params`),
             'opt_state': the optimizer's state over the trainable collection,
             'step':      int32 [] steps taken (skipped ones included: it indexes the data),
             'skipped':   int32 [] steps whose loss or gradient was not finite}
    batch = int32 [B, T + 1] token windows: inputs batch[:, :-1], next-token labels batch[:, 1:]

One step: forward + backward of `losses.loss_terms`, the optimizer update, then the router biases'
aux-loss-free update (`balancing`) from this batch's expert loads. A non-finite loss or gradient norm
skips all of it: params and optimizer state come back unchanged and `skipped` counts it.

`Trainer` compiles the step once for a mesh and rule preset with explicit in/out shardings (the state
keeps the parameters' shardings, the batch is split over the batch axes), donates the old state and
enters the logical rules inside the traced function.

Engram tables in host memory (`engram_tables='host'`, `v4jax.engram_memory`): the state's params lack the
tables, `step_with_rows` takes the batch's rows gathered ahead ({str(layer): [B, T, Z, W]}, split like the
batch) and also returns the loss gradient w.r.t. them, for the host's row update; a non-finite row gradient
skips the step too. The device optimizer's clipping and `grad_norm` cover the device params only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec

from v4jax import sharding as shd
from v4jax.config import ModelConfig, validate_parallelism
from v4jax.engram_memory import has_tables, table_paths, without_tables
from v4jax.layers.engram import ROW_AXES
from v4jax.layers.moe import CONSTANTS
from v4jax.model import (
    Transformer,
    abstract_params,
    init_params,
    merge_collections,
    param_logical_specs,
    split_collections,
)
from v4jax.train.balancing import max_violation, update_router_biases
from v4jax.train.config import TrainConfig
from v4jax.train.losses import loss_terms
from v4jax.train.optimizer import learning_rate_schedule, make_optimizer, param_groups


@dataclasses.dataclass(frozen=True)
class Trainer:
    """Training of one model config on one mesh: `init`, `step`, and the state's shardings.

    engram_tables: 'device' (the tables are params) or 'host' (kept outside the params by
    `engram_memory.HostTables`; train with `step_with_rows`).
    """

    cfg: ModelConfig
    tcfg: TrainConfig
    mesh: jax.sharding.Mesh
    rules: str = "fsdp"
    engram_tables: str = "device"

    def __post_init__(self):
        validate_parallelism(self.cfg, shd.axis_sizes(self.mesh), shd.RULES[self.rules])
        if self.engram_tables not in ("device", "host"):
            raise ValueError(f"Trainer.engram_tables={self.engram_tables!r}; choose 'device' or 'host'")
        if self.host_tables and not self.cfg.engram_layer_ids:
            raise ValueError("Trainer(engram_tables='host') needs Engram layers (empty ModelConfig.engram_layer_ids)")
        optimizer = make_optimizer(self.cfg, self.tcfg)
        if self.host_tables:
            # the tables' paths in the params are their paths in the trainable collection too
            optimizer = _with_placeholders(optimizer, list(table_paths(self.cfg).values()))
        param_sh = shd.param_shardings(self._device_tree(param_logical_specs(self.cfg)), self.mesh, self.rules)
        trainable_sh = split_collections(param_sh)["params"]
        abstract_opt = jax.eval_shape(optimizer.init, split_collections(self._abstract_params())["params"])
        replicated = NamedSharding(self.mesh, PartitionSpec())
        opt_sh = _follow_params(abstract_opt, trainable_sh, replicated)
        state_sh = {"params": param_sh, "opt_state": opt_sh, "step": replicated, "skipped": replicated}
        batch_spec = shd.logical_to_spec((shd.ACT_BATCH, None), shd.rules(self.rules))
        object.__setattr__(self, "optimizer", optimizer)
        object.__setattr__(self, "state_shardings", state_sh)
        object.__setattr__(self, "batch_sharding", NamedSharding(self.mesh, batch_spec))
        rows_spec = shd.logical_to_spec(ROW_AXES, shd.rules(self.rules))
        object.__setattr__(self, "engram_rows_sharding", NamedSharding(self.mesh, rows_spec))  # gathered rows
        object.__setattr__(self, "_step", self._compile_step())
        object.__setattr__(self, "_evaluate", self._compile_evaluate())

    @property
    def host_tables(self) -> bool:
        """Whether the Engram tables are kept outside the params (`engram_tables='host'`)."""
        return self.engram_tables == "host"

    def _device_tree(self, tree: dict[str, Any]) -> dict[str, Any]:
        """A params-shaped tree as the state holds it (without the Engram tables when they are on the host)."""
        return without_tables(self.cfg, tree) if self.host_tables else tree

    def _abstract_params(self) -> dict[str, Any]:
        return self._device_tree(abstract_params(self.cfg))

    # ------------------------------------------------------------------ state
    def init(self, key: jax.Array | None = None, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """A fresh state from `params` (copied: the step donates its state; or newly initialised from `key`),
        placed on the mesh."""
        if params is None:
            if key is None:
                raise ValueError("Trainer.init needs a PRNG key or params")
            if self.host_tables:
                raise ValueError("Trainer(engram_tables='host').init needs params without the Engram tables: "
                                 "tables, params = HostTables.from_params(cfg, init_params(cfg, key))")  # fmt: skip
            params = init_params(self.cfg, key)
        if self.host_tables and has_tables(self.cfg, params):
            raise ValueError(f"Trainer(engram_tables='host').init: the params hold the Engram tables of layers "
                             f"{has_tables(self.cfg, params)}; move them out with HostTables.from_params")  # fmt: skip
        # device_put may alias the caller's buffers (also with may_alias=False when it replicates a one-device
        # array), which the first step would then delete by donation: one jitted program copies them into fresh
        # buffers and initialises the optimizer (one compilation, not one per leaf shape as eager copies)
        sh = self.state_shardings
        params = jax.device_put(params, sh["params"])

        def fresh(params):
            params = jax.tree.map(jnp.copy, params)
            return params, self.optimizer.init(split_collections(params)["params"])

        with jax.set_mesh(self.mesh):
            params, opt_state = jax.jit(fresh, out_shardings=(sh["params"], sh["opt_state"]))(params)
        step, skipped = (jax.device_put(jnp.zeros((), jnp.int32), sh["step"]) for _ in range(2))
        return {"params": params, "opt_state": opt_state, "step": step, "skipped": skipped}

    def abstract_state(self) -> dict[str, Any]:
        """ShapeDtypeStructs of the state with their shardings (the restore target of a checkpoint)."""
        params = self._abstract_params()
        opt_state = jax.eval_shape(self.optimizer.init, split_collections(params)["params"])
        abstract = {
            "params": params,
            "opt_state": opt_state,
            "step": jax.ShapeDtypeStruct((), jnp.int32),
            "skipped": jax.ShapeDtypeStruct((), jnp.int32),
        }
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, self.state_shardings
        )

    # ------------------------------------------------------------------ step
    def step(self, state: dict[str, Any], batch: np.ndarray | jax.Array) -> tuple[dict[str, Any], dict[str, Any]]:
        """One training step on token windows int [B, T+1] -> (new state, metrics). `state` is donated."""
        if self.host_tables:
            raise ValueError("Trainer(engram_tables='host'): use step_with_rows(state, batch, engram_rows)")
        batch = self.check_batch(batch)
        with jax.set_mesh(self.mesh):
            return self._step(state, batch)

    def step_with_rows(
        self, state: dict[str, Any], batch: np.ndarray | jax.Array, engram_rows: dict[str, jax.Array]
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, jax.Array]]:
        """One step with host Engram tables: `engram_rows` {str(layer): [B, T, Z, W]} are the rows of the inputs
        batch[:, :-1] (`HostTables.prefetch(..., sharding=self.engram_rows_sharding)`) -> (new state, metrics,
        the loss gradient w.r.t. each layer's rows, for `HostTables.apply_gradients`). `state` is donated."""
        if not self.host_tables:
            raise ValueError("Trainer.step_with_rows needs engram_tables='host' (these tables are params)")
        batch = self.check_batch(batch)
        rows = self._check_rows(engram_rows, batch.shape[0], batch.shape[1] - 1)
        with jax.set_mesh(self.mesh):
            return self._step(state, batch, rows)

    def evaluate(
        self,
        params: dict[str, Any],
        batch: np.ndarray | jax.Array,
        engram_rows: dict[str, jax.Array] | None = None,
    ) -> dict[str, jax.Array]:
        """Held-out losses of `params` on token windows [B, T+1]: 'ce' and 'mtp' (float32 [] each); with host
        Engram tables, the inputs' gathered rows `engram_rows` (as `step_with_rows`)."""
        batch = self.check_batch(batch)
        with jax.set_mesh(self.mesh):
            if not self.host_tables:
                if engram_rows is not None:
                    raise ValueError("Trainer.evaluate: engram_rows are for engram_tables='host'")
                return self._evaluate(params, batch)
            rows = self._check_rows(engram_rows, batch.shape[0], batch.shape[1] - 1)
            return self._evaluate(params, batch, rows)

    def _check_rows(self, engram_rows: dict[str, jax.Array] | None, b: int, t: int) -> dict[str, jax.Array]:
        """Gathered rows of every Engram layer, shape [B, T, Z, W], placed like the batch."""
        c = self.cfg
        want = {str(layer) for layer in c.engram_layer_ids}
        if engram_rows is None or set(engram_rows) != want:
            got = None if engram_rows is None else sorted(engram_rows)
            raise ValueError(f"engram_rows must hold the rows of Engram layers {sorted(want)}, got {got}")
        shape = (b, t, c.engram_num_hash_heads, c.engram_head_dim)
        for key, rows in engram_rows.items():
            if tuple(rows.shape) != shape:
                raise ValueError(f"engram_rows[{key!r}] has shape {tuple(rows.shape)}, expected {shape} (B, T, Z, W)")
        return {k: jax.device_put(v, self.engram_rows_sharding) for k, v in engram_rows.items()}

    def check_batch(self, batch: np.ndarray | jax.Array) -> jax.Array:
        """Validate a batch before it reaches the compiled step (shape, dtype, token range, divisibility)
        and place it on the mesh."""
        if batch.ndim != 2 or batch.shape[1] < 2:
            raise ValueError(f"batch must be token windows [B, T+1] with T ≥ 1, got shape {batch.shape}")
        if not np.issubdtype(batch.dtype, np.integer):
            raise ValueError(f"batch must hold integer token ids, got dtype {batch.dtype}")
        shards = int(np.prod([self.mesh.shape[a] for a in _axes(self.batch_sharding.spec[0])]))
        if batch.shape[0] % shards:
            raise ValueError(
                f"batch size {batch.shape[0]} is not divisible by the {shards} shards of the batch axes "
                f"{self.batch_sharding.spec[0]} of mesh {dict(self.mesh.shape)}"
            )
        if isinstance(batch, np.ndarray):
            lo, hi = int(batch.min()), int(batch.max())
            if lo < 0 or hi >= self.cfg.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"token id {bad} in the batch is outside the vocabulary [0, {self.cfg.vocab_size})")
            return jax.device_put(batch.astype(np.int32), self.batch_sharding)
        return jax.device_put(batch.astype(jnp.int32), self.batch_sharding)

    def _compile_step(self):
        cfg, tcfg, optimizer = self.cfg, self.tcfg, self.optimizer
        pairs = shd.rules(self.rules)
        schedule = learning_rate_schedule(tcfg)
        trained = jax.tree.map(lambda g: g != "frozen", self._device_tree(param_groups(cfg)))
        host = self.host_tables

        def loss_fn(trainable, constants, inputs, labels, rows=None):
            variables = {"params": trainable, CONSTANTS: constants}
            logits, mtp_logits, aux = Transformer(cfg).apply(variables, inputs, engram_rows=rows)
            terms = loss_terms(tcfg, logits, mtp_logits, aux, labels)
            return terms["loss"], (terms, aux)

        def body(state, batch, rows=None):
            chex.assert_rank(batch, 2)
            inputs, labels = batch[:, :-1], batch[:, 1:]
            collections = split_collections(state["params"])
            trainable, constants = collections["params"], collections[CONSTANTS]
            with nn.logical_axis_rules(pairs):
                if host:  # also ∂L/∂rows of the host tables
                    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 4), has_aux=True)
                    (loss, (terms, aux)), (grads, row_grads) = grad_fn(trainable, constants, inputs, labels, rows)
                else:
                    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
                    (loss, (terms, aux)), grads = grad_fn(trainable, constants, inputs, labels)
            grad_norm = optax.global_norm(jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, trained))
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            if host:
                row_grad_norm = optax.global_norm(row_grads)
                finite = finite & jnp.isfinite(row_grad_norm)

            def apply(trainable, opt_state):
                updates, opt_state = optimizer.update(grads, opt_state, trainable)
                new_trainable = optax.apply_updates(trainable, updates)
                return update_router_biases(cfg, new_trainable, aux, tcfg.bias_update_speed), opt_state

            # a branch, not a select over every leaf: a skipped step runs no update and a taken one does not
            # re-read the old params and moments (a `where` over them cost 0.6 s of a `small` CPU step,
            # benchmarks/README.md)
            new_trainable, opt_state = jax.lax.cond(finite, apply, lambda *old: old, trainable, state["opt_state"])
            new_state = {
                "params": merge_collections({"params": new_trainable, CONSTANTS: constants}),
                "opt_state": opt_state,
                "step": state["step"] + 1,
                "skipped": state["skipped"] + (~finite).astype(jnp.int32),
            }
            metrics = {**terms, "grad_norm": grad_norm, "finite": finite, "skipped": new_state["skipped"]}
            metrics["perplexity"] = jnp.exp(terms["ce"])
            metrics["learning_rate"] = schedule(_update_count(state["opt_state"], state["step"]))
            if "expert_load" in aux["layers"]:
                metrics["expert_load"] = aux["layers"]["expert_load"]
                metrics["max_vio"] = max_violation(aux["layers"]["expert_load"])
            if host:
                metrics["engram_row_grad_norm"] = row_grad_norm  # of ∂L/∂rows (before summing per row id)
                return new_state, metrics, row_grads
            return new_state, metrics

        if host:
            return jax.jit(
                body,
                in_shardings=(self.state_shardings, self.batch_sharding, self.engram_rows_sharding),
                out_shardings=(self.state_shardings, None, self.engram_rows_sharding),
                donate_argnums=0,
            )
        return jax.jit(
            body,
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, None),
            donate_argnums=0,
        )

    def _compile_evaluate(self):
        cfg, tcfg, pairs = self.cfg, self.tcfg, shd.rules(self.rules)

        def body(params, batch, rows=None):
            with nn.logical_axis_rules(pairs):
                logits, mtp_logits, aux = Transformer(cfg).apply(
                    split_collections(params), batch[:, :-1], engram_rows=rows
                )
            terms = loss_terms(tcfg, logits, mtp_logits, aux, batch[:, 1:])
            return {"ce": terms["ce"], "mtp": terms["mtp"]}

        shardings = (self.state_shardings["params"], self.batch_sharding)
        if self.host_tables:
            shardings = (*shardings, self.engram_rows_sharding)
        return jax.jit(body, in_shardings=shardings)


def _with_placeholders(inner: optax.GradientTransformation, paths: list[tuple[str, ...]]):
    """`inner` (built for the whole trainable tree) over a tree that lacks the leaves at `paths` (Engram tables
    kept on the host): a zero-size placeholder stands in for each, so the per-leaf labels of `inner` still
    match; the optimizer state holds empty arrays there."""

    def fill(tree):
        if tree is None:
            return None
        flat = traverse_util.flatten_dict(tree)
        for path in paths:
            flat[path] = jnp.zeros((0,), jnp.float32)
        return traverse_util.unflatten_dict(flat)

    def drop(tree):
        flat = traverse_util.flatten_dict(tree)
        for path in paths:
            del flat[path]
        return traverse_util.unflatten_dict(flat)

    def init(params):
        return inner.init(fill(params))

    def update(updates, state, params=None):
        updates, state = inner.update(fill(updates), state, fill(params))
        return drop(updates), state

    return optax.GradientTransformation(init, update)


def _update_count(opt_state: Any, step: jax.Array) -> jax.Array:
    """The learning-rate schedule's step: updates applied so far (skipped steps do not count), read from the
    optimizer state's `count`; `step` if it has none."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        if getattr(path[-1], "name", None) == "count":
            return leaf
    return step


def _follow_params(opt_state: Any, param_shardings: dict[str, Any], default: NamedSharding) -> Any:
    """Shardings for an optimizer state: a leaf whose key path ends with a parameter's path (a moment of
    that parameter) takes the parameter's sharding; counts and other leaves take `default`."""
    by_path = {
        tuple(k.key for k in path): sharding
        for path, sharding in jax.tree_util.tree_flatten_with_path(param_shardings)[0]
    }
    depth = max(len(p) for p in by_path)

    def sharding_of(path, leaf):
        keys = tuple(getattr(k, "key", None) for k in path)
        for n in range(min(depth, len(keys)), 0, -1):
            sharding = by_path.get(keys[-n:])
            if sharding is not None and len(sharding.spec) <= leaf.ndim:
                return sharding
        return default

    return jax.tree_util.tree_map_with_path(sharding_of, opt_state)


def _axes(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)
