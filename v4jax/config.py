"""Model configuration for the DeepSeek family: one frozen, hashable dataclass, validated in one place.

Field names follow the Hugging Face `config.json` names so that reading a published config is a dict
rename. Fields that are not in HF configs (compute dtype, MoE dispatch, remat) are v4jax execution
choices: they never change the model's math, only how it is computed.

All validation lives here: `ModelConfig.__post_init__` checks the model itself and
`validate_parallelism` checks a config against a mesh. Every error names the field and the values.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

MODEL_TYPES = ("deepseek_v3", "deepseek_v32", "deepseek_v4")
LAYER_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")
RESIDUAL_MODES = ("none", "hc", "mhc")
SCORING_FUNCS = ("sigmoid", "softmax", "sqrtsoftplus")
MOE_IMPLS = ("auto", "ragged", "capacity", "sorted", "gather")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
INDEXER_STAGES = ("dense_warmup", "sparse")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class YarnScaling:
    """YaRN rope scaling, as in HF `rope_parameters` with `rope_type: yarn`.

    `attention_factor` scales the rotated q/k rope parts (HF semantics: when unset it is
    mscale(factor, mscale) / mscale(factor, mscale_all_dim) if both are set, else mscale(factor, 1)).
    `mscale_all_dim` also multiplies the softmax scale by mscale(factor, mscale_all_dim)^2.
    """

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN magnitude correction 0.1·mscale·ln(factor) + 1 (1 when factor ≤ 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Every architecture knob of the family. Presets live in `v4jax.presets`.

    Derived sizes are properties (`qk_head_dim`, `num_dense_layers`, ...). Sequence fields are tuples.
    """

    model_type: str = "deepseek_v3"
    # --- embedding / head
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # --- attention (MLA for V3 / V3.2; the MLA-only sizes are 0 for V4)
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int
    v_head_dim: int = 0
    rope_theta: float = 10000.0
    rope_scaling: YarnScaling | None = None
    rope_interleave: bool = True
    max_position_embeddings: int = 4096
    # --- dense FFN (the first `first_k_dense_replace` layers)
    intermediate_size: int = 0
    first_k_dense_replace: int = 0
    hidden_act: str = "silu"
    # --- DeepSeekMoE
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int = 1
    moe_intermediate_size: int
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    scoring_func: str = "sigmoid"
    # --- lightning indexer (V3.2 DSA over tokens; V4 CSA over compressed entries); 0 heads = none
    index_n_heads: int = 0
    index_head_dim: int = 128
    index_topk: int = 2048
    # --- V4 attention: shared-KV MQA with a sliding window, per-layer compression (CSA / HCA)
    head_dim: int = 0  # the shared key/value head dim (512); 0 for MLA models
    o_groups: int = 1
    o_lora_rank: int = 0
    sliding_window: int = 128
    layer_types: tuple[str, ...] = ()  # one of LAYER_TYPES per layer (V4 only)
    compress_rate_csa: int = 4
    compress_rate_hca: int = 128
    compress_rope_theta: float = 160000.0
    compress_rope_scaling: YarnScaling | None = None  # YaRN of compressed layers (frequencies only)
    # --- V4 MoE: hash-routed first layers, clamped SwiGLU
    num_hash_layers: int = 0
    swiglu_limit: float | None = None
    # --- residual stream: plain pre-norm ('none'), hyper-connections ('hc'), or mHC ('mhc', V4)
    residual_mode: str = "none"
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    # --- multi-token prediction
    num_nextn_predict_layers: int = 0
    # --- Engram conditional memory (architecture.md §9): hashed n-gram tables read before the attention of
    # `engram_layer_ids`; see `v4jax.layers.engram`. Empty `engram_layer_ids` = no Engram.
    engram_layer_ids: tuple[int, ...] = ()  # layers that carry an Engram module (demo [1, 15], V4.1 [1, 14])
    engram_max_ngram_size: int = 3  # N: n-gram orders 2..N
    engram_n_heads: int = 8  # hash heads per order
    engram_head_dim: int = 64  # width of one head's table row
    engram_vocab_size: tuple[int, ...] = ()  # per-order base table size (N-1 entries); primes are searched from it
    engram_compressed_vocab_size: int = 0  # V' of the canonical-id map (0: vocab_size, the identity map)
    engram_pad_id: int = 2  # token id read before the start of a sequence (mapped to its canonical id)
    engram_kernel_size: int = 4  # short causal conv kernel (dilation N); 0 = no short conv (V4.1)
    engram_seed: int = 0  # multipliers of layer l drawn from numpy default_rng(seed + 10007·l)
    engram_gate: bool = True  # False (ablation): gate α = 1, no key projection and no gate norms
    # --- v4jax execution choices (not part of HF configs; never change the math)
    dtype: str = "float32"
    param_dtype: str = "float32"
    moe_impl: str = "auto"
    capacity_factor: float | None = None  # None: dropless capacity (X = tokens per shard); see moe_dispatch
    remat_policy: str = "none"
    # --- training stage of the DSA / CSA lightning indexer (V3.2 report §2.1): None (inference, no indexer
    # loss), 'dense_warmup' (dense attention; the indexer learns the attention distribution by a KL loss) or
    # 'sparse' (top-k attention; KL over the selected keys). In both stages the indexer's inputs and the
    # target are detached, so the KL trains only the indexer. See `v4jax.layers.dsa.indexer_kl`.
    indexer_training: str | None = None

    def __post_init__(self):
        _validate(self)

    # ---------------------------------------------------------------- derived sizes
    @property
    def is_v4(self) -> bool:
        return self.model_type == "deepseek_v4"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_dense_layers(self) -> int:
        return min(self.first_k_dense_replace, self.num_hidden_layers)

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.num_dense_layers

    @property
    def shared_intermediate_size(self) -> int:
        return self.n_shared_experts * self.moe_intermediate_size

    @property
    def softmax_scale(self) -> float:
        """Attention logit scale: qk_head_dim^-1/2, times mscale(factor, mscale_all_dim)^2 under YaRN."""
        scale = self.qk_head_dim**-0.5
        y = self.rope_scaling
        if y is not None and y.mscale_all_dim:
            scale *= yarn_mscale(y.factor, y.mscale_all_dim) ** 2
        return scale

    @property
    def engram_num_hash_heads(self) -> int:
        """Z: hash heads of one Engram layer, (N-1) orders × engram_n_heads."""
        return (self.engram_max_ngram_size - 1) * self.engram_n_heads

    @property
    def engram_dim(self) -> int:
        """D_en = Z·engram_head_dim: width of the concatenated retrieved rows of one token."""
        return self.engram_num_hash_heads * self.engram_head_dim

    @property
    def engram_vocab(self) -> int:
        """V': the size of the canonical (compressed) vocabulary the n-gram hash runs on."""
        return self.engram_compressed_vocab_size or self.vocab_size

    @property
    def engram_conv_context(self) -> int:
        """(kernel-1)·dilation: past conv inputs one decode step needs (0 without the short conv)."""
        return max(self.engram_kernel_size - 1, 0) * self.engram_max_ngram_size

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- plain-dict form (run directories)
    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON-ready values (tuples become lists, YaRN scalings dicts)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ModelConfig:
        """Inverse of `to_dict`; unknown keys are an error that names them."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            raise ValueError(f"ModelConfig has no field(s) {unknown}")
        values = dict(raw)
        for name in ("rope_scaling", "compress_rope_scaling"):
            if isinstance(values.get(name), Mapping):
                values[name] = YarnScaling(**values[name])
        for name, value in values.items():
            if isinstance(value, list):
                values[name] = tuple(value)
        return cls(**values)

    # ---------------------------------------------------------------- HF interop
    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | Mapping[str, Any], **overrides: Any) -> ModelConfig:
        """Read a published HF `config.json` (a path to the file or its directory, or the parsed dict)."""
        from v4jax.hf.config import config_from_hf_dict

        if isinstance(path_or_dict, Mapping):
            raw = dict(path_or_dict)
        else:
            path = os.fspath(path_or_dict)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            with open(path) as f:
                raw = json.load(f)
        return config_from_hf_dict(raw, **overrides)

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dict for this config (execution fields are dropped)."""
        from v4jax.hf.config import config_to_hf_dict

        return config_to_hf_dict(self)


