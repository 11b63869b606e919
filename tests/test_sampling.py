"""Inference: the caches continue the sequence exactly, greedy generation equals repeated full forwards and
transformers' `generate`, and bad requests fail before compiling.

For V3 (MLA), V3.2 (MLA + DSA indexer keys, top-k below the length) and V4 (sliding, CSA and HCA layers,
windows and compression rates far below the length) tiny float32 models: logits of the full forward ==
chunked prefill of a ragged batch == token-by-token decoding, within 1e-4 of the largest logit.
"""

import jax
import numpy as np
import pytest

from v4jax import cache_size, model, presets
from v4jax.sampling import decode_step, engine, extend, generate, new_cache, prefill, stream, tiered
from v4jax.sampling.speculative import speculative_generate

RTOL = 1e-4
PRESETS = ("tiny", "tiny_v32", "tiny_v4")
# Engram: its n-gram context and conv inputs are cached too ('tiny_v4_engram' cut to its first two layers:
# sliding attention with hash routing, then CSA with Engram; no MTP)
EQUIVALENCE_PRESETS = (*PRESETS, "tiny_v4_engram")
LENGTHS = (23, 9, 16)  # a ragged batch: each row at its own positions, no left padding


def _cfg(name):
    if name == "tiny_v4_engram":
        cfg = presets.get(name)
        return cfg.replace(num_hidden_layers=2, layer_types=cfg.layer_types[:2], num_nextn_predict_layers=0)
    return presets.get(name)


_PARAMS = {}


def _params(name):
    if name not in _PARAMS:
        _PARAMS[name] = model.init_params(_cfg(name), jax.random.key(1))
    return _PARAMS[name]


def _tokens(cfg, b, t, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, t)).astype(np.int32)


def _full_logits(cfg, params, tokens, lengths):
    """Each row's logits from one full forward of the batch [B, T, V], NaN past the row's length (the model is
    causal: the tokens after position t do not change its logits)."""
    out = np.array(model.forward(cfg, params, tokens))
    out[np.arange(tokens.shape[1])[None, :] >= np.asarray(lengths)[:, None]] = np.nan
    return out


def _assert_close(x, ref, what):
    scale = np.nanmax(np.abs(ref))
    err = np.nanmax(np.abs(x - ref)) / scale
    assert err <= RTOL, f"{what}: max |Δlogit| / max |logit| = {err:.2e} > {RTOL}"


@pytest.mark.parametrize("name", EQUIVALENCE_PRESETS)
def test_prefill_chunks_and_decode_steps_match_the_full_forward(name):
    cfg, params = _cfg(name), _params(name)
    lengths = np.asarray(LENGTHS, np.int32)
    tokens = _tokens(cfg, len(lengths), int(lengths.max()))
    full = _full_logits(cfg, params, tokens, lengths)

    # chunks of 5 over a ragged batch: rows end in different chunks, later chunks are partly padding
    cache, chunks = new_cache(cfg, len(lengths), 32), []
    for start in range(0, tokens.shape[1], 5):
        count = np.clip(lengths - start, 0, 5)
        logits, cache = extend(cfg, params, cache, tokens[:, start : start + 5], count)
        chunks.append(np.asarray(logits)[:, : min(5, tokens.shape[1] - start)])
    chunked = np.concatenate(chunks, axis=1)
    chunked[np.arange(tokens.shape[1])[None, :] >= lengths[:, None]] = np.nan
    _assert_close(chunked, full, "chunked prefill")
    np.testing.assert_array_equal(np.asarray(cache["length"]), lengths)

    # `prefill` returns each row's logits after its last prompt token (chunk 1: the decode step's program)
    last, _ = prefill(cfg, params, new_cache(cfg, len(lengths), 32), tokens, lengths, chunk=1)
    _assert_close(np.asarray(last), full[np.arange(len(lengths)), lengths - 1], "prefill last logits")

    # one token per step; rows that are done stay put (active False)
    cache, steps = new_cache(cfg, len(lengths), 32), []
    for t in range(tokens.shape[1]):
        logits, cache = decode_step(cfg, params, cache, tokens[:, t], active=t < lengths)
        steps.append(np.asarray(logits))
    decoded = np.stack(steps, axis=1)
    decoded[np.arange(tokens.shape[1])[None, :] >= lengths[:, None]] = np.nan
    _assert_close(decoded, full, "token-by-token decode")
    np.testing.assert_array_equal(np.asarray(cache["length"]), lengths)


