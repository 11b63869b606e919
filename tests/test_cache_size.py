"""Cache bytes per token: published V3 figures and a hand derivation for a tiny V4 config."""

import numpy as np
import pytest

from v4jax import presets
from v4jax.cache_size import (
    cache_size_table,
    gqa_bytes_per_token,
    kv_cache_bytes_per_token,
    main,
    standard_mha_bytes_per_token,
    v4_cache_bytes,
)


def test_v3_671b_mla_cache_is_70272_bytes():
    cfg = presets.deepseek_v3_671b()
    assert kv_cache_bytes_per_token(cfg) == (512 + 64) * 2 * 61 == 70_272
    assert kv_cache_bytes_per_token(cfg, "float32") == 2 * 70_272
    assert kv_cache_bytes_per_token(cfg, context_length=7) == 70_272  # no fixed part in MLA


def test_v32_adds_the_indexer_key():
    assert kv_cache_bytes_per_token(presets.deepseek_v32()) == 70_272 + 128 * 2 * 61 == 85_888


def test_standard_mha_and_gqa_references():
    # V3 671B with every head caching K (192) and V (128): 128 heads * 320 * 61 layers * 2 B
    assert standard_mha_bytes_per_token(presets.deepseek_v3_671b()) == 4_997_120
    # the "516 KB" of "Insights into DeepSeek-V3" Table 1: LLaMA-3.1 405B, 126 layers, 8 KV heads of 128
    assert gqa_bytes_per_token(126, 8, 128) == 516_096
    # V4: K = V = head_dim per head
    cfg = presets.tiny_v4()
    assert standard_mha_bytes_per_token(cfg, "float32") == 2 * 4 * 48 * 4 * 4


def tiny_v4_by_hand(itemsize: int, context_length: int) -> float:
    """tiny_v4: layers (sliding, CSA, HCA, CSA), C=48, W=8, m=4, m'=8, J=32; float64 arithmetic."""
    f32 = np.float64(4)
    per_token = 2 * (48 + 32) * itemsize / np.float64(4) + 48 * itemsize / np.float64(8)
    window = 4 * 8 * 48 * itemsize
    csa = 2 * 4 * (2 * 48 + 2 * 48) * f32  # compressor ring: 2m tokens of 2C kv + 2C gate
    csa += 2 * 4 * (2 * 32 + 2 * 32) * f32  # indexer compressor, the same at J
    hca = 8 * (48 + 48) * f32
    return per_token + (window + 2 * csa + hca) / np.float64(context_length)


@pytest.mark.parametrize("dtype, itemsize", [("bfloat16", 2), ("float32", 4), ("float8_e4m3fn", 1)])
def test_tiny_v4_matches_hand_derivation(dtype, itemsize):
    cfg = presets.tiny_v4()
    assert v4_cache_bytes(cfg, dtype)[0] == 92 * itemsize / 2  # 2·(48+32)/4 + 48/8 = 46 values per token
    for length in (1, 100, 256, 4096):
        np.testing.assert_allclose(
            kv_cache_bytes_per_token(cfg, dtype, length), tiny_v4_by_hand(itemsize, length), rtol=1e-12
        )
    # default context: max_position_embeddings (256): 92 + (3072 window + 2·10240 CSA rings + 3072 HCA ring) / 256 = 196
    assert kv_cache_bytes_per_token(cfg, dtype) == kv_cache_bytes_per_token(cfg, dtype, 256)
    if dtype == "bfloat16":
        assert kv_cache_bytes_per_token(cfg, dtype) == 196.0


def test_v4_fixed_cost_is_amortised_over_the_context():
    cfg = presets.deepseek_v4_flash()
    lengths = [1024, 8192, 65536, 1_048_576, 2**30]
    costs = [kv_cache_bytes_per_token(cfg, context_length=n) for n in lengths]
    assert all(a > b for a, b in zip(costs, costs[1:], strict=False))
    per_token, fixed = v4_cache_bytes(cfg)
    assert per_token == 21 * (512 + 128) * 2 / 4 + 20 * 512 * 2 / 128 == 6880
    np.testing.assert_allclose(costs[-1], per_token, rtol=1e-4)
    np.testing.assert_allclose(costs[0] - per_token, fixed / 1024, rtol=1e-12)


def test_bad_arguments_are_named():
    cfg = presets.deepseek_v3_671b()
    with pytest.raises(ValueError, match=r"dtype='int8' is not one of"):
        kv_cache_bytes_per_token(cfg, "int8")
    with pytest.raises(ValueError, match="dtype='fp16' is not one of"):
        standard_mha_bytes_per_token(cfg, "fp16")
    with pytest.raises(ValueError, match="context_length must be a positive integer"):
        kv_cache_bytes_per_token(presets.tiny_v4(), context_length=0)
    with pytest.raises(ValueError, match="needs a V4 config"):
        v4_cache_bytes(cfg)


def test_table_and_command_line(capsys):
    table = cache_size_table(context_length=1_048_576)
    for name in ("deepseek_v3_671b", "deepseek_v32", "deepseek_v4_flash", "deepseek_v4_pro"):
        assert f"| {name} |" in table
    assert "| 70,272.0 | 68.62 |" in table  # 70,272 B · 2^20 tokens = 68.625 GiB
    main(["--context-length", "1048576"])
    assert capsys.readouterr().out.strip() == table
