"""The training objective: next-token cross-entropy, MTP, the sequence-wise balance loss and the indexer KL.

    labels[b, i] = t_(i+1)                                      (inputs are the first T of T+1 tokens)
    CE     = mean_(b,i) −log softmax(logits[b, i])[labels[b, i]]
    MTP_k  = the same CE for module k's logits against t_(i+k+1) = labels[b, i+k], over i < T − k
    MTP    = mean_k MTP_k                                       (the V3 report's λ/D · Σ_k with λ outside)
    bal    = Σ over learned-routed MoE layers (main and MTP blocks) of Σ_i f_i P_i   (`moe.sequence_balance_loss`)
    KL     = Σ over layers with an indexer of mean_(b,t) KL_t   (`dsa.indexer_kl`; indexer training only)
    total  = CE + λ·MTP + α·bal + w·KL

Log-probabilities are computed in float32 from float32 logits.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp

from v4jax.train.config import TrainConfig


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean next-token negative log-likelihood over the positions where `mask` is True (all when None).

    logits float [B, T, V], labels int [B, T], mask bool [B, T] -> float32 [].
    """
    chex.assert_rank(logits, 3)
    chex.assert_shape(labels, logits.shape[:2])
    logits = logits.astype(jnp.float32)
    label_logits = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - label_logits  # [B, T]
    if mask is None:
        return jnp.mean(nll)
    chex.assert_shape(mask, labels.shape)
    return jnp.sum(jnp.where(mask, nll, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def mtp_loss(mtp_logits: list[jax.Array], labels: jax.Array) -> jax.Array:
    """mean_k MTP_k: module k (1-based) predicts labels[:, i + k] at position i, for i < T − k. float32 []."""
    if not mtp_logits:
        return jnp.zeros((), jnp.float32)
    t = labels.shape[1]
    losses = []
    for k, logits in enumerate(mtp_logits, start=1):
        mask = jnp.broadcast_to(jnp.arange(t) < t - k, labels.shape)
        losses.append(cross_entropy(logits, jnp.roll(labels, -k, axis=1), mask))
    return jnp.mean(jnp.stack(losses))


def _summed(aux: dict[str, Any], name: str) -> jax.Array:
    """Σ of aux[name] over the main layers and every MTP block (0 when no layer reports it)."""
    total = jnp.zeros((), jnp.float32)
    for layer_aux in [aux["layers"], *aux["mtp"]]:
        if name in layer_aux:
            total += jnp.sum(layer_aux[name])
    return total


def loss_terms(
    tcfg: TrainConfig, logits: jax.Array, mtp_logits: list[jax.Array], aux: dict[str, Any], labels: jax.Array
) -> dict[str, jax.Array]:
    """Every term of the objective (float32 scalars) and their weighted sum 'loss'.

    `logits`, `mtp_logits` and `aux` are the outputs of `Transformer.__call__` on the inputs whose next
    tokens are `labels` [B, T]. Terms: 'ce', 'mtp', 'balance', 'indexer_kl' (unweighted) and 'loss'.
    """
    terms = {
        "ce": cross_entropy(logits, labels),
        "mtp": mtp_loss(mtp_logits, labels),
        "balance": _summed(aux, "balance_loss"),
        "indexer_kl": _summed(aux, "indexer_kl"),
    }
    terms["loss"] = (
        terms["ce"]
        + tcfg.mtp_weight * terms["mtp"]
        + tcfg.balance_alpha * terms["balance"]
        + tcfg.indexer_kl_weight * terms["indexer_kl"]
    )
    return terms
