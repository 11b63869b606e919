"""Named model configurations: `tiny` (tests), `small` (benchmarks) and the published full-scale configs.

`tiny` gives every dimension a distinct size so that a swapped axis fails loudly:
D=64, Q=48, C=40, H=24, P=16, A=20, F=144, M=36, E=8, N=4, V=512.
"""

from __future__ import annotations

from collections.abc import Callable

from v4jax.config import ModelConfig, YarnScaling


def tiny() -> ModelConfig:
    """CPU test model: 1 dense + 2 MoE layers, group-limited routing, YaRN on, one MTP module."""
    return ModelConfig(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        q_lora_rank=48,
        kv_lora_rank=40,
        qk_nope_head_dim=24,
        qk_rope_head_dim=16,
        v_head_dim=20,
        rope_theta=10000.0,
        rope_scaling=YarnScaling(
            factor=4.0,
            original_max_position_embeddings=128,
            beta_fast=32.0,
            beta_slow=1.0,
            mscale=1.0,
            mscale_all_dim=1.0,
        ),
        max_position_embeddings=512,
        intermediate_size=144,
        first_k_dense_replace=1,
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_shared_experts=1,
        moe_intermediate_size=36,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        num_nextn_predict_layers=1,
    )


def tiny_v32() -> ModelConfig:
    """`tiny` with V3.2's DSA lightning indexer (I=3 heads of J=32, top-6 keys)."""
    return tiny().replace(model_type="deepseek_v32", index_n_heads=3, index_head_dim=32, index_topk=6)


def tiny_v4() -> ModelConfig:
    """CPU test model with every V4 part: sliding, CSA and HCA layers (compress rates 4 and 8), mHC with
    3 streams, one hash-routed MoE layer, clamped SwiGLU, one MTP block. D=64, N=4, c=48, P=16."""
    return ModelConfig(
        model_type="deepseek_v4",
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        q_lora_rank=40,
        head_dim=48,
        qk_rope_head_dim=16,
        o_groups=2,
        o_lora_rank=24,
        sliding_window=8,
        layer_types=(
            "sliding_attention",
            "compressed_sparse_attention",
            "heavily_compressed_attention",
            "compressed_sparse_attention",
        ),
        compress_rate_csa=4,
        compress_rate_hca=8,
        rope_theta=10000.0,
        compress_rope_theta=160000.0,
        compress_rope_scaling=YarnScaling(factor=4.0, original_max_position_embeddings=64, attention_factor=1.0),
        max_position_embeddings=256,
        index_n_heads=3,
        index_head_dim=32,
        index_topk=4,
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_shared_experts=1,
        moe_intermediate_size=36,
        routed_scaling_factor=1.5,
        scoring_func="sqrtsoftplus",
        num_hash_layers=1,
        swiglu_limit=10.0,
        residual_mode="mhc",
        hc_mult=3,
        hc_sinkhorn_iters=20,
        hc_eps=1e-6,
        num_nextn_predict_layers=1,
    )


def tiny_v4_engram() -> ModelConfig:
    """`tiny_v4` with Engram memory at layer 1: 2-grams and 3-grams, 4 hash heads per order of 16 dims (tables of
    primes above 1021 rows per head), the short conv of kernel 4, the identity canonical map."""
    return tiny_v4().replace(
        engram_layer_ids=(1,),
        engram_max_ngram_size=3,
        engram_n_heads=4,
        engram_head_dim=16,
        engram_vocab_size=(1021, 1021),
    )


def small() -> ModelConfig:
    """Benchmark model (V3-style): D=512, 8 layers (1 dense), 64 experts top-6, one MTP module."""
    return ModelConfig(
        vocab_size=8192,
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        q_lora_rank=256,
        kv_lora_rank=128,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        intermediate_size=1536,
        first_k_dense_replace=1,
        n_routed_experts=64,
        num_experts_per_tok=6,
        n_shared_experts=1,
        moe_intermediate_size=256,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        num_nextn_predict_layers=1,
    )


def small_v4() -> ModelConfig:
    """Benchmark model (V4-style): D=512, 8 layers (2 sliding, then 3 × (CSA, HCA)), real compress rates 4 and
    128, window 128, mHC with 4 streams, 64 experts top-6 with 2 hash-routed layers, one MTP block."""
    return ModelConfig(
        model_type="deepseek_v4",
        vocab_size=8192,
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        q_lora_rank=256,
        head_dim=128,
        qk_rope_head_dim=32,
        o_groups=4,
        o_lora_rank=128,
        sliding_window=128,
        layer_types=("sliding_attention",) * 2 + ("compressed_sparse_attention", "heavily_compressed_attention") * 3,
        compress_rate_csa=4,
        compress_rate_hca=128,
        rope_theta=10000.0,
        compress_rope_theta=160000.0,
        compress_rope_scaling=YarnScaling(factor=16.0, original_max_position_embeddings=4096, attention_factor=1.0),
        max_position_embeddings=65536,
        index_n_heads=8,
        index_head_dim=64,
        index_topk=128,
        n_routed_experts=64,
        num_experts_per_tok=6,
        n_shared_experts=1,
        moe_intermediate_size=256,
        routed_scaling_factor=1.5,
        scoring_func="sqrtsoftplus",
        num_hash_layers=2,
        swiglu_limit=10.0,
        residual_mode="mhc",
        hc_mult=4,
        num_nextn_predict_layers=1,
    )