def _positive(cfg: ModelConfig, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")


def _validate(cfg: ModelConfig) -> None:
    """All model-level checks; each message names the field(s) and the offending values."""
    if cfg.model_type not in MODEL_TYPES:
        raise ValueError(f"ModelConfig.model_type={cfg.model_type!r} is not supported (supported: {MODEL_TYPES})")
    _positive(
        cfg,
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "qk_rope_head_dim",
        "moe_intermediate_size",
        "n_routed_experts",
        "num_experts_per_tok",
        "n_group",
        "topk_group",
        "max_position_embeddings",
    )
    if cfg.is_v4:
        _validate_v4(cfg)
    else:
        _positive(cfg, "kv_lora_rank", "qk_nope_head_dim", "v_head_dim")
        if cfg.first_k_dense_replace:
            _positive(cfg, "intermediate_size")
    if cfg.index_n_heads:
        _positive(cfg, "index_n_heads", "index_head_dim", "index_topk")
        if cfg.index_head_dim < cfg.qk_rope_head_dim:
            raise ValueError(
                f"ModelConfig.index_head_dim={cfg.index_head_dim} < qk_rope_head_dim={cfg.qk_rope_head_dim}"
            )
    elif cfg.model_type == "deepseek_v32":
        raise ValueError("ModelConfig.index_n_heads must be > 0 for model_type 'deepseek_v32' (DSA indexer)")
    if cfg.index_n_heads and cfg.model_type == "deepseek_v3":
        raise ValueError(
            f"ModelConfig.index_n_heads={cfg.index_n_heads} but model_type 'deepseek_v3' has no indexer "
            "(use model_type 'deepseek_v32')"
        )
    if cfg.model_type == "deepseek_v32" and cfg.q_lora_rank is None:
        raise ValueError("ModelConfig.q_lora_rank must be set for model_type 'deepseek_v32' (the indexer reads c_q)")
    if cfg.q_lora_rank is not None:
        _positive(cfg, "q_lora_rank")
    for name in ("first_k_dense_replace", "n_shared_experts", "num_nextn_predict_layers"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"ModelConfig.{name} must be a non-negative integer, got {value!r}")
    if cfg.qk_rope_head_dim % 2:
        raise ValueError(f"ModelConfig.qk_rope_head_dim={cfg.qk_rope_head_dim} must be even (rope rotates pairs)")
    if not cfg.rms_norm_eps > 0:
        raise ValueError(f"ModelConfig.rms_norm_eps must be > 0, got {cfg.rms_norm_eps}")
    if not cfg.rope_theta > 1:
        raise ValueError(f"ModelConfig.rope_theta must be > 1, got {cfg.rope_theta}")
    if cfg.tie_word_embeddings:
        raise ValueError("ModelConfig.tie_word_embeddings=True is not implemented (DeepSeek heads are untied)")
    if cfg.hidden_act != "silu":
        raise ValueError(f"ModelConfig.hidden_act={cfg.hidden_act!r} is not implemented (only 'silu')")
    # MoE routing
    if cfg.num_experts_per_tok > cfg.n_routed_experts:
        raise ValueError(
            f"ModelConfig.num_experts_per_tok={cfg.num_experts_per_tok} > n_routed_experts={cfg.n_routed_experts}"
        )
    if cfg.n_routed_experts % cfg.n_group:
        raise ValueError(
            f"ModelConfig.n_routed_experts={cfg.n_routed_experts} is not divisible by n_group={cfg.n_group}"
        )
    if cfg.topk_group > cfg.n_group:
        raise ValueError(f"ModelConfig.topk_group={cfg.topk_group} > n_group={cfg.n_group}")
    experts_per_group = cfg.n_routed_experts // cfg.n_group
    if cfg.n_group > 1 and experts_per_group < 2:
        raise ValueError(
            f"ModelConfig.n_group={cfg.n_group} leaves {experts_per_group} expert per group; group scores sum "
            "the top-2 experts of a group, so each group needs at least 2 (n_routed_experts / n_group >= 2)"
        )
    if cfg.topk_group * experts_per_group < cfg.num_experts_per_tok:
        raise ValueError(
            f"ModelConfig.topk_group={cfg.topk_group} groups of {experts_per_group} experts hold fewer than "
            f"num_experts_per_tok={cfg.num_experts_per_tok} experts"
        )
    if cfg.scoring_func not in SCORING_FUNCS:
        raise ValueError(f"ModelConfig.scoring_func={cfg.scoring_func!r} is not one of {SCORING_FUNCS}")
    if not cfg.routed_scaling_factor > 0:
        raise ValueError(f"ModelConfig.routed_scaling_factor must be > 0, got {cfg.routed_scaling_factor}")
    # rope / YaRN
    y = cfg.rope_scaling
    if y is not None:
        if not isinstance(y, YarnScaling):
            raise ValueError(f"ModelConfig.rope_scaling must be a YarnScaling or None, got {type(y).__name__}")
        if not y.factor >= 1:
            raise ValueError(f"ModelConfig.rope_scaling.factor must be >= 1, got {y.factor}")
        if not isinstance(y.original_max_position_embeddings, int) or y.original_max_position_embeddings <= 0:
            raise ValueError(
                "ModelConfig.rope_scaling.original_max_position_embeddings must be a positive integer, got "
                f"{y.original_max_position_embeddings!r}"
            )
        if not y.beta_fast > y.beta_slow > 0:
            raise ValueError(
                f"ModelConfig.rope_scaling needs beta_fast > beta_slow > 0, got {y.beta_fast}, {y.beta_slow}"
            )
    # execution choices
    if cfg.residual_mode != "none":
        _positive(cfg, "hc_mult", "hc_sinkhorn_iters")
        if not cfg.hc_eps > 0:
            raise ValueError(f"ModelConfig.hc_eps must be > 0, got {cfg.hc_eps}")
    for name, allowed in (
        ("residual_mode", RESIDUAL_MODES),
        ("dtype", DTYPES),
        ("param_dtype", DTYPES),
        ("moe_impl", MOE_IMPLS),
        ("remat_policy", REMAT_POLICIES),
    ):
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"ModelConfig.{name}={getattr(cfg, name)!r} is not one of {allowed}")
    if cfg.capacity_factor is not None and not cfg.capacity_factor > 0:
        raise ValueError(f"ModelConfig.capacity_factor must be > 0, got {cfg.capacity_factor}")
    if cfg.engram_layer_ids:
        _validate_engram(cfg)
    if cfg.indexer_training is not None:
        if cfg.indexer_training not in INDEXER_STAGES:
            raise ValueError(
                f"ModelConfig.indexer_training={cfg.indexer_training!r} is not one of {INDEXER_STAGES} or None"
            )
        if not cfg.index_n_heads:
            raise ValueError(
                f"ModelConfig.indexer_training={cfg.indexer_training!r} needs an indexer (index_n_heads > 0)"
            )


