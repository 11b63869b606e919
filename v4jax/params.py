"""Parameter counting from abstract shapes (`jax.eval_shape`: nothing is allocated).

Convention: `total` counts the trained weights of the main model (embedding, head, norms, every projection)
without the MTP modules, as the DeepSeek reports' 671B / 284B / 1.6T do. State that is not trained by
gradients is not counted: the routers' correction biases (`gate/bias`, moved by the balancing rule;
buffers in transformers) and the V4 hash tables (`tid2eid`, integer constants). This reproduces HF's
module-tree counts exactly (V4-Flash 284,332,230,231). `active` counts the weights one token touches:
`total` minus the routed experts it is not sent to (E - K per MoE layer); it includes the whole input
embedding and output head (DeepSeek's headline 37B / 13B / 49B leave out the input embedding). Engram
tables count whole in `total` and in `active` only by the Z rows of engram_head_dim a token reads per Engram
layer (`engram_table_params` is their whole size). `include_mtp=True` adds the MTP modules to both.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
from flax import traverse_util

from v4jax.config import ModelConfig
from v4jax.layers.engram import hash_plan
from v4jax.model import abstract_params

NOT_TRAINED = ("gate", "bias")  # path suffix of the routers' correction biases


def _size(tree: Any) -> int:
    """Number of trained weights in `tree` (float leaves other than the correction biases)."""
    flat = traverse_util.flatten_dict(tree) if isinstance(tree, dict) else {(): tree}
    return sum(
        math.prod(leaf.shape)
        for path, leaf in flat.items()
        if jnp.issubdtype(leaf.dtype, jnp.floating) and path[-2:] != NOT_TRAINED
    )


def _routed_experts(tree: dict[str, Any]) -> int:
    """Parameters under every `ffn/experts` subtree of `tree`."""
    count = 0
    for key, value in tree.items():
        if isinstance(value, dict):
            count += _size(value["experts"]) if key == "ffn" and "experts" in value else _routed_experts(value)
    return count


def engram_table_params(cfg: ModelConfig) -> int:
    """Weights of the Engram tables (rows padded as the parameter is, times engram_head_dim); 0 without Engram."""
    if not cfg.engram_layer_ids:
        return 0
    return sum(layer.table_rows for layer in hash_plan(cfg).layers.values()) * cfg.engram_head_dim


def param_counts(cfg: ModelConfig, *, include_mtp: bool = False) -> tuple[int, int]:
    """(total, active) parameter counts of `cfg` (see the module docstring for the convention)."""
    params = abstract_params(cfg)
    main = {k: v for k, v in params.items() if not k.startswith("mtp_")}
    mtp = {k: v for k, v in params.items() if k.startswith("mtp_")}
    total, experts = _size(main), _routed_experts(main)
    if include_mtp:
        total += _size(mtp)
        experts += _routed_experts(mtp)
    unselected = (cfg.n_routed_experts - cfg.num_experts_per_tok) / cfg.n_routed_experts
    unread = engram_table_params(cfg) - len(cfg.engram_layer_ids) * cfg.engram_dim  # table rows not looked up
    return total, total - round(experts * unselected) - unread


def param_table(cfg: ModelConfig) -> list[tuple[str, int]]:
    """Parameter count per top-level group (embed, dense_layers, moe_layers, head, mtp_k, ...)."""
    return [(name, _size(tree)) for name, tree in abstract_params(cfg).items()]
