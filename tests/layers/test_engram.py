"""Engram: the n-gram hash (JAX uint32 limbs vs a Python-integer int64 re-derivation and the numpy host
version), the hash plan against DeepSeek V4.1's published table sizes, the module against a float64 NumPy
oracle, table gradients, decode equivalence with a carried state, tokenizer compression and config checks."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from v4jax import data, presets
from v4jax import sharding as shd
from v4jax.config import ModelConfig, validate_parallelism
from v4jax.data.canonical import canonical_ids, canonical_ids_from_tokenizer
from v4jax.layers import engram as eng
from v4jax.layers.engram import Engram, EngramState

B, T = 2, 11
# Distinct sizes everywhere: Z = 2 orders × 2 heads = 4, W = 6, D = 20, N = 3 (conv dilation 3), kernel 4
# (taps reach 9 tokens back, beyond T's start for most positions).
BASE = presets.tiny().replace(
    hidden_size=20,
    engram_layer_ids=(2, 1),
    engram_max_ngram_size=3,
    engram_n_heads=2,
    engram_head_dim=6,
    engram_vocab_size=(31, 50),
    engram_kernel_size=4,
    engram_seed=5,
)
R4 = BASE.replace(residual_mode="mhc", hc_mult=4)
VARIANTS = {
    "r4_gate_conv": R4,
    "r4_gate_noconv": R4.replace(engram_kernel_size=0),
    "r4_nogate_conv": R4.replace(engram_gate=False),
    "r1_gate_conv": BASE,
}
V41 = presets.deepseek_v4_flash_engram()  # V4-Flash with DeepSeek-V4.1-Flash's Engram fields


def rel_err(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30))


# ---------------------------------------------------------------- independent hash re-derivation
def td_prime(n: int) -> bool:
    """Trial division."""
    return n > 1 and bool(np.all(n % np.arange(2, math.isqrt(n) + 1)))


def ref_tables(cfg):
    """{layer: (multipliers [N] as Python ints, primes [(N-1)·K] order-major)} from the §9.2 rules."""
    n, k, vocab = cfg.engram_max_ngram_size, cfg.engram_n_heads, cfg.engram_compressed_vocab_size or cfg.vocab_size
    bound = ((2**63 - 1) // vocab) // 2
    used, out = set(), {}
    for layer in cfg.engram_layer_ids:
        draws = np.random.default_rng(cfg.engram_seed + 10007 * layer).integers(0, bound, n, dtype=np.int64)
        primes = []
        for base in cfg.engram_vocab_size:
            p = base - 1
            for _ in range(k):
                p += 1
                while not td_prime(p) or p in used:
                    p += 1
                used.add(p)
                primes.append(p)
        out[layer] = ([2 * int(r) + 1 for r in draws], primes)
    return out


def ref_hash(cfg, layer, ids, prev, pad):
    """Row ids with Python integers: int64 wrap of every product, XOR, floor mod, offsets."""
    mult, primes = ref_tables(cfg)[layer]
    n, k = cfg.engram_max_ngram_size, cfg.engram_n_heads
    offsets = np.concatenate([[0], np.cumsum(primes)[:-1]])
    wrap = lambda v: (v + 2**63) % 2**64 - 2**63  # noqa: E731
    out = np.zeros((*ids.shape, len(primes)), np.int64)
    for b in range(ids.shape[0]):
        seq = [pad] * (n - 1) if prev is None else [int(v) for v in prev[b]]
        seq += [int(v) for v in ids[b]]
        for t in range(ids.shape[1]):
            mix = wrap(seq[n - 1 + t] * mult[0])
            for order in range(2, n + 1):
                mix ^= wrap(seq[n - 1 + t - (order - 1)] * mult[order - 1])
                for j in range(k):
                    z = (order - 2) * k + j
                    out[b, t, z] = mix % primes[z] + offsets[z]
    return out


@functools.partial(jax.jit, static_argnums=(0, 1))
def jax_hash(cfg, layer, ids, prev):
    return eng.ngram_hash_ids(cfg, layer, ids, prev)


def test_plan_reproduces_v41_table_sizes_and_rules():
    # DeepSeek V4.1-Flash config: Engram tables of layers 1 and 14 have 384,006,168 and 384,016,682 rows.
    plan = eng.hash_plan(V41)
    assert {i: p.rows for i, p in plan.layers.items()} == {1: 384_006_168, 14: 384_016_682}
    ref = ref_tables(V41)
    everything = []
    for layer, p in plan.layers.items():
        mult, primes = ref[layer]
        assert p.multipliers.tolist() == mult and all(m % 2 == 1 for m in mult)
        assert p.primes.reshape(-1).tolist() == primes
        assert np.array_equal(p.offsets, np.concatenate([[0], np.cumsum(primes)[:-1]]))
        assert p.table_rows % eng.ENGRAM_ROW_ALIGN == 0 and 0 <= p.table_rows - p.rows < eng.ENGRAM_ROW_ALIGN
        everything += primes
    assert len(set(everything)) == len(everything) == 48
    assert all(td_prime(q) for q in everything) and min(everything) >= 16_000_000


@pytest.mark.parametrize("vocab", [129280, 99092])
def test_jax_hash_is_bit_exact_with_int64(vocab):
    cfg = V41.replace(engram_compressed_vocab_size=vocab)
    rng = np.random.default_rng(vocab)
    ids = rng.integers(0, vocab, (2, 9)).astype(np.int32)
    ids[0, :3] = vocab - 1
    prev = rng.integers(0, vocab, (2, 3)).astype(np.int32)
    plan = eng.hash_plan(cfg)
    for layer in cfg.engram_layer_ids:
        want = ref_hash(cfg, layer, ids, prev, None)
        got = np.asarray(jax_hash(cfg, layer, jnp.asarray(ids), jnp.asarray(prev)))
        assert got.dtype == np.int32 and np.array_equal(got, want)
        assert np.array_equal(eng.ngram_hash_ids_np(cfg, layer, ids, prev), want)
        lo = plan.layers[layer].offsets
        hi = lo + plan.layers[layer].primes.reshape(-1)
        assert np.all((got >= lo) & (got < hi))


def test_jax_hash_wraps_like_int64_outside_the_vocabulary():
    # Small V' gives multipliers near 2^53; ids far outside [0, V') make the int64 products wrap and the
    # XOR negative, where numpy's `%` is a floor mod.
    cfg = BASE
    rng = np.random.default_rng(1)
    ids = rng.integers(-(2**31), 2**31, (2, 9), dtype=np.int64).astype(np.int32)
    ids[1, :4] = [-1, 2**31 - 1, -(2**31), 0]
    prev = np.array([[5, -7], [2**30, 3]], np.int32)
    for layer in cfg.engram_layer_ids:
        want = ref_hash(cfg, layer, ids, prev, None)
        assert np.array_equal(np.asarray(jax_hash(cfg, layer, jnp.asarray(ids), jnp.asarray(prev))), want)
        assert np.array_equal(eng.ngram_hash_ids_np(cfg, layer, ids, prev), want)


def test_hash_context_and_positions():
    cfg = BASE
    rng = np.random.default_rng(2)
    ids = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    full = eng.ngram_hash_ids_np(cfg, 1, ids)
    assert np.array_equal(full, ref_hash(cfg, 1, ids, None, cfg.engram_pad_id))
    # the last N-1 ids carried as context give the same ids for the rest
    part = eng.ngram_hash_ids_np(cfg, 1, ids[:, 4:], previous=ids[:, 2:4])
    assert np.array_equal(part, full[:, 4:])
    # positions restarting at 0 (a second document) read pad before the document start
    positions = np.concatenate([np.arange(4), np.arange(T - 4)])[None].repeat(B, 0)
    packed = np.asarray(eng.ngram_hash_ids(cfg, 1, jnp.asarray(ids), positions=jnp.asarray(positions)))
    assert np.array_equal(packed[:, 4:], eng.ngram_hash_ids_np(cfg, 1, ids[:, 4:]))
    assert np.array_equal(packed[:, :4], full[:, :4])


# ---------------------------------------------------------------- module vs float64 oracle
def random_variables(cfg, layer, seed):
    """Engram variables with every param random (far from init), float32."""
    streams = jnp.zeros((B, T, eng.num_streams(cfg), cfg.hidden_size))
    rows = jnp.zeros((B, T, cfg.engram_num_hash_heads, cfg.engram_head_dim))
    variables = nn.unbox(Engram(cfg, layer).init(jax.random.key(0), streams, rows))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key if path[-1].key != "kernel" else path[-2].key
        if name in ("key_norm", "hidden_norm", "conv_norm"):
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        scale = {"table": 1.0, "wv": 0.2, "wk": 0.2, "conv": 0.5}.get(name, 0.5)
        return (scale * rng.standard_normal(leaf.shape)).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(draw, variables["params"])
    return {"params": params, "constants": variables["constants"]}


def oracle(cfg, p, streams, rows):
    """float64 re-derivation, stream by stream as in the demo (conv on R·D channels, stream-major)."""
    x, e = np.asarray(streams, np.float64), np.asarray(rows, np.float64)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    b, t, r, d = x.shape
    eps, n, kernel = cfg.rms_norm_eps, cfg.engram_max_ngram_size, cfg.engram_kernel_size
    flat = e.reshape(b, t, -1)  # concat of the Z head rows

    def rms(a, scale):
        return a / np.sqrt(np.mean(a * a, -1, keepdims=True) + eps) * scale

    value = flat @ p["wv"]["kernel"].reshape(-1, d) + p["bv"]
    if cfg.engram_gate:
        gates = []
        for s in range(r):
            key = flat @ p["wk"]["kernel"][:, :, s, :].reshape(-1, d) + p["bk"][s]
            dot = np.sum(rms(key, p["key_norm"][s]) * rms(x[:, :, s], p["hidden_norm"][s]), -1) / math.sqrt(d)
            dot = np.sign(dot) * np.sqrt(np.maximum(np.abs(dot), 1e-6))
            gates.append(1 / (1 + np.exp(-dot)))
        g = np.stack(gates, 2)[..., None] * value[:, :, None, :]
    else:
        g = np.repeat(value[:, :, None, :], r, axis=2)
    if not kernel:
        return g
    u = np.concatenate([rms(g[:, :, s], p["conv_norm"][s]) for s in range(r)], -1)  # [B, T, R·D]
    w = p["conv"].reshape(kernel, r * d)
    y = np.zeros_like(u)
    for tt in range(t):
        for j in range(kernel):
            src = tt - (kernel - 1 - j) * n
            if src >= 0:
                y[:, tt] += w[j] * u[:, src]
    y = y / (1 + np.exp(-y))
    return g + y.reshape(b, t, r, d)


@functools.partial(jax.jit, static_argnums=(0, 1))
def apply_call(cfg, layer, variables, streams, rows, state, count, positions):
    return Engram(cfg, layer).apply(variables, streams, rows, state, count, positions)


@functools.partial(jax.jit, static_argnums=(0, 1))
def apply_forward(cfg, layer, variables, streams, tokens, state, count, positions):
    return Engram(cfg, layer).apply(variables, streams, tokens, state, count, positions, method=Engram.forward)


def inputs(cfg, seed, t=T):
    rng = np.random.default_rng(seed)
    streams = rng.standard_normal((B, t, eng.num_streams(cfg), cfg.hidden_size)).astype(np.float32)
    rows = rng.standard_normal((B, t, cfg.engram_num_hash_heads, cfg.engram_head_dim)).astype(np.float32)
    tokens = rng.integers(0, cfg.vocab_size, (B, t)).astype(np.int32)
    return streams, rows, tokens


@pytest.mark.parametrize("variant", VARIANTS)
def test_module_matches_float64_oracle(variant):
    cfg = VARIANTS[variant]
    variables = random_variables(cfg, 1, seed=3)
    streams, rows, _ = inputs(cfg, 4)
    out, state = apply_call(cfg, 1, variables, streams, rows, None, None, None)
    want = oracle(cfg, variables["params"], streams, rows)
    assert out.shape == (B, T, eng.num_streams(cfg), cfg.hidden_size) and out.dtype == jnp.float32
    assert rel_err(out, want) <= 1e-5
    assert state.shape == (B, cfg.engram_conv_context, eng.num_streams(cfg), cfg.hidden_size)
    params = variables["params"]
    assert ("wk" in params) == cfg.engram_gate and ("conv" in params) == bool(cfg.engram_kernel_size)
    assert params["table"].shape == (eng.hash_plan(cfg).layers[1].table_rows, cfg.engram_head_dim)


def test_forward_reads_hashed_rows():
    cfg = R4
    variables = random_variables(cfg, 2, seed=5)
    streams, _, tokens = inputs(cfg, 6)
    out, _ = apply_forward(cfg, 2, variables, streams, tokens, None, None, None)
    ids = ref_hash(cfg, 2, tokens, None, cfg.engram_pad_id)  # identity canonical map
    rows = np.asarray(variables["params"]["table"])[ids]
    assert rel_err(out, oracle(cfg, variables["params"], streams, rows)) <= 1e-5


def test_table_gradient_reaches_exactly_the_looked_up_rows():
    cfg = R4
    variables = random_variables(cfg, 1, seed=7)
    streams, _, tokens = inputs(cfg, 8)
    cot = np.random.default_rng(9).standard_normal(streams.shape).astype(np.float32)

    def loss(params):
        v = {"params": params, "constants": variables["constants"]}
        out, _ = Engram(cfg, 1).apply(v, streams, tokens, method=Engram.forward)
        return jnp.sum(out * cot)

    grad = np.asarray(jax.jit(jax.grad(loss))(variables["params"])["table"])
    looked_up = np.zeros(grad.shape[0], bool)
    looked_up[ref_hash(cfg, 1, tokens, None, cfg.engram_pad_id).reshape(-1)] = True
    touched = np.any(grad != 0, axis=1)
    assert np.array_equal(touched, looked_up)


def test_signed_sqrt_floor_keeps_gradients_finite_at_zero():
    """A zero stream makes the gate logit exactly 0: α = 1/2, and the 1e-6 floor keeps d ssqrt finite."""
    cfg = R4.replace(engram_kernel_size=0)
    variables = random_variables(cfg, 1, seed=17)
    streams, rows, _ = inputs(cfg, 18)
    streams[:, :, 1] = 0.0

    def loss(params, x):
        out, _ = Engram(cfg, 1).apply({"params": params}, x, rows)
        return jnp.sum(out), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(variables["params"], streams)
    value = rows.reshape(B, T, -1) @ np.asarray(variables["params"]["wv"]["kernel"]).reshape(-1, cfg.hidden_size)
    value += np.asarray(variables["params"]["bv"])
    assert rel_err(out[:, :, 1], 0.5 * value) <= 1e-5
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


# ---------------------------------------------------------------- decode
@pytest.mark.parametrize("chunk", [1, 3])
def test_decode_with_carried_state_matches_full_sequence(chunk):
    """Feed the sequence in chunks of `chunk` slots with a ragged number of real tokens per row (0..chunk,
    the rest garbage), carrying the state; every real token's update equals the full-sequence one."""
    cfg = R4
    variables = random_variables(cfg, 2, seed=10)
    streams, _, tokens = inputs(cfg, 11)
    full, _ = apply_forward(cfg, 2, variables, streams, tokens, None, None, None)
    full = np.asarray(full)
    rng = np.random.default_rng(chunk)
    state = eng.empty_engram_state(cfg, B)
    done = np.zeros(B, int)
    got = np.full_like(full, np.nan)
    while (done < T).any():
        count = np.minimum(rng.integers(0 if chunk > 1 else 1, chunk + 1, B), T - done)
        x = rng.standard_normal((B, chunk, *streams.shape[2:])).astype(np.float32)
        tok = rng.integers(0, cfg.vocab_size, (B, chunk)).astype(np.int32)
        for b in range(B):
            x[b, : count[b]] = streams[b, done[b] : done[b] + count[b]]
            tok[b, : count[b]] = tokens[b, done[b] : done[b] + count[b]]
        positions = done[:, None] + np.arange(chunk)
        out, state = apply_forward(cfg, 2, variables, x, tok, state, count.astype(np.int32), positions)
        for b in range(B):
            got[b, done[b] : done[b] + count[b]] = np.asarray(out[b, : count[b]])
        done += count
    assert isinstance(state, EngramState)
    assert rel_err(got, full) <= 1e-5
    np.testing.assert_array_equal(np.asarray(state.context), tokens[:, T - 2 :])


