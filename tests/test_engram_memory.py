"""Engram tables outside the device params (`v4jax.engram_memory`): host-gathered rows give the logits of the
device-resident table, the row gradient summed per row id is the table gradient, the row optimizer against
float64 NumPy, a host-table training step that changes exactly the looked-up rows, memory-mapped tables, clear
errors, and the device table split along rows on the 8-device mesh.

One config keeps compilation short: `tiny_v4_engram` cut to two sliding-attention layers (hash MoE, then the
Engram layer 1 with a learned MoE), no MTP module.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from v4jax import engram_memory as em
from v4jax import model, presets, sharding
from v4jax.layers.engram import layer_plan
from v4jax.model import Transformer, split_collections
from v4jax.train import TrainConfig, Trainer

CFG = presets.tiny_v4_engram().replace(
    num_hidden_layers=2, layer_types=("sliding_attention", "sliding_attention"), num_nextn_predict_layers=0
)
TABLE = ("layers_1", "engram", "table")
B, T = 4, 16


@functools.cache
def _params():
    return model.init_params(CFG, jax.random.key(0))


def _tokens(seed=1, shape=(B, T)):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, shape).astype(np.int32)


def _packed_positions():
    """Row b restarts a document at position 3 + b (Engram reads pad before a document start)."""
    return np.stack([np.concatenate([np.arange(3 + b), np.arange(T - 3 - b)]) for b in range(B)]).astype(np.int32)


def _rel(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30))


def _dense_grad(ids, grads, rows):
    """float64 ∂L/∂table [rows, W] from per-occurrence row gradients (np.add.at: every occurrence once)."""
    out = np.zeros((rows, grads.shape[-1]))
    np.add.at(out, np.asarray(ids).reshape(-1), np.asarray(grads, np.float64).reshape(-1, grads.shape[-1]))
    return out


# ----------------------------------------------------------------- logits and gradients
@jax.jit
def _device_logits_and_table_grad(params, tokens, positions, cot):
    collections = split_collections(params)

    def loss(trainable):
        variables = {"params": trainable, "constants": collections["constants"]}
        logits = Transformer(CFG).apply(variables, tokens, positions, with_mtp=False)[0]
        return jnp.sum(logits * cot), logits

    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(collections["params"])
    return logits, grads["layers_1"]["engram"]["table"][0]


@jax.jit
def _host_logits_and_row_grad(params, tokens, positions, cot, rows):
    collections = split_collections(params)

    def loss(rows):
        logits = Transformer(CFG).apply(collections, tokens, positions, with_mtp=False, engram_rows=rows)[0]
        return jnp.sum(logits * cot), logits

    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(rows)
    return logits, grads


@pytest.mark.parametrize("packed", [False, True])
def test_host_rows_give_device_logits_and_table_gradient(packed):
    params = _params()
    tables, without = em.HostTables.from_params(CFG, params)
    assert em.has_tables(CFG, without) == [] and em.has_tables(CFG, params) == [1]
    tokens = _tokens()
    positions = _packed_positions() if packed else np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    cot = np.random.default_rng(2).standard_normal((B, T, CFG.vocab_size)).astype(np.float32)
    ref_logits, ref_grad = _device_logits_and_table_grad(params, tokens, positions, cot)
    fetched = tables.prefetch(tokens, positions if packed else None)
    assert fetched.ids["1"].shape == (B, T, CFG.engram_num_hash_heads) and fetched.ids["1"].dtype == np.int32
    logits, row_grads = _host_logits_and_row_grad(without, tokens, positions, cot, fetched.rows)
    assert _rel(logits, ref_logits) <= 1e-6
    # the summed row gradient is the table gradient: on the looked-up rows, and zero elsewhere
    unique, summed = em.scatter_row_grads(fetched.ids["1"], np.asarray(row_grads["1"]))
    rows = layer_plan(CFG, 1).table_rows
    dense = np.zeros((rows, CFG.engram_head_dim))
    dense[unique] = summed
    ref_grad = np.asarray(ref_grad)
    assert _rel(dense, ref_grad) <= 1e-5
    np.testing.assert_allclose(dense, _dense_grad(fetched.ids["1"], np.asarray(row_grads["1"]), rows), rtol=1e-5,
                               atol=1e-6 * np.abs(ref_grad).max())  # fmt: skip
    assert np.array_equal(np.any(ref_grad != 0, axis=1), np.isin(np.arange(rows), unique))


# ----------------------------------------------------------------- the row optimizer
@pytest.mark.parametrize("kind", ["sgd", "rowwise_adagrad"])
def test_row_update_matches_float64_formula(kind):
    """Two updates from synthetic row gradients with repeated ids, against the formula in float64."""
    rows, w = layer_plan(CFG, 1).table_rows, CFG.engram_head_dim
    rng = np.random.default_rng(3)
    table = rng.standard_normal((rows, w)).astype(np.float32)
    opt = em.RowOptimizer(kind=kind, learning_rate=0.1, eps=1e-8, initial_accumulator=0.5)
    tables = em.HostTables(CFG, {1: table}, {1: np.arange(CFG.vocab_size)}, opt)
    expect, acc = table.astype(np.float64), np.full(rows, 0.5)
    for step in range(2):
        ids = rng.integers(0, 50, (B, T, CFG.engram_num_hash_heads)).astype(np.int32)  # many repeats
        grads = rng.standard_normal((*ids.shape, w)).astype(np.float32)
        assert tables.apply_gradients({"1": ids}, {"1": grads}, learning_rate=0.1 if step else None)
        g = _dense_grad(ids, grads, rows)
        hit = np.isin(np.arange(rows), ids)
        if kind == "sgd":
            expect[hit] -= 0.1 * g[hit]
        else:
            acc[hit] += np.mean(g[hit] ** 2, axis=-1)
            expect[hit] -= 0.1 * g[hit] / (np.sqrt(acc[hit])[:, None] + 1e-8)
        assert _rel(tables.tables[1], expect) <= 1e-6
        if kind == "rowwise_adagrad":
            np.testing.assert_allclose(tables.accumulators[1], acc, rtol=1e-5)
    assert tables.steps == 2
    # a non-finite gradient changes nothing
    before = tables.tables[1].copy()
    assert not tables.apply_gradients({"1": ids}, {"1": np.full_like(grads, np.nan)})
    assert np.array_equal(tables.tables[1], before) and tables.steps == 2


# ----------------------------------------------------------------- training
@functools.cache
def _host_trainer():
    tcfg = TrainConfig(learning_rate=1e-2, schedule="constant", warmup_steps=0, total_steps=50)
    return Trainer(CFG, tcfg, sharding.make_mesh(1, 1, 1, 1, devices=jax.devices()[:1]), engram_tables="host")


def test_host_table_training_step_changes_exactly_the_looked_up_rows():
    trainer = _host_trainer()
    tables, without = em.HostTables.from_params(CFG, _params(), em.RowOptimizer(learning_rate=0.05))
    start = jax.tree.map(np.array, without)
    state = trainer.init(params=without)
    batch = _tokens(seed=4, shape=(B, T + 1))
    fetched = tables.prefetch(batch[:, :-1], sharding=trainer.engram_rows_sharding)
    held_out = trainer.evaluate(state["params"], batch, fetched.rows)
    before = tables.tables[1].copy()
    state, metrics, row_grads = trainer.step_with_rows(state, batch, fetched.rows)
    assert bool(metrics["finite"]) and float(metrics["learning_rate"]) > 0
    assert float(metrics["engram_row_grad_norm"]) > 0
    np.testing.assert_allclose(float(held_out["ce"]), float(metrics["ce"]), rtol=1e-6)  # same params, same rows
    assert tables.apply_gradients(fetched.ids, row_grads)
    changed = np.any(tables.tables[1] != before, axis=1)
    looked_up = np.isin(np.arange(before.shape[0]), fetched.ids["1"])
    assert np.array_equal(changed, looked_up) and looked_up.sum() > 100
    # row-wise Adagrad's first step moves each looked-up row by lr · G_r / sqrt(mean G_r²)
    g = _dense_grad(fetched.ids["1"], np.asarray(row_grads["1"]), before.shape[0])[looked_up]
    step = 0.05 * g / (np.sqrt(np.mean(g**2, axis=-1, keepdims=True)) + 1e-8)
    assert _rel(before[looked_up] - tables.tables[1][looked_up], step) <= 1e-5
    # the device params trained too, and the state never held a table
    flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, state["params"]))
    assert TABLE not in flat
    old = traverse_util.flatten_dict(start)
    assert not np.array_equal(flat[("layers_1", "engram", "wv", "kernel")], old[("layers_1", "engram", "wv", "kernel")])


def test_memory_mapped_tables_and_round_trip(tmp_path):
    params = _params()
    in_ram, without = em.HostTables.from_params(CFG, params)
    mapped, _ = em.HostTables.from_params(CFG, params, em.RowOptimizer(kind="sgd", learning_rate=1.0), tmp_path)
    assert isinstance(mapped.tables[1], np.memmap) and mapped.nbytes == in_ram.nbytes
    tokens = _tokens(seed=5)
    a, b = in_ram.prefetch(tokens), mapped.prefetch(tokens)
    assert np.array_equal(a.ids["1"], b.ids["1"])
    assert np.array_equal(np.asarray(a.rows["1"]), np.asarray(b.rows["1"]))
    assert np.array_equal(np.asarray(a.rows["1"]), np.asarray(params["layers_1"]["engram"]["table"][0])[a.ids["1"]])
    back = traverse_util.flatten_dict(mapped.to_params(without))
    assert np.array_equal(back[TABLE], np.asarray(params["layers_1"]["engram"]["table"]))
    grads = np.ones((B, T, CFG.engram_num_hash_heads, CFG.engram_head_dim), np.float32)
    mapped.apply_gradients(b.ids, {"1": grads})
    mapped.tables[1].flush()
    on_disk = np.load(mapped.tables[1].filename, mmap_mode="r")
    row = int(b.ids["1"][0, 0, 0])
    count = int(np.sum(b.ids["1"] == row))
    np.testing.assert_allclose(on_disk[row], np.asarray(params["layers_1"]["engram"]["table"][0, row]) - count)


def test_pinned_host_tables_match_numpy_tables():
    """Tables in the JAX memory kind pinned_host: the same rows gathered into device memory and the same row
    update (a scatter into the donated table, which stays in pinned_host memory) as NumPy tables."""
    params, opt = _params(), em.RowOptimizer(kind="rowwise_adagrad", learning_rate=0.1)
    in_ram, _ = em.HostTables.from_params(CFG, params, opt)
    pinned, _ = em.HostTables.from_params(CFG, params, opt, placement="pinned_host")
    assert pinned.tables[1].sharding.memory_kind == "pinned_host"
    tokens = _tokens(seed=7)
    a, b = in_ram.prefetch(tokens), pinned.prefetch(tokens)
    assert b.rows["1"].sharding.memory_kind == "device"
    np.testing.assert_array_equal(np.asarray(a.rows["1"]), np.asarray(b.rows["1"]))
    grads = np.random.default_rng(3).normal(size=a.rows["1"].shape).astype(np.float32)
    assert in_ram.apply_gradients(a.ids, {"1": grads}) and pinned.apply_gradients(b.ids, {"1": grads})
    assert pinned.tables[1].sharding.memory_kind == "pinned_host"
    np.testing.assert_array_equal(np.asarray(pinned.tables[1]), in_ram.tables[1])
    assert not np.array_equal(in_ram.tables[1], np.asarray(params["layers_1"]["engram"]["table"][0]))
    with pytest.raises(ValueError, match="placement='disk'; choose one of"):
        em.HostTables.from_params(CFG, params, placement="disk")


def test_errors_name_the_problem():
    params = _params()
    tables, without = em.HostTables.from_params(CFG, params)
    tokens = jnp.asarray(_tokens())
    with pytest.raises(ValueError, match="no Engram table in the params"):  # neither a table nor rows
        jax.eval_shape(lambda p: Transformer(CFG).apply(split_collections(p), tokens, with_mtp=False), without)
    with pytest.raises(ValueError, match="no Engram table at layers_1/engram/table"):
        em.HostTables.from_params(CFG, without)
    with pytest.raises(ValueError, match="already in the params"):
        tables.to_params(params)
    with pytest.raises(ValueError, match="no Engram layers"):
        em.HostTables.from_params(presets.tiny_v4(), params)
    with pytest.raises(ValueError, match="RowOptimizer.kind='adam'"):
        em.RowOptimizer(kind="adam")
    with pytest.raises(ValueError, match="expected \\(9216, 16\\)"):
        em.HostTables(CFG, {1: np.zeros((10, 16))}, {1: np.arange(CFG.vocab_size)})
    with pytest.raises(ValueError, match="row gradients for layers"):
        tables.apply_gradients({"1": np.zeros((1, 1, 8), np.int32)}, {"2": np.zeros((1, 1, 8, 16))})
    with pytest.raises(ValueError, match="do not match row ids"):
        tables.apply_gradients({"1": np.zeros((1, 2, 8), np.int32)}, {"1": np.zeros((1, 1, 8, 16))})
    with pytest.raises(ValueError, match="no host Engram table for layer '0'"):
        tables.gather({"0": np.zeros((1, 1, 8), np.int32)})
    with pytest.raises(ValueError, match="needs Engram layers"):
        Trainer(presets.tiny_v4(), TrainConfig(), sharding.make_mesh(1, 1, 1, 1, devices=jax.devices()[:1]),
                engram_tables="host")  # fmt: skip
    trainer = _host_trainer()
    with pytest.raises(ValueError, match="hold the Engram tables of layers \\[1\\]"):
        trainer.init(params=params)
    with pytest.raises(ValueError, match="needs params without the Engram tables"):
        trainer.init(jax.random.key(0))
    batch = _tokens(shape=(B, T + 1))
    with pytest.raises(ValueError, match="use step_with_rows"):
        trainer.step({}, batch)
    with pytest.raises(ValueError, match="must hold the rows of Engram layers \\['1'\\], got \\[\\]"):
        trainer.step_with_rows({}, batch, {})
    rows = tables.prefetch(batch[:, :-2]).rows  # one token short
    with pytest.raises(ValueError, match="expected \\(4, 16, 8, 16\\)"):
        trainer.step_with_rows({}, batch, rows)


# ----------------------------------------------------------------- sharding of the device-resident table
@pytest.mark.multi_device
def test_device_table_is_split_along_rows_and_sharded_forward_matches():
    """fsdp_tp on (1, 4, 1, 2): the table's rows over (fsdp, tensor), 8 shards; logits equal one device's."""
    assert jax.device_count() == 8
    params = _params()
    mesh = sharding.make_mesh(1, 4, 1, 2)
    placed = model.shard_params(CFG, params, mesh, "fsdp_tp")
    table = placed["layers_1"]["engram"]["table"]
    rows = layer_plan(CFG, 1).table_rows
    assert table.sharding.spec == jax.sharding.PartitionSpec(None, ("fsdp", "tensor"), None)
    shards = table.addressable_shards
    assert len(shards) == 8 and all(s.data.shape == (1, rows // 8, CFG.engram_head_dim) for s in shards)
    starts = sorted(s.index[1].start for s in shards)
    assert starts == [i * rows // 8 for i in range(8)]
    tokens = _tokens(seed=6)
    ref = model.forward(CFG, params, tokens)
    out = model.make_forward(CFG, mesh, "fsdp_tp")(placed, tokens)
    assert _rel(out, ref) <= 1e-5
