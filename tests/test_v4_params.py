"""DeepSeek-V4 parameter counts against the released models' numbers (v4-real.md §18)."""

import pytest

from v4jax import param_counts, presets

# HF's module-tree count of the main model (transformers keeps the router correction bias as a buffer).
HF_TOTALS = {"deepseek_v4_flash": 284_332_230_231, "deepseek_v4_pro": 1_572_997_179_491}
ACTIVE_WITHOUT_EMBEDDING = {"deepseek_v4_flash": 13.27, "deepseek_v4_pro": 48.85}  # billions; "13B" / "49B"
MTP = {"deepseek_v4_flash": 6.61, "deepseek_v4_pro": 25.84}  # billions


@pytest.mark.parametrize("name", sorted(HF_TOTALS))
def test_v4_counts_match_the_released_models(name):
    cfg = presets.get(name)
    total, active = param_counts(cfg)
    assert total == HF_TOTALS[name]
    embedding = cfg.vocab_size * cfg.hidden_size
    assert round((active - embedding) / 1e9, 2) == ACTIVE_WITHOUT_EMBEDDING[name]
    total_mtp, _ = param_counts(cfg, include_mtp=True)
    assert round((total_mtp - total) / 1e9, 2) == MTP[name]


def test_hash_tables_are_not_parameters():
    cfg = presets.tiny_v4()
    total, _ = param_counts(cfg)
    assert total == param_counts(cfg.replace(num_hash_layers=0))[0]  # neither the table nor the bias counts


def test_engram_tables_count_whole_in_total_and_by_the_rows_read_in_active():
    """V4-Flash + V4.1's Engram: the released tables (384,006,168 and 384,016,682 rows of 256, padded to whole
    blocks of 1024 rows) and each layer's value/key projections and gate vectors are parameters; a token
    activates the projections, gate vectors and the 24 rows of 256 it reads per layer."""
    flash, engram = presets.deepseek_v4_flash(), presets.deepseek_v4_flash_engram()
    z, w, d, r = 24, 256, flash.hidden_size, flash.hc_mult
    rows = [-(-n // 1024) * 1024 for n in (384_006_168, 384_016_682)]
    projections = 2 * (z * w * d + d + z * w * r * d + 3 * r * d)  # wv, bv, wk, bk, key and hidden norms
    (total, active), (base_total, base_active) = param_counts(engram), param_counts(flash)
    assert total - base_total == sum(rows) * w + projections
    assert active - base_active == projections + 2 * z * w
