"""The DeepSeek transformer (V3, V3.2, V4): decoder layers, layer groups under `nn.scan`, MTP, entry points.

    X       = Streams(Embed(tokens))                  [B, T, R, D]  R residual streams (R = 1 without mHC)
    X       = layer groups (each an nn.scan over a period of 1 or 2 layer kinds; see `layer_groups`)
  one decoder layer, with a residual site (`v4jax.layers.mhc`) around each sub-layer:
    x_in    = site.pre(X);   X = site.post(Attn(RMSNorm(x_in)), X)     Attn: MLA (V3/V3.2) or V4 attention
    x_in    = site.pre(X);   X = site.post(FFN(RMSNorm(x_in)), X)      FFN: SwiGLU, MoE or hash-routed MoE
    logits  = Head(RMSNorm(HyperHead(X)))              'BTD,DV->BTV'
  MTP module k (k = 1..num_nextn_predict_layers) on the hidden h^(k-1) before the final norm, predicting
  t_(i+k+1) at position i (the last k positions have no target):
    V3: h^k = Block_k([RMSNorm(Embed(t_(i+k))) ; RMSNorm(h^(k-1)_i)] · W_eh)          '...,ED->BTD'
    V4: X^k = Block_k(RMSNorm(Embed(t_(i+k)))·W_e (every stream) + RMSNorm(X^(k-1))·W_h)

With residual_mode 'none' the sites are the plain pre-norm residual and add no parameters, so the V3
parameter tree is the reference's. The decoder consumes an embedding sequence plus positions
(`Transformer.decode`), so other embeddings (images, audio) can be spliced in before it. Public entry
points: `init_params`, `forward`, `make_forward`, `param_logical_specs`, `abstract_params`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from v4jax import sharding as shd
from v4jax.config import ModelConfig
from v4jax.layers import attention_mla, attention_v4
from v4jax.layers.attention_mla import MLA, empty_mla_cache, with_head_major_wkv_b
from v4jax.layers.attention_v4 import AttentionV4, empty_v4_cache
from v4jax.layers.engram import Engram, empty_engram_state
from v4jax.layers.linear import FUSED_INPUTS, Embed, Projection, RMSNorm, fuse_projections
from v4jax.layers.mhc import INTERMEDIATES, HyperConnection, HyperHead, composite_gain, expand_streams
from v4jax.layers.mlp import MLP
from v4jax.layers.moe import CONSTANTS, MoE
from v4jax.layers.rope import default_positions

CONSTANT_LEAVES = frozenset({"tid2eid", "canonical"})  # leaves of the CONSTANTS collection (never trained)
REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """What one decoder layer is: its attention ('mla' or a V4 layer type), its FFN, and whether it carries
    an Engram module (`engram`: the layer's index, which seeds its hashes; a layer of its own kind)."""

    attention: str
    ffn: str  # 'dense' | 'moe' | 'hash_moe'
    engram: int | None = None


@dataclasses.dataclass(frozen=True)
class LayerGroup:
    """Layers [start, start + len(period)·repeats): `period` repeated, scanned over `repeats`."""

    name: str
    start: int
    period: tuple[LayerKind, ...]
    repeats: int


def layer_kinds(cfg: ModelConfig) -> list[LayerKind]:
    """The kind of every decoder layer, in order."""
    kinds = []
    for i in range(cfg.num_hidden_layers):
        engram = i if i in cfg.engram_layer_ids else None
        if cfg.is_v4:
            kinds.append(LayerKind(cfg.layer_types[i], "hash_moe" if i < cfg.num_hash_layers else "moe", engram))
        else:
            kinds.append(LayerKind("mla", "dense" if i < cfg.num_dense_layers else "moe", engram))
    return kinds


def layer_groups(cfg: ModelConfig) -> list[LayerGroup]:
    """Split the layers into scannable groups: greedily the longest run of a repeated period of 1 or 2 kinds.

    V3: dense_layers + moe_layers. V4-Flash: layers_0 (2 sliding hash), layers_2 (CSA hash),
    layers_3 (20 × (HCA, CSA)).
    """
    kinds, groups, i = layer_kinds(cfg), [], 0
    while i < len(kinds):
        best = (1, 1)
        for period in (1, 2):
            pattern, repeats = kinds[i : i + period], 0
            while len(pattern) == period and kinds[i + repeats * period : i + (repeats + 1) * period] == pattern:
                repeats += 1
            if repeats > 1 and period * repeats > best[0] * best[1]:
                best = (period, repeats)
        period, repeats = best
        if cfg.is_v4:
            name = f"layers_{i}"
        else:
            name = "dense_layers" if kinds[i].ffn == "dense" else "moe_layers"
        groups.append(LayerGroup(name, i, tuple(kinds[i : i + period]), repeats))
        i += period * repeats
    return groups


def layer_location(cfg: ModelConfig, index: int) -> tuple[str, int, str | None]:
    """(group name, repeat index, sub-layer name or None) of decoder layer `index` in the parameter tree."""
    for group in layer_groups(cfg):
        span = len(group.period) * group.repeats
        if group.start <= index < group.start + span:
            offset = index - group.start
            position = offset % len(group.period)
            return group.name, offset // len(group.period), (f"layer_{position}" if len(group.period) > 1 else None)
    raise ValueError(f"layer index {index} is outside [0, num_hidden_layers={cfg.num_hidden_layers})")


def unstacked_name(index: int) -> str:
    """The parameter subtree of decoder layer `index` in the inference layout (`unstack_layers`)."""
    return f"decoder_layer_{index}"


def is_unstacked(params: dict[str, Any]) -> bool:
    """Whether `params` are in the inference layout of `unstack_layers`."""
    return unstacked_name(0) in params


@functools.partial(jax.jit, static_argnums=0)
def unstack_layers(cfg: ModelConfig, params: dict[str, Any]) -> dict[str, Any]:
    """The inference layout of `params` (used by `Transformer.extend` and `draft`): every layer group's stacked
    subtree replaced by one subtree per decoder layer, `unstacked_name(i)`, each leaf its own array, and each
    decoder layer's (also each MTP block's) attention as `inference_layer` gives it; the rest as is.

    A copy of the layer weights (jitted, so each layer's arrays are separate buffers): convert once and keep
    this copy for inference. Training and `forward` use the stacked layout.
    """
    out = {k: v for k, v in params.items() if k not in {g.name for g in layer_groups(cfg)}}
    for index, kind in enumerate(layer_kinds(cfg)):
        group, repeat, sub = layer_location(cfg, index)
        tree = params[group] if sub is None else params[group][sub]
        out[unstacked_name(index)] = inference_layer(cfg, kind, jax.tree.map(lambda x, r=repeat: x[r], tree))
    for k in range(cfg.num_nextn_predict_layers):
        if f"mtp_{k}" in out:
            mtp = out[f"mtp_{k}"]
            out[f"mtp_{k}"] = {**mtp, "block": inference_layer(cfg, mtp_layer_kind(cfg), mtp["block"])}
    return out


def inference_layer(cfg: ModelConfig, kind: LayerKind, layer: dict[str, Any]) -> dict[str, Any]:
    """One decoder layer's params in the inference layout: the projections of the attention input fused into
    one kernel (`linear.fuse_projections` of the attention's `fused_inputs`), and MLA's Wkv_b also head-major
    (`attention_mla.with_head_major_wkv_b`)."""
    attn = layer["attn"]
    if kind.attention == "mla":
        attn = with_head_major_wkv_b(attn, cfg)
        attn = fuse_projections(attn, FUSED_INPUTS, attention_mla.fused_inputs(cfg))
    else:
        attn = fuse_projections(attn, FUSED_INPUTS, attention_v4.fused_inputs(kind.attention))
    return {**layer, "attn": attn}


def empty_layer_cache(cfg: ModelConfig, kind: LayerKind, batch: int, max_length: int) -> dict[str, Any]:
    """One decoder layer's inference cache before any token: the attention's state (FFNs keep none) and,
    for an Engram layer, its n-gram context and conv inputs under 'engram' (`EngramState`)."""
    if kind.attention == "mla":
        cache = empty_mla_cache(cfg, batch, max_length)
    else:
        cache = empty_v4_cache(cfg, kind.attention, batch, max_length)
    if kind.engram is not None:
        cache = {**cache, "engram": empty_engram_state(cfg, batch)}
    return cache


def empty_cache(cfg: ModelConfig, batch: int, max_length: int) -> dict[str, Any]:
    """The decoder's inference cache before any token: {`unstacked_name(i)`: decoder layer i's cache}, one
    buffer per leaf and layer as in the inference parameter layout (a stacked cache made XLA copy the whole
    stack for each layer's update). Sequences of up to `max_length` tokens. See `Transformer.extend`.
    """
    return {
        unstacked_name(i): empty_layer_cache(cfg, kind, batch, max_length) for i, kind in enumerate(layer_kinds(cfg))
    }


class DecoderLayer(nn.Module):
    """One block: [Engram,] residual site + attention, residual site + FFN. Returns (streams, aux) so it can
    be scanned."""

    cfg: ModelConfig
    kind: LayerKind

    @nn.compact
    def __call__(
        self,
        streams: jax.Array,
        positions: jax.Array,
        token_ids: jax.Array | None,
        engram_rows: dict[str, jax.Array] | None = None,
        cache: dict[str, Any] | None = None,
        count: jax.Array | None = None,
    ) -> tuple[jax.Array, Any]:
        """streams [B,T,R,D], positions [B,T], token_ids [B,T] (hash-routed and Engram layers) -> (streams, aux).

        aux: the MoE's `expert_load` [E] and `balance_loss` [] (MoE layers), and the indexer's mean KL
        `indexer_kl` [] (layers with an indexer, in indexer training).
        With a `cache` (`empty_layer_cache`), the tokens are new tokens appended to it (`count` [B] of them
        real, see `MLA.extend` / `AttentionV4.extend`) and the second output is the updated cache instead.
        engram_rows: {str(layer index): rows [B,T,Z,W]} gathered ahead from Engram tables kept outside the
        params (`v4jax.engram_memory`); an Engram layer without an entry reads its own table.
        """
        c = self.cfg
        chex.assert_rank(streams, 4)
        engram_state = None
        if cache is not None and self.kind.engram is not None:
            cache = dict(cache)
            engram_state = cache.pop("engram")
        if self.kind.engram is not None:  # the memory is written into every stream before the attention
            rows = None if engram_rows is None else engram_rows.get(str(self.kind.engram))
            engram = Engram(c, self.kind.engram, name="engram")
            update, engram_state = engram.forward(streams, token_ids, engram_state, count, positions, rows)
            streams = streams + update.astype(streams.dtype)
        hc_attn, hc_ffn = HyperConnection(c, name="hc_attn"), HyperConnection(c, name="hc_ffn")
        x_in, post, comb = hc_attn.pre(streams)
        attn = MLA(c, name="attn") if self.kind.attention == "mla" else AttentionV4(c, self.kind.attention, name="attn")
        h = RMSNorm(c, c.hidden_size, name="attn_norm")(x_in)
        if cache is None:
            out, indexer_kl = attn.attend(h, positions)
        else:
            (out, cache), indexer_kl = attn.extend(h, positions, count, cache), None
            if self.kind.engram is not None:
                cache = {**cache, "engram": engram_state}
        streams = hc_attn.post(out, streams, post, comb)
        x_in, post, comb = hc_ffn.pre(streams)
        h = RMSNorm(c, c.hidden_size, name="ffn_norm")(x_in)
        if self.kind.ffn == "dense":
            y, aux = MLP(c, c.intermediate_size, name="ffn")(h), {}
        else:
            y, aux = MoE(c, hash_routed=self.kind.ffn == "hash_moe", name="ffn")(h, token_ids)
        if indexer_kl is not None:
            aux = {**aux, "indexer_kl": jnp.mean(indexer_kl)}
        return hc_ffn.post(y, streams, post, comb), (aux if cache is None else cache)


class LayerPeriod(nn.Module):
    """Several consecutive decoder layers of different kinds (`layer_0`, `layer_1`, ...), scanned as one."""

    cfg: ModelConfig
    period: tuple[LayerKind, ...]

    @nn.compact
    def __call__(self, streams, positions, token_ids, engram_rows=None):
        """As `DecoderLayer` without a cache, with a tuple of the layers' aux."""
        outs = []
        for j, kind in enumerate(self.period):
            streams, out = DecoderLayer(self.cfg, kind, name=f"layer_{j}")(streams, positions, token_ids, engram_rows)
            outs.append(out)
        return streams, tuple(outs)


def scanned_group(cfg: ModelConfig, group: LayerGroup) -> nn.Module:
    """The group's layers under nn.scan (params stacked on a leading `layers` axis of size `repeats`)."""
    if len(group.period) == 1:
        block, args = DecoderLayer, (cfg, group.period[0])
    else:
        block, args = LayerPeriod, (cfg, group.period)
    if cfg.remat_policy != "none":
        block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
    scanned = nn.scan(
        block,
        variable_axes={"params": 0, CONSTANTS: 0, INTERMEDIATES: 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),  # positions, token_ids, engram_rows
        length=group.repeats,
        metadata_params={nn.PARTITION_NAME: shd.LAYERS},
    )
    return scanned(*args, name=group.name)


def _per_layer_aux(groups: list[LayerGroup], outputs: list[Any]) -> dict[str, jax.Array]:
    """Stack each aux value over the layers that report it, in layer order: {'expert_load': [L_moe, E],
    'balance_loss': [L_moe]} from MoE layers, {'indexer_kl': [L_indexer]} from layers with an indexer."""
    rows: dict[str, list[tuple[int, jax.Array]]] = {}
    for group, out in zip(groups, outputs, strict=True):
        per_position = (out,) if len(group.period) == 1 else out
        for j, aux in enumerate(per_position):
            for name, value in aux.items():
                for r in range(group.repeats):
                    rows.setdefault(name, []).append((group.start + r * len(group.period) + j, value[r]))
    return {name: jnp.stack([v for _, v in sorted(values, key=lambda row: row[0])]) for name, values in rows.items()}


def mtp_layer_kind(cfg: ModelConfig) -> LayerKind:
    """The kind of an MTP module's block (V4: sliding attention + MoE; V3: MLA + the main model's FFN)."""
    if cfg.is_v4:
        return LayerKind("sliding_attention", "moe")
    return LayerKind("mla", "moe" if cfg.num_hidden_layers >= cfg.first_k_dense_replace else "dense")


class MTPModule(nn.Module):
    """One multi-token-prediction module (V3: concat projection; V4: two projections on the streams)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        hidden: jax.Array,
        next_embeds: jax.Array,
        positions: jax.Array,
        token_ids: jax.Array,
        cache: dict[str, Any] | None = None,
        count: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, Any]:
        """hidden: streams [B,T,R,D] before the head; next_embeds [B,T,D] ->
        (the module's streams [B,T,R,D], its normed output [B,T,D], aux).

        With a `cache` (`empty_layer_cache` of `mtp_layer_kind`) the block appends to it, as `DecoderLayer`,
        and the third output is the updated cache."""
        c = self.cfg
        d = c.hidden_size
        chex.assert_equal_shape([hidden[:, :, 0], next_embeds])
        e = RMSNorm(c, d, name="enorm")(next_embeds)
        h = RMSNorm(c, d, name="hnorm")(hidden)  # per stream
        if c.is_v4:
            e = Projection(c, (d, d), (shd.EMBED_CONCAT, shd.EMBED), name="e_proj")("BTE,ED->BTD", e)
            x = Projection(c, (d, d), (shd.EMBED_CONCAT, shd.EMBED), name="h_proj")("BTRE,ED->BTRD", h)
            x = x + e[:, :, None, :]
        else:
            eh = jnp.concatenate([e, HyperHead(c, name="h_head")(h)], axis=-1)  # [B, T, 2D]
            x = Projection(c, (2 * d, d), (shd.EMBED_CONCAT, shd.EMBED), name="eh_proj")("BTE,ED->BTD", eh)
            x = expand_streams(x, c)
        x, aux = DecoderLayer(c, mtp_layer_kind(c), name="block")(x, positions, token_ids, cache=cache, count=count)
        return x, RMSNorm(c, d, name="norm")(HyperHead(c, name="hc_head")(x)), aux


class Transformer(nn.Module):
    """A DeepSeek language model. `__call__` returns (logits, mtp_logits, aux); see the module docstring."""

    cfg: ModelConfig

    def setup(self):
        c = self.cfg
        self.groups = layer_groups(c)
        self.embed = Embed(c)
        self.layers = [scanned_group(c, group) for group in self.groups]
        self.hc_head = HyperHead(c)
        self.norm = RMSNorm(c, c.hidden_size)
        self.head = Projection(c, (c.hidden_size, c.vocab_size), (shd.EMBED, shd.VOCAB))
        self.mtp = [MTPModule(c, name=f"mtp_{k}") for k in range(c.num_nextn_predict_layers)]
        # the inference layout's layers (`unstack_layers`), used by `extend` only
        self.unstacked = [DecoderLayer(c, kind, name=unstacked_name(i)) for i, kind in enumerate(layer_kinds(c))]

    def decode(
        self,
        embeds: jax.Array,
        positions: jax.Array,
        token_ids: jax.Array | None = None,
        engram_rows: dict[str, jax.Array] | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Run the decoder on embeddings [B,T,D] at positions [B,T] -> (streams [B,T,R,D] before the head, aux).

        token_ids [B,T] are needed by hash-routed MoE and Engram layers; `engram_rows` are Engram rows gathered
        ahead (see `DecoderLayer`). aux: the layers' values stacked in layer order (`expert_load` [L_moe, E],
        `balance_loss` [L_moe]; `indexer_kl` [L_indexer] in indexer training).
        """
        c = self.cfg
        chex.assert_shape(embeds, (None, None, c.hidden_size))
        chex.assert_shape(positions, embeds.shape[:2])
        streams, outputs = expand_streams(embeds, c), []
        for layer in self.layers:
            streams, out = layer(streams, positions, token_ids, engram_rows)
            outputs.append(out)
        return streams, _per_layer_aux(self.groups, outputs)

    def extend(
        self, embeds: jax.Array, positions: jax.Array, token_ids: jax.Array, count: jax.Array, cache: dict[str, Any]
    ) -> tuple[jax.Array, dict[str, Any]]:
        """Run the decoder on new tokens appended to `cache` (`empty_cache`): prefill chunks and decoding.

        Needs the inference parameter layout (`unstack_layers`): the layers run one after another, each
        reading its own arrays (slicing a layer out of a stacked array copies it, which dominates decoding).
        embeds [B,T,D] at positions [B,T] = start[b] + 0..T-1 (start[b]: tokens row b has cached), token_ids
        [B,T], count [B]: how many of the T are real (a ragged batch pads the rest, which are not cached).
        Returns (streams [B,T,R,D], the cache after start[b] + count[b] tokens).
        """
        c = self.cfg
        chex.assert_shape(embeds, (None, None, c.hidden_size))
        chex.assert_shape([positions, token_ids], embeds.shape[:2])
        streams, cache = expand_streams(embeds, c), dict(cache)
        for index, layer in enumerate(self.unstacked):
            name = unstacked_name(index)
            streams, cache[name] = layer(streams, positions, token_ids, cache=cache[name], count=count)
        return streams, cache

    def draft(
        self, streams: jax.Array, next_tokens: jax.Array, positions: jax.Array, count: jax.Array, cache: dict[str, Any]
    ) -> tuple[jax.Array, dict[str, Any]]:
        """MTP module 1 as a drafter: appended to its cache (as `extend`) at positions [B,T], on the main
        model's streams [B,T,R,D] there and the tokens that follow them, next_tokens [B,T]. Returns (float32
        logits [B,V] at each row's last real position (count[b] - 1), predicting the token after next; cache).
        """
        _, normed, cache = self.mtp[0](streams, self.embed(next_tokens), positions, next_tokens, cache, count)
        last = jnp.take_along_axis(normed, jnp.maximum(count - 1, 0)[:, None, None], axis=1)  # [B, 1, D]
        return self.head("BTD,DV->BTV", last).astype(jnp.float32)[:, 0], cache

    def logits(self, streams: jax.Array) -> jax.Array:
        """float32 logits [B,T,V] from the decoder's streams [B,T,R,D] (HyperHead, final norm, head)."""
        out = self.head("BTD,DV->BTV", self.norm(self.hc_head(streams))).astype(jnp.float32)
        return shd.constrain(out, (shd.ACT_BATCH, shd.ACT_LENGTH, shd.ACT_VOCAB))

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        *,
        with_mtp: bool = True,
        engram_rows: dict[str, jax.Array] | None = None,
    ) -> tuple[jax.Array, list[jax.Array], dict[str, Any]]:
        """tokens [B,T] -> (logits f32 [B,T,V], [mtp logits f32 [B,T,V] per module], aux).

        aux: {'layers': the decoder's per-layer values (see `decode`), 'mtp': [each MTP block's aux]}.
        engram_rows: Engram rows gathered ahead for tables kept outside the params (see `DecoderLayer`).
        """
        b, t = tokens.shape
        positions = default_positions(b, t) if positions is None else positions
        streams, aux = self.decode(self.embed(tokens), positions, tokens, engram_rows)
        logits = self.logits(streams)
        mtp_logits, mtp_aux = [], []
        if with_mtp:
            for k, module in enumerate(self.mtp, start=1):
                next_tokens = jnp.roll(tokens, -k, axis=1)  # t_(i+k); the wrapped tail has no target
                streams, normed, m_aux = module(streams, self.embed(next_tokens), positions, next_tokens)
                mtp_logits.append(self.head("BTD,DV->BTV", normed).astype(jnp.float32))
                mtp_aux.append(m_aux)
        return logits, mtp_logits, {"layers": aux, "mtp": mtp_aux}


def residual_gains(cfg: ModelConfig, params: dict[str, Any], tokens: jax.Array) -> dict[str, np.ndarray]:
    """The composite residual gain of the decoder on `tokens` [B, T] (mHC paper, Amax gain; `mhc.composite_gain`).

    Sites are the 2L residual maps in depth order (attention, FFN per layer); entry s is the gain of the
    product of maps s..2L-1, as the paper's per-depth curve, max over tokens. Returns {'forward': [2L],
    'backward': [2L]} (all ones for residual_mode 'none', whose maps are the identity).
    """
    _check_tokens(cfg, tokens)
    if cfg.residual_mode == "none":  # the identity map at every site (and nothing is sown)
        ones = np.ones(2 * cfg.num_hidden_layers)
        return {"forward": ones, "backward": ones.copy()}
    combs = _site_combs(cfg, params, jnp.asarray(tokens, jnp.int32))
    gains = [jax.tree.map(lambda g: jnp.max(g), composite_gain(combs[s:])) for s in range(combs.shape[0])]
    return {"forward": np.array([float(g[0]) for g in gains]), "backward": np.array([float(g[1]) for g in gains])}


@functools.partial(jax.jit, static_argnums=0)
def _site_combs(cfg: ModelConfig, params: dict[str, Any], tokens: jax.Array) -> jax.Array:
    """The residual maps of every site in depth order: float32 [2L, B, T, R, R]."""
    _, state = Transformer(cfg).apply(split_collections(params), tokens, with_mtp=False, mutable=[INTERMEDIATES])
    sown = state[INTERMEDIATES]
    combs = []
    for layer in range(cfg.num_hidden_layers):
        group, repeat, sub = layer_location(cfg, layer)
        node = sown[group][sub] if sub else sown[group]
        for site in ("hc_attn", "hc_ffn"):
            combs.append(node[site]["comb"][0][repeat])
    return jnp.stack(combs)


def _check_tokens(cfg: ModelConfig, tokens: jax.Array) -> None:
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integers, got dtype {tokens.dtype}")
    if isinstance(tokens, jax.core.Tracer):
        return
    lo, hi = int(jnp.min(tokens)), int(jnp.max(tokens))
    if lo < 0 or hi >= cfg.vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {cfg.vocab_size})")