def test_positions_restart_documents():
    """A packed row (document 2 starts at position 0 mid-row) equals document 2 run alone."""
    cfg = R4
    variables = random_variables(cfg, 1, seed=12)
    streams, _, tokens = inputs(cfg, 13)
    start = 4
    positions = np.concatenate([np.arange(start), np.arange(T - start)])[None].repeat(B, 0)
    packed, _ = apply_forward(cfg, 1, variables, streams, tokens, None, None, positions)
    alone_x = np.concatenate([streams[:, start:], streams[:, :start]], 1)  # doc 2 first, then junk
    alone_t = np.concatenate([tokens[:, start:], tokens[:, :start]], 1)
    alone, _ = apply_forward(cfg, 1, variables, alone_x, alone_t, None, None, None)
    assert rel_err(np.asarray(packed)[:, start:], np.asarray(alone)[:, : T - start]) <= 1e-6


def test_canonical_map_applies_before_hashing():
    cfg = R4.replace(engram_compressed_vocab_size=7)
    variables = random_variables(cfg, 1, seed=14)
    canonical = np.random.default_rng(15).integers(0, 7, cfg.vocab_size).astype(np.int32)
    variables["constants"] = {"canonical": jnp.asarray(canonical)}
    _, _, tokens = inputs(cfg, 16)
    ids = Engram(cfg, 1).apply(variables, jnp.asarray(tokens), method=Engram.hash_ids)
    want = ref_hash(cfg, 1, canonical[tokens], None, int(canonical[cfg.engram_pad_id]))
    assert np.array_equal(np.asarray(ids), want)
    with pytest.raises(ValueError, match="canonical-id map"):
        Engram(cfg, 1).apply({"params": variables["params"]}, jnp.asarray(tokens), method=Engram.hash_ids)


