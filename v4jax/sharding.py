"""Meshes, the logical-axis vocabulary, and the named rule presets that map one onto the other.

Layers name their parameter and activation axes with the logical names below and never mention mesh
axes. A rule preset maps each logical name to mesh axes. Mesh axes, outer to inner:

    data    pure data parallelism (replicated params)
    fsdp    data parallelism with parameters (and optimiser state) sharded along `embed`
    expert  expert parallelism inside the MoE; joins the batch axes outside it
    tensor  tensor parallelism over heads / MLP hidden / vocab

Notation in the preset docstrings: `W[D_fsdp, F_tensor]` means W's D axis is split over `fsdp`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# ----------------------------------------------------------------- logical vocabulary
# parameters
VOCAB = "vocab"
EMBED = "embed"
EMBED_CONCAT = "embed_concat"  # the 2·D input of the MTP eh_proj (a second name: one array cannot repeat one)
NORM = "norm"  # vectors of RMSNorm scales (always replicated)
MLP = "mlp"
HEADS = "heads"
HEAD_DIM = "head_dim"
Q_LORA = "q_lora"
KV_LORA = "kv_lora"
EXPERTS = "experts"
EXPERT_MLP = "expert_mlp"
LAYERS = "layers"
INDEX_HEADS = "index_heads"  # V4 lightning-indexer heads (own name: index_n_heads need not divide like heads)
O_GROUPS = "o_groups"  # V4 grouped output projection: head groups
O_LORA = "o_lora"  # V4 grouped output projection: per-group rank o_lora_rank
STREAMS = "streams"  # residual streams of hyper-connections (mHC); replicated in every preset
ENGRAM_ROWS = "engram_rows"  # rows of an Engram hash table (hundreds of millions): split over the param axes
# activations
ACT_BATCH = "act_batch"
ACT_LENGTH = "act_length"
ACT_KV_LENGTH = "act_kv_length"
ACT_EMBED = "act_embed"
ACT_HEADS = "act_heads"
ACT_MLP = "act_mlp"
ACT_VOCAB = "act_vocab"
ACT_EXPERTS = "act_experts"
ACT_STREAMS = "act_streams"

LOGICAL_AXES = (
    VOCAB, EMBED, EMBED_CONCAT, NORM, MLP, HEADS, HEAD_DIM, Q_LORA, KV_LORA, EXPERTS, EXPERT_MLP, LAYERS,
    INDEX_HEADS, O_GROUPS, O_LORA, STREAMS, ENGRAM_ROWS,
    ACT_BATCH, ACT_LENGTH, ACT_KV_LENGTH, ACT_EMBED, ACT_HEADS, ACT_MLP, ACT_VOCAB, ACT_EXPERTS, ACT_STREAMS,
)  # fmt: skip

AxisRule = str | tuple[str, ...] | None


def _preset(**overrides: AxisRule) -> dict[str, AxisRule]:
    rules: dict[str, AxisRule] = dict.fromkeys(LOGICAL_AXES)
    rules.update(overrides)
    return rules


RULES: dict[str, dict[str, AxisRule]] = {
    # Attention: x[B_(data,fsdp), T, D], every weight W[D_fsdp, ...] all-gathered before use (ZeRO-3).
    # MoE: tokens stay on their (data, fsdp) shard; all experts on every shard, weights gathered over fsdp.
    # Engram tables T[rows_fsdp, W] (rows padded to a multiple of ENGRAM_ROW_ALIGN, so any power-of-two
    # split up to that size divides them).
    "fsdp": _preset(embed="fsdp", engram_rows="fsdp", act_batch=("data", "fsdp")),
    # Attention: as fsdp, with `expert` as one more batch axis: x[B_(data,fsdp,expert), T, D].
    # MoE: experts E_expert; tokens are exchanged by all-to-all over `expert` (dropless), each shard runs its
    # E/ep local experts; expert weights are gathered over fsdp only.
    # Engram tables T[rows_(fsdp,expert), W].
    "fsdp_ep": _preset(
        embed="fsdp", experts="expert", engram_rows=("fsdp", "expert"), act_batch=("data", "fsdp", "expert")
    ),
    # Attention: heads N_tensor (wq_b[Q, N_tensor, H], wo[N_tensor, A, D] -> ReduceScatter over tensor),
    # weights also D_fsdp. MoE: expert hidden M_tensor (w1[E, D, M_tensor], w2 psum over tensor), tokens on
    # (data, fsdp). Dense MLP F_tensor, vocab V_tensor. Engram tables T[rows_(fsdp,tensor), W].
    "fsdp_tp": _preset(
        embed="fsdp",
        engram_rows=("fsdp", "tensor"),
        heads="tensor",
        mlp="tensor",
        expert_mlp="tensor",
        vocab="tensor",
        act_batch=("data", "fsdp"),
        act_heads="tensor",
        act_mlp="tensor",
    ),
    # Attention: heads N_tensor with x[B_(data,expert), T, D] and unsharded D (no fsdp gathers).
    # MoE: experts E_expert with all-to-all over `expert`, expert hidden M_tensor (psum over tensor).
    # Engram tables T[rows_(expert,tensor), W] (too large to replicate even without fsdp).
    "ep_tp": _preset(
        experts="expert",
        engram_rows=("expert", "tensor"),
        heads="tensor",
        mlp="tensor",
        expert_mlp="tensor",
        vocab="tensor",
        act_batch=("data", "fsdp", "expert"),
        act_heads="tensor",
        act_mlp="tensor",
    ),
}


def rules(preset: str) -> tuple[tuple[str, AxisRule], ...]:
    """The preset as the `(logical, mesh_axes)` pairs that `nn.logical_axis_rules` takes."""
    if preset not in RULES:
        raise ValueError(f"unknown sharding rule preset {preset!r}; choose one of {sorted(RULES)}")
    return tuple(RULES[preset].items())


def make_mesh(
    data: int = 1,
    fsdp: int = -1,
    expert: int = 1,
    tensor: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A 4-axis mesh (data, fsdp, expert, tensor) with Auto axis types; one size may be -1 (the rest)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, expert, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis size may be -1, got {dict(zip(MESH_AXES, sizes, strict=True))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh axes {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} devices, have {len(devices)}"
        )
    grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


@contextlib.contextmanager
def use_mesh(mesh: Mesh, preset: str) -> Iterator[None]:
    """Make `mesh` and the rule preset current (for tracing jitted functions and for `constrain`)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules(preset)):
        yield


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside `use_mesh`. Unknown names raise."""
    return nn.with_logical_constraint(x, tuple(axes), fallback=nn.spmd.RulesFallback.RAISE_ERROR)


def logical_to_spec(
    axes: Sequence[str | None], rule_pairs: Sequence[tuple[str, AxisRule]] | None = None
) -> PartitionSpec:
    """PartitionSpec for logical `axes` under `rule_pairs` (default: the rules currently in effect)."""
    rule_pairs = tuple(rule_pairs if rule_pairs is not None else nn.get_logical_axis_rules())
    known = {name for name, _ in rule_pairs}
    for name in axes:
        if name is not None and name not in known:
            raise ValueError(f"logical axis {name!r} has no sharding rule (known: {sorted(known)})")
    return nn.logical_to_mesh_axes(tuple(axes), rule_pairs)


def param_shardings(logical_specs, mesh: Mesh, preset: str):
    """NamedShardings for a pytree of logical PartitionSpecs (from `v4jax.model.param_logical_specs`)."""
    pairs = rules(preset)
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, logical_to_spec(tuple(spec), pairs)),
        logical_specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def axis_sizes(mesh: Mesh) -> Mapping[str, int]:
    return dict(mesh.shape)