def merge_collections(variables: dict[str, Any]) -> dict[str, Any]:
    """One tree of the 'params' and CONSTANTS collections (a constant `tid2eid` sits beside its gate's kernel)."""
    flat = traverse_util.flatten_dict(nn.unbox(variables.get("params", {})))
    flat.update(traverse_util.flatten_dict(nn.unbox(variables.get(CONSTANTS, {}))))
    return traverse_util.unflatten_dict(flat)


def split_collections(params: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `merge_collections`: {'params': trainable leaves, CONSTANTS: leaves named in CONSTANT_LEAVES}."""
    flat = traverse_util.flatten_dict(params)
    constants = {k: v for k, v in flat.items() if k[-1] in CONSTANT_LEAVES}
    trainable = {k: v for k, v in flat.items() if k[-1] not in CONSTANT_LEAVES}
    return {"params": traverse_util.unflatten_dict(trainable), CONSTANTS: traverse_util.unflatten_dict(constants)}


def init_params(cfg: ModelConfig, key: jax.Array, *, length: int = 8) -> dict[str, Any]:
    """Randomly initialised parameters (plain arrays; hash tables included, see `merge_collections`)."""
    tokens = jnp.zeros((1, length), jnp.int32)
    return merge_collections(jax.jit(Transformer(cfg).init)(key, tokens))


@functools.cache
def _abstract_variables(cfg: ModelConfig) -> dict[str, Any]:  # traced once per config; callers copy out of it
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    return jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens)


def param_logical_specs(cfg: ModelConfig) -> dict[str, Any]:
    """The parameter tree's logical PartitionSpecs, from abstract shapes (nothing is allocated)."""
    variables = _abstract_variables(cfg)
    specs = {name: nn.get_partition_spec(tree) for name, tree in variables.items()}
    return merge_collections(specs)


def abstract_params(cfg: ModelConfig) -> dict[str, Any]:
    """The parameter tree as ShapeDtypeStructs (nothing is allocated)."""
    return merge_collections(_abstract_variables(cfg))


def forward(cfg: ModelConfig, params: dict[str, Any], tokens: jax.Array) -> jax.Array:
    """float32 logits [B, T, vocab] of the main model for tokens [B, T] (no MTP)."""
    _check_tokens(cfg, tokens)
    return _forward(cfg, params, jnp.asarray(tokens, jnp.int32))


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg: ModelConfig, params: dict[str, Any], tokens: jax.Array) -> jax.Array:
    logits, _, _ = Transformer(cfg).apply(split_collections(params), tokens, with_mtp=False)
    return logits