def test_table_sharding_rules():
    cfg = R4
    specs = nn.get_partition_spec(
        jax.eval_shape(
            lambda: Engram(cfg, 1).init(
                jax.random.key(0),
                jnp.zeros((B, T, 4, cfg.hidden_size)),
                jnp.zeros((B, T, cfg.engram_num_hash_heads, cfg.engram_head_dim)),
            )
        )
    )
    assert tuple(specs["params"]["table"]) == (shd.ENGRAM_ROWS, None)
    rows = eng.hash_plan(cfg).layers[1].table_rows
    for preset in shd.RULES:
        spec = shd.logical_to_spec((shd.ENGRAM_ROWS, None), shd.rules(preset))
        axes = (spec[0],) if isinstance(spec[0], str) else tuple(spec[0] or ())
        assert axes and rows % 2 ** len(axes) == 0, preset
        validate_parallelism(cfg.replace(hidden_size=32), {"fsdp": 4, "expert": 2, "tensor": 2}, shd.RULES[preset])


# ---------------------------------------------------------------- tokenizer compression
def test_canonical_ids_follow_the_normalisation_rules():
    # (decoded text, raw token, expected canonical id) written from the rules by hand
    vocab = [
        ("Hello", "Hello", 0),
        ("hello", "hello", 0),
        (" hello", "Ġhello", 0),  # strip
        ("HÉLLO", "HÉLLO", 0),  # accents dropped, lowercase
        ("  ", "ĠĠ", 1),  # whitespace run -> one space, a lone space survives the strip
        (" ", "Ġ", 1),
        ("\t", "ĉ", 1),
        ("\u00a0", "Âł", 1),  # NFKC: no-break space -> space
        ("a\n\nb", "a", 2),  # runs of \n collapse
        ("a b", "a", 2),
        ("\ufffd", "Ã", 3),  # U+FFFD: keyed by the raw token
        ("\ufffd", "Ä", 4),
        ("ﬁ", "ﬁ", 5),  # NFKC ligature
        ("Fi", "Fi", 5),
        ("", "", 6),  # empty normal form: keyed by the text
        ("\u0301", "x", 7),  # a lone combining mark: empty normal form, keyed by itself
        ("\u0300", "y", 8),
        ("Straße", "S", 9),  # ß is not folded
        ("STRASSE", "S", 10),
        ("e\u0301", "e", 11),
        ("É", "E", 11),
        (" x\t", "x", 12),
        ("Ã", "Ã", 13),  # as text it is normalised: A + tilde -> "a", a new key
    ]
    texts = [v[0] for v in vocab]
    raws = [v[1] for v in vocab]
    ids, n = canonical_ids(texts, raws)
    assert ids.dtype == np.int32 and n == 14
    assert ids.tolist() == [v[2] for v in vocab]
    # without raw tokens, U+FFFD texts are keyed by themselves (the two identical texts merge)
    ids2, n2 = canonical_ids(texts)
    assert ids2[10] == ids2[11] and n2 == 13


