"""Inference cache bytes per token of context for MLA (V3, V3.2) and V4 (sliding / CSA / HCA) models.

Counts the decoder layers (`num_hidden_layers`; MTP modules excluded) and stores every cached value in one
`dtype` (the official kernels keep parts in FP8; pass dtype='float8_e4m3fn' to see that bound).

MLA (V3): per layer the KV latent and the shared rope key, kv_lora_rank + qk_rope_head_dim values per
    token; V3 671B at bf16: (512 + 64) · 61 · 2 B = 70,272 B. V3.2 adds the indexer key, index_head_dim.
V4 (C = head_dim, W = sliding_window, m / m' = CSA / HCA compress rates, J = index_head_dim):
    per token    CSA: C/m compressed entries + J/m indexer keys;  HCA: C/m';  sliding: nothing
    fixed        every layer: a W-entry ring of C values (the sliding window), in `dtype`;
                 compressor rings, float32 whatever `dtype` (the pooling runs in float32): CSA: the
                 last 2m tokens' 2C kv + 2C gate (the pending window and the previous one, whose low
                 half the next entry pools); its indexer the same at width J; HCA: m' tokens of C kv + C gate.
    The fixed bytes are spread over `context_length` (default max_position_embeddings), so the per-token
    figure falls towards the per-token part as the context grows.
Engram layers (any model) add fixed bytes: the last N-1 token ids (int32) and the short conv's last (K-1)·N
inputs of R·D float32 values (`engram_state_bytes`).

Standard multi-head attention for comparison (`standard_mha_bytes_per_token`): every head caches its key
and value, 2·n_h·d_h·l values per token in the DeepSeek-V2 paper's notation, with V3's actual widths
K = qk_nope + qk_rope = 192 and V = v_head_dim = 128: 128 · 320 · 61 · 2 B = 4,997,120 B (4.77 MiB) for
V3 671B, 71x its MLA cache. The "~516 KB" often quoted beside V3's 70 KB is not MHA: it is LLaMA-3.1 405B
with grouped-query attention (126 layers · 8 KV heads · 2 · 128 · 2 B = 516,096 B; "Insights into
DeepSeek-V3", Table 1), reproduced by `gqa_bytes_per_token(126, 8, 128)`.

    python -m v4jax.cache_size [--dtype bfloat16] [--context-length 1048576]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from v4jax import presets
from v4jax.config import ModelConfig
from v4jax.layers.mhc import num_streams

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}
FULL_SCALE = ("deepseek_v3_671b", "deepseek_v32", "deepseek_v4_flash", "deepseek_v4_pro")
_F32 = 4


def _bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def engram_state_bytes(cfg: ModelConfig) -> int:
    """Fixed bytes of the Engram layers' decode state (n-gram context and conv inputs), per sequence."""
    conv = cfg.engram_conv_context * num_streams(cfg) * cfg.hidden_size * _F32
    per_layer = (cfg.engram_max_ngram_size - 1) * 4 + conv
    return len(cfg.engram_layer_ids) * per_layer


def v4_cache_bytes(cfg: ModelConfig, dtype: str = "bfloat16") -> tuple[float, float]:
    """(bytes per token of context, fixed bytes) of a V4 model's cache, summed over its layers."""
    if not cfg.is_v4:
        raise ValueError(f"v4_cache_bytes needs a V4 config, got model_type={cfg.model_type!r}")
    b = _bytes(dtype)
    c, j, m, mh = cfg.head_dim, cfg.index_head_dim, cfg.compress_rate_csa, cfg.compress_rate_hca
    per_token, fixed = 0.0, 0.0
    for layer_type in cfg.layer_types:
        fixed += cfg.sliding_window * c * b
        if layer_type == "compressed_sparse_attention":
            per_token += (c + j) * b / m
            for width in (c, j):  # attention compressor, indexer compressor (both overlapping)
                fixed += 2 * m * (2 * width + 2 * width) * _F32
        elif layer_type == "heavily_compressed_attention":
            per_token += c * b / mh
            fixed += mh * (c + c) * _F32
    return per_token, fixed + engram_state_bytes(cfg)


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype: str = "bfloat16", context_length: int | None = None) -> float:
    """Bytes of inference cache per token of context (decoder layers); see the module docstring."""
    b = _bytes(dtype)
    if context_length is not None and (isinstance(context_length, bool) or not context_length > 0):
        raise ValueError(f"context_length must be a positive integer or None, got {context_length!r}")
    if cfg.is_v4:
        per_token, fixed = v4_cache_bytes(cfg, dtype)
        return per_token + fixed / (context_length or cfg.max_position_embeddings)
    values = cfg.kv_lora_rank + cfg.qk_rope_head_dim + (cfg.index_head_dim if cfg.index_n_heads else 0)
    fixed = engram_state_bytes(cfg) / (context_length or cfg.max_position_embeddings)
    return float(values * cfg.num_hidden_layers * b) + fixed


def gqa_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: str = "bfloat16") -> int:
    """Bytes per token of a (grouped-query) multi-head attention cache: a key and a value per KV head."""
    return 2 * num_kv_heads * head_dim * num_layers * _bytes(dtype)


def standard_mha_bytes_per_token(cfg: ModelConfig, dtype: str = "bfloat16") -> int:
    """Bytes per token if every query head cached its own key and value (V3 widths: K qk_head_dim, V
    v_head_dim; V4: head_dim each)."""
    if cfg.is_v4:
        return gqa_bytes_per_token(cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim, dtype)
    kv = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    return kv * cfg.num_hidden_layers * _bytes(dtype)


def _attention(cfg: ModelConfig) -> str:
    if not cfg.is_v4:
        return "MLA + DSA indexer" if cfg.index_n_heads else "MLA"
    short = {"sliding_attention": "SWA", "compressed_sparse_attention": "CSA", "heavily_compressed_attention": "HCA"}
    return " + ".join(f"{cfg.layer_types.count(t)} {s}" for t, s in short.items() if t in cfg.layer_types)


def cache_size_table(
    names: Sequence[str] = FULL_SCALE, dtype: str = "bfloat16", context_length: int = 1_048_576
) -> str:
    """A markdown table of the presets' cache per token and in total at `context_length`, beside MHA."""
    rows = [
        f"| preset | attention | cache B/token ({dtype}, at {context_length:,}) | GiB at {context_length:,} "
        "| standard MHA B/token | MHA / cache |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name in names:
        cfg = presets.get(name)
        per_token = kv_cache_bytes_per_token(cfg, dtype, context_length)
        mha = standard_mha_bytes_per_token(cfg, dtype)
        rows.append(
            f"| {name} | {_attention(cfg)} | {per_token:,.1f} | {per_token * context_length / 2**30:,.2f} "
            f"| {mha:,} | {mha / per_token:,.0f}x |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_BYTES))
    parser.add_argument("--context-length", type=int, default=1_048_576)
    args = parser.parse_args(argv)
    print(cache_size_table(dtype=args.dtype, context_length=args.context_length))


if __name__ == "__main__":
    main()
