"""`experiments.engram`'s runs without training: the compute match and the tokenizer's canonical map in use.

The activated-FLOPs difference between the Engram variant and the baseline is re-derived by hand from the config
fields (Engram's projections, biases, norms and conv against the MoE's shrunk experts); the canonical map is
checked against a plain-Python normal form of the ASCII tokens.
"""

import re
import string

import jax
import numpy as np
import pytest

from experiments import engram, train
from v4jax import data
from v4jax.data.canonical import canonical_ids_from_tokenizer, compressed_config, install_canonical
from v4jax.flops import train_flops_per_token
from v4jax.model import abstract_params
from v4jax.params import engram_table_params

SEQ_LEN = 128


@pytest.fixture(scope="module")
def setup():
    bundle = data.prepare(seq_len=SEQ_LEN, global_batch=8)
    variants = engram.build_variants(bundle.tokenizer, SEQ_LEN, seed=0, repeat=True)
    return bundle.tokenizer, {v.name.split(" (")[0]: v for v in variants}


def _engram_weights_by_hand(cfg) -> int:
    """Non-table weights of one Engram layer: Wv [Z,W,D] + bv [D], with the gate Wk [Z,W,R,D] + bk, key and
    hidden norms [R,D], with the short conv its norm [R,D] and kernel [K,R,D]."""
    z = (cfg.engram_max_ngram_size - 1) * cfg.engram_n_heads
    w, d, r = cfg.engram_head_dim, cfg.hidden_size, cfg.hc_mult
    n = z * w * d + d
    if cfg.engram_gate:
        n += z * w * r * d + 3 * r * d
    if cfg.engram_kernel_size:
        n += r * d + cfg.engram_kernel_size * r * d
    return n


def _moe_weights_per_unit(cfg) -> int:
    """Activated MoE weights per unit of moe_intermediate_size over the main model: every V4 layer is MoE, each
    token runs top-k routed + shared experts of 3 matrices D × I."""
    return cfg.num_hidden_layers * (cfg.num_experts_per_tok + cfg.n_shared_experts) * 3 * cfg.hidden_size


def test_engram_variant_matches_the_baseline_activated_compute(setup):
    _, runs = setup
    base, eng, nogate = runs["baseline"].cfg, runs["engram"].cfg, runs["engram, no gate"].cfg
    assert base.moe_intermediate_size == 36 and not base.engram_layer_ids
    assert eng.engram_layer_ids == (1,) and eng.engram_gate and not nogate.engram_gate
    assert nogate == eng.replace(engram_gate=False)  # the ablation changes nothing else
    assert runs["baseline, seed 1"].cfg == base

    per_unit = _moe_weights_per_unit(base)

    def extra_flops(size: int) -> float:  # 3 × 2 FLOPs per activated weight (forward + backward)
        return 6.0 * (_engram_weights_by_hand(eng) - per_unit * (base.moe_intermediate_size - size))

    size = eng.moe_intermediate_size
    # the chosen size is the best integer, and the count in the experiment equals the hand derivation
    assert abs(extra_flops(size)) <= min(abs(extra_flops(size - 1)), abs(extra_flops(size + 1)))
    measured = train_flops_per_token(eng, SEQ_LEN) - train_flops_per_token(base, SEQ_LEN)
    np.testing.assert_allclose(measured, extra_flops(size), rtol=0, atol=1e-6)
    base_flops = train_flops_per_token(base, SEQ_LEN)
    assert abs(extra_flops(size)) / base_flops < 0.01
    # the unmatched Engram model is well outside the tolerance, so the match is doing the work
    assert extra_flops(base.moe_intermediate_size) / base_flops > 0.05
    # the table is a lookup: present in the parameters, absent from the activated compute
    table = abstract_params(eng)["layers_1"]["engram"]["table"]
    assert engram_table_params(eng) == int(np.prod(table.shape)) > 0
    # without the gate: the same backbone, less the key projection and gate norms
    gate = 6.0 * (_engram_weights_by_hand(eng) - _engram_weights_by_hand(nogate))
    got = train_flops_per_token(eng, SEQ_LEN) - train_flops_per_token(nogate, SEQ_LEN)
    np.testing.assert_allclose(got, gate, rtol=0, atol=1e-6)


def _ascii_key(text: str) -> str:
    """The canonical normal form of a printable-ASCII token: lowercase, whitespace runs -> one space, a lone
    space kept, else spaces stripped; an empty result keys the token by its own text."""
    key = re.sub(r"[ \t\r\n]+", " ", text.lower())
    key = key if key == " " else key.strip(" ")
    return key or text


def test_engram_runs_use_the_tokenizers_canonical_map(setup, monkeypatch):
    tokenizer, runs = setup
    cfg, canonical = runs["engram"].cfg, runs["engram"].canonical
    vocab = tokenizer.vocab_size
    assert cfg.vocab_size == vocab and runs["baseline"].canonical is None
    v_c = cfg.engram_compressed_vocab_size
    assert 0 < v_c < vocab and cfg.engram_vocab == v_c
    assert canonical.shape == (vocab,) and canonical.dtype == np.int32
    assert canonical.min() == 0 and canonical.max() == v_c - 1 and len(np.unique(canonical)) == v_c
    np.testing.assert_array_equal(runs["engram, no gate"].canonical, canonical)

    # independent grouping of the printable-ASCII tokens: same key <=> same canonical id
    allowed = set(string.printable) - {"\x0b", "\x0c"}
    texts = {i: tokenizer.decode([i]) for i in range(vocab)}
    ascii_ids = [i for i, t in texts.items() if t and set(t) <= allowed]
    assert len(ascii_ids) > vocab // 2
    groups: dict[str, set[int]] = {}
    for i in ascii_ids:
        groups.setdefault(_ascii_key(texts[i]), set()).add(int(canonical[i]))
    assert all(len(ids) == 1 for ids in groups.values())  # one key -> one canonical id
    assert len({next(iter(ids)) for ids in groups.values()}) == len(groups)  # distinct keys -> distinct ids
    assert len(groups) < len(ascii_ids)  # some ASCII tokens do merge (" (" with "(", "Return" with "return")

    # the params get it in every Engram layer (zeros for the drawn weights: no model compile here)
    zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract_params(cfg))
    monkeypatch.setattr(train, "init_params", lambda c, key: zeros if c == cfg else None)
    params = train.initial_params(cfg, 0, canonical)
    leaf = np.asarray(params["layers_1"]["engram"]["canonical"])
    assert leaf.shape == (1, vocab)
    np.testing.assert_array_equal(leaf[0], canonical)


def test_canonical_helpers_reject_mismatches(setup):
    tokenizer, runs = setup
    cfg = runs["engram"].cfg
    ids, v_c = canonical_ids_from_tokenizer(tokenizer, cfg.vocab_size)
    assert compressed_config(cfg, tokenizer)[0] == cfg  # V' already the tokenizer's: unchanged
    with pytest.raises(ValueError, match="engram_compressed_vocab_size"):
        compressed_config(cfg.replace(engram_compressed_vocab_size=v_c - 1), tokenizer)
    assert compressed_config(runs["baseline"].cfg, tokenizer) == (runs["baseline"].cfg, None)
    with pytest.raises(ValueError, match="vocabularies differ"):
        install_canonical({"engram": {"canonical": np.zeros((1, 7), np.int32)}}, ids)
    with pytest.raises(ValueError, match="no 'canonical' leaf"):
        install_canonical({"embed": np.zeros((3, 2))}, ids)