def test_canonical_ids_of_a_byte_level_tokenizer(tmp_path):
    docs = [data.Document(f"d{i}", "Hello hello HELLO Ünïcode ünïcode\tdata  data\n" * 3) for i in range(4)]
    tok = data.train_bpe(docs, 300, tmp_path)
    ids, n = canonical_ids_from_tokenizer(tok)
    assert ids.shape == (tok.vocab_size,) and n < tok.vocab_size
    assert np.all(ids[1:] <= np.arange(1, tok.vocab_size)) and ids.max() == n - 1
    one = {tok.decode([i]): i for i in range(tok.vocab_size)}
    assert ids[one["A"]] == ids[one["a"]] and ids[one[" "]] == ids[one["\t"]] == ids[one["\n"]]
    lead = [i for i in range(tok.vocab_size) if tok.decode([i]) == "\ufffd"]  # partial UTF-8 bytes
    assert len(lead) > 100 and len(set(ids[lead].tolist())) == len(lead)
    bigger, n_big = canonical_ids_from_tokenizer(tok, vocab_size=tok.vocab_size + 3)
    assert np.array_equal(bigger[: tok.vocab_size], ids) and n_big <= n + 1


# ---------------------------------------------------------------- config
def test_config_round_trip_and_derived_sizes():
    cfg = V41
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg and isinstance(again.engram_layer_ids, tuple) and isinstance(again.engram_vocab_size, tuple)
    assert cfg.engram_num_hash_heads == 24 and cfg.engram_dim == 6144 and cfg.engram_vocab == 99092
    assert R4.engram_conv_context == 9 and R4.replace(engram_kernel_size=0).engram_conv_context == 0
    assert BASE.replace(engram_compressed_vocab_size=0).engram_vocab == BASE.vocab_size


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"engram_layer_ids": (3,)}, "engram_layer_ids"),
        ({"engram_layer_ids": (1, 1)}, "engram_layer_ids"),
        ({"engram_layer_ids": (-1,)}, "engram_layer_ids"),
        ({"engram_vocab_size": (31,)}, "engram_vocab_size"),
        ({"engram_vocab_size": (31, 1)}, "engram_vocab_size"),
        ({"engram_max_ngram_size": 1, "engram_vocab_size": ()}, "engram_max_ngram_size"),
        ({"engram_n_heads": 0}, "engram_n_heads"),
        ({"engram_head_dim": 0}, "engram_head_dim"),
        ({"engram_compressed_vocab_size": 513}, "engram_compressed_vocab_size"),
        ({"engram_pad_id": 512}, "engram_pad_id"),
        ({"engram_kernel_size": -1}, "engram_kernel_size"),
        ({"engram_seed": -1}, "engram_seed"),
        ({"engram_vocab_size": (2**30, 2**30)}, "engram_vocab_size"),
    ],
)
def test_config_validation_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        BASE.replace(**changes)


def test_table_size_limit():
    cfg = BASE.replace(engram_vocab_size=(2**31 - 2000, 1000), engram_n_heads=1)  # valid sum, padded rows > int32
    with pytest.raises(ValueError, match="engram_vocab_size"):
        eng.hash_plan(cfg)
