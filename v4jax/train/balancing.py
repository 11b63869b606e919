"""Auxiliary-loss-free load balancing (DeepSeek-V3 §2.1.2) and the load metric MaxVio.

After every step, outside the gradient path, each learned router's selection bias moves toward balance:
    b_e ← b_e + γ · sign(mean_e' load_e' − load_e)          load: (token, slot) assignments in the batch
so under-loaded experts become more likely to be picked. Hash-routed layers have no bias and are skipped.
    MaxVio = max_e load_e / mean_e load_e − 1               per MoE layer (0 = perfectly balanced)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from v4jax.config import ModelConfig
from v4jax.model import layer_kinds, layer_location


def max_violation(expert_load: jax.Array) -> jax.Array:
    """MaxVio of loads [..., E] -> [...]: max load / mean load − 1."""
    mean = jnp.mean(expert_load, axis=-1)
    return jnp.max(expert_load, axis=-1) / jnp.maximum(mean, 1e-9) - 1.0


def bias_step(expert_load: jax.Array, speed: float) -> jax.Array:
    """The bias change γ·sign(mean load − load) for loads [..., E]."""
    return speed * jnp.sign(jnp.mean(expert_load, axis=-1, keepdims=True) - expert_load)


def _gate(tree: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    for name in path:
        tree = tree[name]
    return tree


def update_router_biases(
    cfg: ModelConfig, params: dict[str, Any], aux: dict[str, Any], speed: float
) -> dict[str, Any]:
    """`params` (the trainable collection) with every learned router's `gate/bias` moved by `bias_step`.

    aux: `Transformer.__call__`'s aux ('layers' expert_load [L_moe, E] in MoE-layer order, 'mtp' blocks).
    Returns a new tree; arrays not touched are shared.
    """
    if speed == 0:
        return params
    params = jax.tree.map(lambda x: x, params)  # new containers, same leaves
    moe_layers = [(i, kind.ffn) for i, kind in enumerate(layer_kinds(cfg)) if kind.ffn != "dense"]
    loads = aux["layers"].get("expert_load")
    for row, (layer, ffn) in enumerate(moe_layers):
        if ffn == "hash_moe":  # no learned bias
            continue
        group, repeat, sub = layer_location(cfg, layer)
        gate = _gate(params, (group,) + ((sub,) if sub else ()) + ("ffn", "gate"))
        gate["bias"] = gate["bias"].at[repeat].add(bias_step(loads[row], speed))
    for k, block_aux in enumerate(aux["mtp"]):
        if "expert_load" in block_aux:
            gate = _gate(params, (f"mtp_{k}", "block", "ffn", "gate"))
            gate["bias"] = gate["bias"] + bias_step(block_aux["expert_load"], speed)
    return params