@pytest.mark.parametrize("name", PRESETS)
def test_greedy_generation_is_the_argmax_of_repeated_full_forwards(name):
    cfg, params = _cfg(name), _params(name)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (13, 1, 6)]
    out = generate(cfg, params, prompts, 10, prefill_chunk=5)
    # the reference: full forwards of the growing sequences, zero-padded to one fixed length (the model is
    # causal, so the padding after a row's last token does not change its logits; one compilation)
    seqs, width = [list(p) for p in prompts], 13 + 10
    for _ in range(10):
        batch = np.asarray([s + [0] * (width - len(s)) for s in seqs], np.int32)
        logits = np.asarray(model.forward(cfg, params, batch))
        for i, s in enumerate(seqs):
            s.append(int(np.argmax(logits[i, len(s) - 1])))
    assert out == [s[len(p) :] for s, p in zip(seqs, prompts, strict=True)]


def test_stop_tokens_end_a_row_and_sampling_follows_the_key():
    cfg, params = _cfg("tiny"), _params("tiny")
    prompts = [[3, 4, 5], [7]]
    greedy = generate(cfg, params, prompts, 6)
    stop = greedy[0][2]
    stopped = generate(cfg, params, prompts, 6, stop_tokens=[stop])
    first = greedy[0].index(stop)
    assert stopped[0] == greedy[0][: first + 1]
    assert stopped[1] == (greedy[1][: greedy[1].index(stop) + 1] if stop in greedy[1] else greedy[1])
    a = generate(cfg, params, prompts, 6, temperature=1.0, key=jax.random.key(0))
    b = generate(cfg, params, prompts, 6, temperature=1.0, key=jax.random.key(0))
    c = generate(cfg, params, prompts, 6, temperature=1.0, key=jax.random.key(1))
    assert a == b and a != c
    assert generate(cfg, params, prompts, 6, temperature=0.7, key=jax.random.key(2), top_k=1) == greedy


def test_bad_requests_fail_before_compiling():
    cfg, params = _cfg("tiny"), _params("tiny")
    with pytest.raises(ValueError, match=r"prompt 1: token id 512 is outside the vocabulary \[0, 512\)"):
        generate(cfg, params, [[1, 2], [3, cfg.vocab_size]], 4)
    with pytest.raises(ValueError, match="prompt 0 must be a non-empty list"):
        generate(cfg, params, [[]], 4)
    limit = cfg.max_position_embeddings
    with pytest.raises(ValueError, match=f"exceeds ModelConfig.max_position_embeddings={limit}"):
        generate(cfg, params, [[1] * (limit - 3)], 4)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        generate(cfg, params, [[1]], 0)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        generate(cfg, params, [[1]], 4, temperature=0.5)
    with pytest.raises(ValueError, match="top_p must lie in"):
        generate(cfg, params, [[1]], 4, temperature=0.5, key=jax.random.key(0), top_p=1.5)
    with pytest.raises(ValueError, match=r"tokens must be \[batch=2, T\]"):
        extend(cfg, params, new_cache(cfg, 2, 8), np.zeros((3, 4), np.int32))


@pytest.mark.parametrize("name", ["tiny", "tiny_v32", "tiny_v4", "tiny_v4_engram"])
def test_cache_holds_what_kv_cache_bytes_per_token_counts(name):
    """The allocated cache equals the accounting of `v4jax.cache_size` (latents only, nothing per head)."""
    cfg = _cfg(name)
    s = 64  # a multiple of every compression rate
    held = sum(x.nbytes for x in jax.tree.leaves(engine.new_cache(cfg, 1, s)["layers"]))
    if cfg.is_v4:
        per_token, fixed = cache_size.v4_cache_bytes(cfg, cfg.dtype)
        assert held == per_token * s + fixed
    else:
        assert held == cache_size.kv_cache_bytes_per_token(cfg, cfg.dtype) * s