def deepseek_v3_671b() -> ModelConfig:
    """The published DeepSeek-V3 (671B total, 37B active) config."""
    return ModelConfig(
        vocab_size=129280,
        hidden_size=7168,
        num_hidden_layers=61,
        rms_norm_eps=1e-6,
        num_attention_heads=128,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        rope_theta=10000.0,
        rope_scaling=YarnScaling(
            factor=40.0,
            original_max_position_embeddings=4096,
            beta_fast=32.0,
            beta_slow=1.0,
            mscale=1.0,
            mscale_all_dim=1.0,
        ),
        max_position_embeddings=163840,
        intermediate_size=18432,
        first_k_dense_replace=3,
        n_routed_experts=256,
        num_experts_per_tok=8,
        n_shared_experts=1,
        moe_intermediate_size=2048,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        scoring_func="sigmoid",
        num_nextn_predict_layers=1,
        dtype="bfloat16",
        param_dtype="bfloat16",
    )


def deepseek_v32() -> ModelConfig:
    """The published DeepSeek-V3.2 config: V3 (671B) plus the DSA lightning indexer (64 heads of 128, top-2048)."""
    return deepseek_v3_671b().replace(model_type="deepseek_v32", index_n_heads=64, index_head_dim=128, index_topk=2048)


def deepseek_v4_flash() -> ModelConfig:
    """The released DeepSeek-V4-Flash config (284B total, 13B active): 2 sliding + 21 CSA + 20 HCA layers."""
    return ModelConfig(
        model_type="deepseek_v4",
        vocab_size=129280,
        hidden_size=4096,
        num_hidden_layers=43,
        rms_norm_eps=1e-6,
        num_attention_heads=64,
        q_lora_rank=1024,
        head_dim=512,
        qk_rope_head_dim=64,
        o_groups=8,
        o_lora_rank=1024,
        sliding_window=128,
        layer_types=("sliding_attention",) * 2
        + ("compressed_sparse_attention", "heavily_compressed_attention") * 20
        + ("compressed_sparse_attention",),
        compress_rate_csa=4,
        compress_rate_hca=128,
        rope_theta=10000.0,
        compress_rope_theta=160000.0,
        compress_rope_scaling=YarnScaling(
            factor=16.0, original_max_position_embeddings=65536, beta_fast=32.0, beta_slow=1.0, attention_factor=1.0
        ),
        max_position_embeddings=1048576,
        index_n_heads=64,
        index_head_dim=128,
        index_topk=512,
        n_routed_experts=256,
        num_experts_per_tok=6,
        n_shared_experts=1,
        moe_intermediate_size=2048,
        routed_scaling_factor=1.5,
        scoring_func="sqrtsoftplus",
        num_hash_layers=3,
        swiglu_limit=10.0,
        residual_mode="mhc",
        hc_mult=4,
        hc_sinkhorn_iters=20,
        hc_eps=1e-6,
        num_nextn_predict_layers=1,
        dtype="bfloat16",
        param_dtype="bfloat16",
    )


def deepseek_v4_pro() -> ModelConfig:
    """The released DeepSeek-V4-Pro config (1.6T total, 49B active): 31 HCA + 30 CSA layers."""
    return deepseek_v4_flash().replace(
        hidden_size=7168,
        num_hidden_layers=61,
        num_attention_heads=128,
        q_lora_rank=1536,
        o_groups=16,
        n_routed_experts=384,
        moe_intermediate_size=3072,
        routed_scaling_factor=2.5,
        index_topk=1024,
        layer_types=("heavily_compressed_attention",) * 2
        + ("compressed_sparse_attention", "heavily_compressed_attention") * 29
        + ("compressed_sparse_attention",),
    )


def deepseek_v4_flash_engram() -> ModelConfig:
    """V4-Flash with DeepSeek-V4.1-Flash's Engram memory (v4-real.md §17.4): layers 1 and 14, 2- to 4-grams, 8
    heads per order of 256 dims (24 heads, 6144 retrieved dims per token), per-order tables of primes above
    16M rows (384,006,168 and 384,016,682 rows per layer), compressed vocabulary 99,092, pad id 2, no short conv.
    V4.1's other changes (CSA2 attention, single-pass mHC, DSpark drafting) are not part of this preset."""
    return deepseek_v4_flash().replace(
        engram_layer_ids=(1, 14),
        engram_max_ngram_size=4,
        engram_n_heads=8,
        engram_head_dim=256,
        engram_vocab_size=(16_000_000,) * 3,
        engram_compressed_vocab_size=99_092,
        engram_pad_id=2,
        engram_kernel_size=0,
    )


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "tiny": tiny,
    "tiny_v32": tiny_v32,
    "tiny_v4": tiny_v4,
    "tiny_v4_engram": tiny_v4_engram,
    "small": small,
    "small_v4": small_v4,
    "deepseek_v3_671b": deepseek_v3_671b,
    "deepseek_v32": deepseek_v32,
    "deepseek_v4_flash": deepseek_v4_flash,
    "deepseek_v4_pro": deepseek_v4_pro,
    "deepseek_v4_flash_engram": deepseek_v4_flash_engram,
}


def get(name: str) -> ModelConfig:
    """The preset called `name`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