def _validate_engram(cfg: ModelConfig) -> None:
    """Checks of the Engram fields (only when `engram_layer_ids` is non-empty)."""
    ids = cfg.engram_layer_ids
    if not isinstance(ids, tuple) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"ModelConfig.engram_layer_ids must be a tuple of ints, got {ids!r}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"ModelConfig.engram_layer_ids={ids} repeats a layer")
    bad = [i for i in ids if not 0 <= i < cfg.num_hidden_layers]
    if bad:
        raise ValueError(
            f"ModelConfig.engram_layer_ids={ids}: {bad} outside [0, num_hidden_layers={cfg.num_hidden_layers})"
        )
    _positive(cfg, "engram_n_heads", "engram_head_dim")
    n = cfg.engram_max_ngram_size
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise ValueError(f"ModelConfig.engram_max_ngram_size must be an integer >= 2, got {n!r}")
    sizes = cfg.engram_vocab_size
    if not isinstance(sizes, tuple) or len(sizes) != n - 1:
        raise ValueError(
            f"ModelConfig.engram_vocab_size={sizes!r} needs one base size per n-gram order 2..{n} "
            f"({n - 1} entries, engram_max_ngram_size={n})"
        )
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 2 for v in sizes):
        raise ValueError(f"ModelConfig.engram_vocab_size={sizes} entries must be integers >= 2")
    # Flat row ids are int32: the primes of one layer (each >= its base) must sum below 2^31.
    if cfg.engram_n_heads * sum(sizes) >= 2**31:
        raise ValueError(
            f"ModelConfig.engram_vocab_size={sizes} × engram_n_heads={cfg.engram_n_heads} rows per layer "
            "reach 2^31: flat table row ids must fit int32"
        )
    v_c = cfg.engram_compressed_vocab_size
    if not isinstance(v_c, int) or isinstance(v_c, bool) or not 0 <= v_c <= cfg.vocab_size:
        raise ValueError(
            f"ModelConfig.engram_compressed_vocab_size must be an integer in [0, vocab_size={cfg.vocab_size}] "
            f"(0: the identity map), got {v_c!r}"
        )
    pad = cfg.engram_pad_id
    if not isinstance(pad, int) or isinstance(pad, bool) or not 0 <= pad < cfg.vocab_size:
        raise ValueError(f"ModelConfig.engram_pad_id must be a token id in [0, {cfg.vocab_size}), got {pad!r}")
    for name in ("engram_kernel_size", "engram_seed"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"ModelConfig.{name} must be a non-negative integer, got {value!r}")
    if not isinstance(cfg.engram_gate, bool):
        raise ValueError(f"ModelConfig.engram_gate must be a bool, got {cfg.engram_gate!r}")