@pytest.mark.parametrize("name", ["tiny", "tiny_v4"])
def test_speculative_decoding_equals_plain_greedy(name):
    """MTP drafts, accepted and rejected, never change the greedy output.

    The shared output head is cut down to two live tokens with opposite columns (every other logit is 0),
    so both the main model and the random MTP module choose between two tokens and agree often enough to
    take both paths, across V4's window (8) and compression windows (4, 8): rejected drafts roll the
    caches back by one token.
    """
    cfg, params = _cfg(name), jax.tree.map(np.array, _params(name))
    head = params["head"]["kernel"]
    head[:, :] = 0.0
    head[:, 5] = np.random.default_rng(0).normal(size=head.shape[0])
    head[:, 17] = -head[:, 5]
    prompts = [[int(t) for t in np.random.default_rng(9).integers(0, cfg.vocab_size, n)] for n in (7, 2, 12)]
    plain = generate(cfg, params, prompts, 24, prefill_chunk=5)
    drafted, stats = speculative_generate(cfg, params, prompts, 24, prefill_chunk=5)
    assert drafted == plain
    assert 0 < stats["accepted"] < stats["drafted"], stats
    assert stats["steps"] < 24  # accepted drafts saved main-model passes


def test_stream_yields_what_generate_returns():
    cfg, params = _cfg("tiny"), _params("tiny")
    prompt, key = [3, 4, 5, 6], jax.random.key(4)
    for kwargs in ({}, {"temperature": 0.8, "key": key, "top_p": 0.9}):
        assert list(stream(cfg, params, prompt, 6, **kwargs)) == generate(cfg, params, [prompt], 6, **kwargs)[0]


@pytest.mark.parametrize("name, tier", [("tiny", "host"), ("tiny_v4", "disk")])
def test_tiered_cache_generates_the_same_tokens(name, tier, tmp_path):
    """Blocks older than the last 8 tokens move to pinned host memory or to disk; the same tokens as with
    every block on the device (the same steps: `stream` == `generate` is tested above).

    24 new tokens after prompts of 20, 11 and 28: several 8-token blocks (MLA latents, V4 entries at rates 4
    and 8) go cold while decoding, and every step reads them back."""
    cfg, params = _cfg(name), _params(name)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (20, 11, 28)]
    plain, on_device = tiered.generate_tiered(cfg, params, prompts, 24, tiered.Tiers(device_tokens=64), prefill_chunk=5)
    assert on_device["host"] == on_device["disk"] == 0
    unit = tiered.slot_granularity(cfg)
    capacity = -(-(28 + 24) // unit) * unit  # generate_tiered rounds up to a multiple of the compression rates
    total = sum(x.nbytes for x in jax.tree.leaves(new_cache(cfg, 3, capacity)))
    tiers = tiered.Tiers(device_tokens=8, block=8, spill_dir=str(tmp_path) if tier == "disk" else None)
    out, stats = tiered.generate_tiered(cfg, params, prompts, 24, tiers, prefill_chunk=5)
    assert out == plain
    assert stats[tier] > 0 and stats["device"] + stats[tier] == total == on_device["device"], stats
    if cfg.is_v4:
        with pytest.raises(ValueError, match="must be multiples of 8"):
            tiered.TieredCache(cfg, new_cache(cfg, 1, 64), 64, tiered.Tiers(block=6))


@pytest.mark.multi_device
def test_sharded_cache_decodes_like_one_device():
    """The cache split over 8 emulated devices (batch over data × fsdp) gives the one-device logits."""
    from v4jax import sharding

    cfg, params = _cfg("tiny"), _params("tiny")
    tokens = _tokens(cfg, 8, 6, seed=3)
    ref_cache = new_cache(cfg, 8, 16)
    ref, ref_cache = extend(cfg, params, ref_cache, tokens[:, :5])
    ref_next, _ = decode_step(cfg, params, ref_cache, tokens[:, 5])
    mesh = sharding.make_mesh(2, 4, 1, 1)
    cache = new_cache(cfg, 8, 16)
    cache = jax.device_put(cache, engine.cache_shardings(cache, mesh, "fsdp"))
    placed = model.shard_params(cfg, params, mesh, "fsdp")
    logits, cache = extend(cfg, placed, cache, tokens[:, :5])
    assert not cache["layers"][model.unstacked_name(1)]["c_kv"].sharding.is_fully_replicated
    nxt, _ = decode_step(cfg, placed, cache, tokens[:, 5])
    _assert_close(np.asarray(logits), np.asarray(ref), "sharded prefill")
    _assert_close(np.asarray(nxt), np.asarray(ref_next), "sharded decode step")
