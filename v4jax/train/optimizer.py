"""Optimizers (optax) over the trainable parameter tree, with each leaf in one of three groups.

    'matrix'  weight matrices: `kernel`, routed experts `w1 w2 w3`, mHC projections `fn` (not embed/head)
    'vector'  everything else that trains: embedding, head, norm scales, sinks, mHC biases and gains, `ape`
    'frozen'  the routers' selection biases `gate/bias` (moved by `balancing`, never by gradients) and, in the
              indexer's 'dense_warmup' stage, every parameter outside an `indexer`
'adamw' (V3 recipe): AdamW on matrices and vectors, weight decay on matrices and the embedding/head only.
'muon' (V4 recipe): Muon on matrices (momentum, Newton–Schulz orthogonalisation, update RMS rescaled to
`muon_rms` so one learning rate serves both, decoupled weight decay) and AdamW without decay on vectors.
Muon treats the leading `layers` / `experts` / `o_groups` axes of a stacked weight as a batch of matrices,
and contracts the input axes: all but the last when the output is the model width (`wo`, `w2`), else the first.
Gradients of the trained leaves are clipped by their global norm first; frozen leaves get zero updates.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import PartitionSpec

from v4jax import sharding as shd
from v4jax.config import ModelConfig
from v4jax.model import param_logical_specs, split_collections
from v4jax.train.config import TrainConfig

MATRIX_LEAVES = frozenset({"kernel", "w1", "w2", "w3", "fn"})
VECTOR_MODULES = frozenset({"embed", "head"})  # matrices that AdamW trains in both recipes
DECAYED_MODULES = VECTOR_MODULES
BATCH_AXES = frozenset({shd.LAYERS, shd.EXPERTS, shd.O_GROUPS})


def _names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in path)


def trainable_specs(cfg: ModelConfig) -> dict[str, Any]:
    """Logical PartitionSpecs of the trainable collection (the tree the optimizer sees)."""
    return split_collections(param_logical_specs(cfg))["params"]


def param_group(cfg: ModelConfig, names: tuple[str, ...]) -> str:
    """'matrix' | 'vector' | 'frozen' for the trainable leaf at path `names`."""
    if names[-2:] == ("gate", "bias"):
        return "frozen"
    if cfg.indexer_training == "dense_warmup" and "indexer" not in names:
        return "frozen"
    if names[-1] in MATRIX_LEAVES and names[0] not in VECTOR_MODULES:
        return "matrix"
    return "vector"


def param_groups(cfg: ModelConfig) -> dict[str, Any]:
    """The group of every trainable leaf (a tree of strings shaped like the trainable collection)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: param_group(cfg, _names(path)),
        trainable_specs(cfg),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def muon_dimensions(spec: PartitionSpec) -> optax.contrib.MuonDimensionNumbers:
    """Muon's (reduction, output) axes of a matrix leaf from its logical axes (leading batch axes skipped)."""
    axes = list(spec)
    first = 0
    while first < len(axes) and axes[first] in BATCH_AXES:
        first += 1
    if len(axes) - first < 2:
        raise ValueError(f"Muon needs at least 2 non-batch axes, got logical axes {tuple(axes)}")
    last = len(axes) - 1
    if axes[last] == shd.EMBED:
        return optax.contrib.MuonDimensionNumbers(tuple(range(first, last)), (last,))
    return optax.contrib.MuonDimensionNumbers((first,), tuple(range(first + 1, len(axes))))


def learning_rate_schedule(tcfg: TrainConfig) -> optax.Schedule:
    """Linear warmup to the peak, then 'cosine' to min_lr_ratio·peak at total_steps, 'wsd' (stable, then a
    linear decay over the last decay_fraction of the steps) or 'constant'."""
    peak, floor = tcfg.learning_rate, tcfg.learning_rate * tcfg.min_lr_ratio
    warmup = optax.linear_schedule(0.0, peak, max(tcfg.warmup_steps, 1))
    rest = tcfg.total_steps - tcfg.warmup_steps
    if tcfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, max(rest, 1), alpha=tcfg.min_lr_ratio)
    elif tcfg.schedule == "wsd":
        decay = max(int(round(tcfg.decay_fraction * tcfg.total_steps)), 1)
        stable = max(rest - decay, 0)
        after = optax.join_schedules(
            [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay)], [stable]
        )
    else:
        after = optax.constant_schedule(peak)
    return optax.join_schedules([warmup, after], [tcfg.warmup_steps])


def make_optimizer(cfg: ModelConfig, tcfg: TrainConfig) -> optax.GradientTransformation:
    """The optimizer over the trainable collection (see the module docstring)."""
    specs = {_names(path): spec for path, spec in _flat_specs(cfg)}
    lr = learning_rate_schedule(tcfg)

    def by_path(fn):  # a callable over (possibly masked) param trees, looking leaves up by path
        return lambda tree: jax.tree_util.tree_map_with_path(lambda path, _: fn(_names(path)), tree)

    def decayed(names):
        return param_group(cfg, names) == "matrix" or names[0] in DECAYED_MODULES

    clip = [optax.clip_by_global_norm(tcfg.clip_norm)] if tcfg.clip_norm else []
    if tcfg.optimizer == "adamw":
        inner = optax.adamw(lr, tcfg.b1, tcfg.b2, tcfg.eps, weight_decay=tcfg.weight_decay, mask=by_path(decayed))
    else:

        def dims(names):
            return muon_dimensions(specs[names]) if param_group(cfg, names) == "matrix" else None

        inner = optax.contrib.muon(
            lr,
            beta=tcfg.muon_momentum,
            eps=tcfg.eps,
            weight_decay=tcfg.weight_decay,
            adam_b1=tcfg.b1,
            adam_b2=tcfg.b2,
            adam_weight_decay=0.0,
            muon_weight_dimension_numbers=by_path(dims),
            consistent_rms=tcfg.muon_rms,
        )
    groups = param_groups(cfg)
    labels = jax.tree.map(lambda g: "frozen" if g == "frozen" else "trained", groups)
    return optax.partition({"trained": optax.chain(*clip, inner), "frozen": optax.set_to_zero()}, labels)


def _flat_specs(cfg: ModelConfig):
    return jax.tree_util.tree_flatten_with_path(
        trainable_specs(cfg), is_leaf=lambda x: isinstance(x, PartitionSpec)
    )[0]