def _validate_v4(cfg: ModelConfig) -> None:
    """Checks specific to the V4 architecture (shared-KV attention, compression, mHC, hash routing)."""
    _positive(cfg, "head_dim", "o_groups", "o_lora_rank", "sliding_window", "compress_rate_csa", "compress_rate_hca")
    if cfg.q_lora_rank is None:
        raise ValueError("ModelConfig.q_lora_rank must be set for model_type 'deepseek_v4'")
    if cfg.qk_rope_head_dim > cfg.head_dim:
        raise ValueError(f"ModelConfig.qk_rope_head_dim={cfg.qk_rope_head_dim} > head_dim={cfg.head_dim}")
    if cfg.num_attention_heads % cfg.o_groups:
        raise ValueError(
            f"ModelConfig.num_attention_heads={cfg.num_attention_heads} is not divisible by o_groups={cfg.o_groups}"
        )
    if len(cfg.layer_types) != cfg.num_hidden_layers:
        raise ValueError(
            f"ModelConfig.layer_types has {len(cfg.layer_types)} entries, num_hidden_layers={cfg.num_hidden_layers}"
        )
    bad = sorted({t for t in cfg.layer_types if t not in LAYER_TYPES})
    if bad:
        raise ValueError(f"ModelConfig.layer_types has unknown types {bad} (known: {LAYER_TYPES})")
    if "compressed_sparse_attention" in cfg.layer_types and not cfg.index_n_heads:
        raise ValueError("ModelConfig.index_n_heads must be > 0: compressed_sparse_attention layers need an indexer")
    if not 0 <= cfg.num_hash_layers <= cfg.num_hidden_layers:
        raise ValueError(
            f"ModelConfig.num_hash_layers={cfg.num_hash_layers} must lie in [0, num_hidden_layers="
            f"{cfg.num_hidden_layers}]"
        )
    if cfg.first_k_dense_replace:
        raise ValueError(f"ModelConfig.first_k_dense_replace={cfg.first_k_dense_replace}: V4 has no dense layers")
    if cfg.swiglu_limit is not None and not cfg.swiglu_limit > 0:
        raise ValueError(f"ModelConfig.swiglu_limit must be > 0 or None, got {cfg.swiglu_limit}")


