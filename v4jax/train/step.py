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
from jax.sharding import NamedSharding, PartitionSpec

from v4jax import sharding as shd
from v4jax.config import ModelConfig, validate_parallelism
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
    """Training of one model config on one mesh: `init`, `step`, and the state's shardings."""

    cfg: ModelConfig
    tcfg: TrainConfig
    mesh: jax.sharding.Mesh
    rules: str = "fsdp"

    def __post_init__(self):
        validate_parallelism(self.cfg, shd.axis_sizes(self.mesh), shd.RULES[self.rules])
        optimizer = make_optimizer(self.cfg, self.tcfg)
        param_sh = shd.param_shardings(param_logical_specs(self.cfg), self.mesh, self.rules)
        trainable_sh = split_collections(param_sh)["params"]
        abstract_opt = jax.eval_shape(optimizer.init, split_collections(abstract_params(self.cfg))["params"])
        replicated = NamedSharding(self.mesh, PartitionSpec())
        opt_sh = _follow_params(abstract_opt, trainable_sh, replicated)
        state_sh = {"params": param_sh, "opt_state": opt_sh, "step": replicated, "skipped": replicated}
        batch_spec = shd.logical_to_spec((shd.ACT_BATCH, None), shd.rules(self.rules))
        object.__setattr__(self, "optimizer", optimizer)
        object.__setattr__(self, "state_shardings", state_sh)
        object.__setattr__(self, "batch_sharding", NamedSharding(self.mesh, batch_spec))
        object.__setattr__(self, "_step", self._compile_step())
        object.__setattr__(self, "_evaluate", self._compile_evaluate())

    # ------------------------------------------------------------------ state
    def init(self, key: jax.Array | None = None, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """A fresh state from `params` (copied: the step donates its state; or newly initialised from `key`),
        placed on the mesh."""
        if params is None:
            if key is None:
                raise ValueError("Trainer.init needs a PRNG key or params")
            params = init_params(self.cfg, key)
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
        params = abstract_params(self.cfg)
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
        batch = self.check_batch(batch)
        with jax.set_mesh(self.mesh):
            return self._step(state, batch)

    def evaluate(self, params: dict[str, Any], batch: np.ndarray | jax.Array) -> dict[str, jax.Array]:
        """Held-out losses of `params` on token windows [B, T+1]: 'ce' and 'mtp' (float32 [] each)."""
        batch = self.check_batch(batch)
        with jax.set_mesh(self.mesh):
            return self._evaluate(params, batch)

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
        trained = jax.tree.map(lambda g: g != "frozen", param_groups(cfg))

        def loss_fn(trainable, constants, inputs, labels):
            variables = {"params": trainable, CONSTANTS: constants}
            logits, mtp_logits, aux = Transformer(cfg).apply(variables, inputs)
            terms = loss_terms(tcfg, logits, mtp_logits, aux, labels)
            return terms["loss"], (terms, aux)

        def body(state, batch):
            chex.assert_rank(batch, 2)
            inputs, labels = batch[:, :-1], batch[:, 1:]
            collections = split_collections(state["params"])
            trainable, constants = collections["params"], collections[CONSTANTS]
            with nn.logical_axis_rules(pairs):
                grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
                (loss, (terms, aux)), grads = grad_fn(trainable, constants, inputs, labels)
            grad_norm = optax.global_norm(jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, trained))
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

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
            return new_state, metrics

        return jax.jit(
            body,
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, None),
            donate_argnums=0,
        )

    def _compile_evaluate(self):
        cfg, tcfg, pairs = self.cfg, self.tcfg, shd.rules(self.rules)

        def body(params, batch):
            with nn.logical_axis_rules(pairs):
                logits, mtp_logits, aux = Transformer(cfg).apply(split_collections(params), batch[:, :-1])
            terms = loss_terms(tcfg, logits, mtp_logits, aux, batch[:, 1:])
            return {"ce": terms["ce"], "mtp": terms["mtp"]}

        return jax.jit(body, in_shardings=(self.state_shardings["params"], self.batch_sharding))


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