def make_forward(cfg: ModelConfig, mesh: jax.sharding.Mesh, preset: str):
    """A jitted `(params, tokens) -> logits` sharded over `mesh` by the rule preset `preset`.

    Parameters are expected placed with `shard_params`; tokens are split over the batch axes. The rules
    are entered inside the traced function, so the compiled computation always carries them.
    """
    from v4jax.config import validate_parallelism

    validate_parallelism(cfg, shd.axis_sizes(mesh), shd.RULES[preset])
    param_sh = shd.param_shardings(param_logical_specs(cfg), mesh, preset)
    pairs = shd.rules(preset)
    batch_sh = jax.sharding.NamedSharding(mesh, shd.logical_to_spec((shd.ACT_BATCH, None), pairs))
    logits_sh = jax.sharding.NamedSharding(mesh, shd.logical_to_spec((shd.ACT_BATCH, None, shd.ACT_VOCAB), pairs))

    def body(params, tokens):
        with nn.logical_axis_rules(pairs):
            logits, _, _ = Transformer(cfg).apply(split_collections(params), tokens, with_mtp=False)
        return logits

    jitted = jax.jit(body, in_shardings=(param_sh, batch_sh), out_shardings=logits_sh)

    def run(params: dict[str, Any], tokens: jax.Array) -> jax.Array:
        _check_tokens(cfg, tokens)
        with jax.set_mesh(mesh):
            return jitted(params, jnp.asarray(tokens, jnp.int32))

    return run


def shard_params(cfg: ModelConfig, params: dict[str, Any], mesh: jax.sharding.Mesh, preset: str) -> dict[str, Any]:
    """Place `params` on `mesh` according to the rule preset."""
    return jax.device_put(params, shd.param_shardings(param_logical_specs(cfg), mesh, preset))