def validate_parallelism(cfg: ModelConfig, axis_sizes: Mapping[str, int], rules: Mapping[str, Any]) -> None:
    """Check that every sharded model dimension divides the mesh axes its logical name maps to.

    `axis_sizes` maps mesh axis names to sizes; `rules` maps logical names to mesh axes (None, a name
    or a tuple of names), as in `v4jax.sharding.RULES[preset]`.
    """
    dims = {
        "heads": ("num_attention_heads", cfg.num_attention_heads),
        "experts": ("n_routed_experts", cfg.n_routed_experts),
        "mlp": ("intermediate_size", cfg.intermediate_size),
        "expert_mlp": ("moe_intermediate_size", cfg.moe_intermediate_size),
        "vocab": ("vocab_size", cfg.vocab_size),
        "embed": ("hidden_size", cfg.hidden_size),
        "q_lora": ("q_lora_rank", cfg.q_lora_rank or 0),
        "kv_lora": ("kv_lora_rank", cfg.kv_lora_rank),
    }
    for logical, (field, size) in dims.items():
        axes = rules.get(logical)
        if axes is None or size == 0:
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        shards = math.prod(axis_sizes.get(a, 1) for a in axes)
        if size % shards:
            raise ValueError(
                f"ModelConfig.{field}={size} is not divisible by the {shards} shards of mesh axes {axes} "
                f"that logical axis {logical!r} maps to"
            )
    if cfg.engram_layer_ids and rules.get("engram_rows") is not None:
        from v4jax.layers.engram import hash_plan

        axes = rules["engram_rows"]
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        shards = math.prod(axis_sizes.get(a, 1) for a in axes)
        for layer in hash_plan(cfg).layers.values():
            if layer.table_rows % shards:
                raise ValueError(
                    f"Engram table of layer {layer.layer_id} has {layer.table_rows} rows (engram_vocab_size="
                    f"{cfg.engram_vocab_size}, padded), not divisible by the {shards} shards of mesh axes {axes} "
                    "(logical axis 'engram_rows')"
                )
    if cfg.shared_intermediate_size and rules.get("expert_mlp") is not None:
        axes = rules["expert_mlp"]
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        shards = math.prod(axis_sizes.get(a, 1) for a in axes)
        if cfg.shared_intermediate_size % shards:
            raise ValueError(
                f"ModelConfig n_shared_experts*moe_intermediate_size={cfg.shared_intermediate_size} is not "
                f"divisible by the {shards} shards of mesh axes {axes} (logical axis 'expert_mlp')"
            )
