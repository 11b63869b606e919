"""Training: the loss terms against float64 NumPy, every term's gradient, the optimizer groups and schedules,
the aux-loss-free bias update, skipped non-finite steps, exact resume from a checkpoint, a bfloat16-compute
step over float32 master params, batch validation, and the same losses on one device and on the 8-device mesh
under every rule preset.

One small V4 config (sliding + hash-routed MoE, CSA + learned MoE, mHC, one MTP block) keeps compilation
short; the one-device trainer is compiled once for the whole file.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from v4jax import model, presets, sharding
from v4jax.checkpointing import Checkpointer
from v4jax.hf import names
from v4jax.layers.moe import CONSTANTS
from v4jax.model import Transformer, split_collections
from v4jax.train import TrainConfig, Trainer, cross_entropy, learning_rate_schedule, loss_terms, mtp_loss
from v4jax.train.optimizer import make_optimizer, muon_dimensions, param_groups, trainable_specs

CFG = presets.tiny_v4().replace(
    num_hidden_layers=2, layer_types=("sliding_attention", "compressed_sparse_attention")
)  # layer 0: sliding + hash MoE; layer 1: CSA + learned MoE; MTP block: sliding + learned MoE
TCFG = TrainConfig(learning_rate=1e-2, warmup_steps=1, total_steps=50, bias_update_speed=1e-2)
B, T = 8, 16
MESHES = {"fsdp": (2, 4, 1, 1), "fsdp_ep": (1, 2, 4, 1), "fsdp_tp": (1, 4, 1, 2), "ep_tp": (1, 1, 4, 2)}


def _batches(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CFG.vocab_size, (B, T + 1)).astype(np.int32) for _ in range(n)]


@functools.cache
def _params():
    return model.init_params(CFG, jax.random.key(0))


@functools.cache
def _trainer():
    return Trainer(CFG, TCFG, sharding.make_mesh(1, 1, 1, 1, devices=jax.devices()[:1]))


def _copy(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


# ----------------------------------------------------------------- loss terms
def _nll64(logits, labels):
    z = np.asarray(logits, np.float64)
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    return lse - np.take_along_axis(z, labels[..., None], -1)[..., 0]


def test_cross_entropy_and_mtp_match_float64_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 7, 11)).astype(np.float32) * 3
    labels = rng.integers(0, 11, (2, 7))
    np.testing.assert_allclose(cross_entropy(jnp.asarray(logits), jnp.asarray(labels)), _nll64(logits, labels).mean(),
                               rtol=1e-6)  # fmt: skip
    mtp = [rng.normal(size=(2, 7, 11)).astype(np.float32) for _ in range(2)]
    expected = []
    for k, lg in enumerate(mtp, start=1):  # module k at position i predicts labels[i + k], i < T - k
        expected.append(np.mean([_nll64(lg[:, i], labels[:, i + k]) for i in range(7 - k)]))
    np.testing.assert_allclose(mtp_loss([jnp.asarray(m) for m in mtp], jnp.asarray(labels)), np.mean(expected),
                               rtol=1e-6)  # fmt: skip


def test_every_loss_term_is_nonzero_and_reaches_its_parameters():
    """CE, MTP, the balance loss and the indexer KL (sparse stage) each carry gradient: MTP into the MTP block,
    the balance loss into the learned routers, the KL into the indexer and nowhere else."""
    cfg = CFG.replace(indexer_training="sparse", index_topk=2)
    collections = split_collections(_params())
    tokens = jnp.asarray(_batches(1)[0])

    terms = ("ce", "mtp", "balance", "indexer_kl")

    def all_terms(p):
        logits, mtp_logits, aux = Transformer(cfg).apply({"params": p, CONSTANTS: collections[CONSTANTS]},
                                                         tokens[:, :-1])  # fmt: skip
        values = loss_terms(TCFG, logits, mtp_logits, aux, tokens[:, 1:])
        return jnp.stack([values[name] for name in terms])

    # one vmapped backward pass for the four terms (cheaper to compile than four)
    values, jac = jax.jit(lambda p: (all_terms(p), jax.jacrev(all_terms)(p)))(collections["params"])
    results = {name: (values[i], jax.tree.map(lambda g, i=i: g[i], jac)) for i, name in enumerate(terms)}
    norms = {name: {path: float(jnp.abs(g).max()) for path, g in names.flatten(grads).items()}
             for name, (_, grads) in results.items()}  # fmt: skip
    for name, (value, _) in results.items():
        assert float(value) > 0, name
    assert max(v for p, v in norms["ce"].items() if not p.startswith("mtp_0/")) > 0
    assert max(v for p, v in norms["mtp"].items() if p.startswith("mtp_0/")) > 0
    assert norms["balance"]["layers_1/ffn/gate/kernel"] > 0 and norms["balance"]["mtp_0/block/ffn/gate/kernel"] > 0
    kl_paths = {p for p, v in norms["indexer_kl"].items() if v > 0}
    assert kl_paths and all("/indexer/" in p for p in kl_paths)
    assert all(v == 0 for p, v in norms["ce"].items() if "/indexer/" in p)  # top-k is not differentiable


# ----------------------------------------------------------------- optimizer
def test_schedules_match_their_formulas():
    tc = TrainConfig(learning_rate=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    cosine = learning_rate_schedule(tc)
    assert float(cosine(5)) == pytest.approx(0.5) and float(cosine(10)) == pytest.approx(1.0)
    for s in (35, 60, 110):
        expected = 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * (s - 10) / 100))
        assert float(cosine(s)) == pytest.approx(expected, rel=1e-5)
    wsd = learning_rate_schedule(tc.replace(schedule="wsd", decay_fraction=0.2))  # decays over steps 88..110
    assert float(wsd(50)) == pytest.approx(1.0) and float(wsd(88)) == pytest.approx(1.0)
    assert float(wsd(99)) == pytest.approx(1.0 - 0.9 * 11 / 22, rel=1e-5)
    assert float(wsd(110)) == pytest.approx(0.1, rel=1e-5)


def test_parameter_groups_and_muon_axes():
    groups = names.flatten(param_groups(CFG))
    assert groups["layers_1/ffn/gate/bias"] == "frozen"
    assert groups["embed/embedding"] == groups["head/kernel"] == groups["layers_1/attn_norm/scale"] == "vector"
    assert groups["layers_1/ffn/experts/w2"] == groups["layers_1/attn/wq_b/kernel"] == "matrix"
    specs = names.flatten(trainable_specs(CFG))
    assert muon_dimensions(specs["layers_1/attn/wq_b/kernel"]) == optax.contrib.MuonDimensionNumbers((1,), (2, 3))
    assert muon_dimensions(specs["layers_1/ffn/experts/w2"]) == optax.contrib.MuonDimensionNumbers((2,), (3,))
    assert muon_dimensions(specs["layers_1/attn/wo_b/kernel"]) == optax.contrib.MuonDimensionNumbers((2,), (3,))
    warmup = names.flatten(param_groups(CFG.replace(indexer_training="dense_warmup")))
    assert {p for p, g in warmup.items() if g != "frozen"} == {p for p in warmup if "/indexer/" in p}


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_optimizer_moves_trained_leaves_only(optimizer):
    trainable = split_collections(_params())["params"]
    for cfg in (CFG, CFG.replace(indexer_training="dense_warmup")):
        tx = make_optimizer(cfg, TCFG.replace(optimizer=optimizer, warmup_steps=0))
        grads = jax.tree.map(lambda x: jnp.full_like(x, 0.01), trainable)
        updates, _ = jax.jit(tx.update)(grads, tx.init(trainable), trainable)
        groups = names.flatten(param_groups(cfg))
        for path, u in names.flatten(updates).items():
            assert (float(jnp.abs(u).max()) == 0) == (groups[path] == "frozen"), (cfg.indexer_training, path)


# ----------------------------------------------------------------- the step
def test_bias_moves_by_gamma_sign_of_the_load_gap_and_training_learns():
    trainer = _trainer()
    state = trainer.init(params=_params())
    before = _copy(state["params"])
    batches = _batches(4, seed=1)
    state, metrics = trainer.step(state, batches[0])
    after = names.flatten(_copy(state["params"]))
    load = np.asarray(metrics["expert_load"])  # [L_moe, E]: layer 0 (hash), layer 1 (learned)
    expected = TCFG.bias_update_speed * np.sign(load[1].mean() - load[1])
    np.testing.assert_allclose(after["layers_1/ffn/gate/bias"][0] - names.flatten(before)["layers_1/ffn/gate/bias"][0],
                               expected, rtol=0, atol=1e-7)  # fmt: skip
    assert "layers_0/ffn/gate/bias" not in after  # hash-routed layers have no bias
    np.testing.assert_allclose(metrics["max_vio"], load.max(-1) / load.mean(-1) - 1, rtol=1e-6)
    first = float(metrics["ce"])
    for _ in range(6):
        state, metrics = trainer.step(state, batches[0])
    assert float(metrics["ce"]) < first - 0.5  # memorises a repeated batch
    assert int(metrics["skipped"]) == 0


def test_non_finite_step_is_skipped_and_counted():
    trainer = _trainer()
    params = jax.tree.map(np.array, _params())
    params["embed"]["embedding"][3, 0] = np.nan
    state = trainer.init(params=params)
    before = _copy(state)
    batch = _batches(1)[0]
    batch[0, 0] = 3  # the poisoned row is used
    state, metrics = trainer.step(state, batch)
    assert not bool(metrics["finite"]) and int(metrics["skipped"]) == 1
    after = _copy(state)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(before["params"])[0],
                            jax.tree.leaves(after["params"]), strict=True):  # fmt: skip
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
    for x, y in zip(jax.tree.leaves(before["opt_state"]), jax.tree.leaves(after["opt_state"]), strict=True):
        np.testing.assert_array_equal(x, y)
    assert int(after["step"]) == 1


def test_exact_resume_from_a_checkpoint(tmp_path):
    """6 steps straight == 3 steps, save, restore into a fresh state, 3 steps: bit-identical params and losses."""
    trainer, batches = _trainer(), _batches(6, seed=2)
    state, straight = trainer.init(params=_params()), []
    for batch in batches:
        state, metrics = trainer.step(state, batch)
        straight.append(float(metrics["loss"]))
    final = _copy(state["params"])

    state, resumed = trainer.init(params=_params()), []
    with Checkpointer(tmp_path, save_every=3, keep=2) as ckpt:
        for step, batch in enumerate(batches[:3], start=1):
            state, metrics = trainer.step(state, batch)
            resumed.append(float(metrics["loss"]))
            ckpt.maybe_save(step, state, {"note": "test"})
        ckpt.wait()
        del state
        state, meta = ckpt.restore(target=trainer.abstract_state())
    assert meta["note"] == "test" and int(state["step"]) == 3
    for batch in batches[3:]:
        state, metrics = trainer.step(state, batch)
        resumed.append(float(metrics["loss"]))
    assert resumed == straight
    for x, y in zip(jax.tree.leaves(final), jax.tree.leaves(_copy(state["params"])), strict=True):
        np.testing.assert_array_equal(x, y)


def test_mixed_precision_step_keeps_float32_master_params():
    """bfloat16 compute over float32 master params: params and moments stay float32, the first loss is within
    1e-3 (relative) of the float32 step's on the same batch and params but not equal to it (the compute dtype
    took effect), and the loss falls on a repeated batch."""
    trainer = Trainer(CFG.replace(dtype="bfloat16", param_dtype="float32"), TCFG,
                      sharding.make_mesh(1, 1, 1, 1, devices=jax.devices()[:1]))  # fmt: skip
    batch = _batches(3, seed=3)[0]  # the batch of the float32 run's first step
    state, losses = trainer.init(params=_params()), []
    for _ in range(4):  # the first update has learning rate 0 (warmup), the next three move the params
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)) and int(metrics["skipped"]) == 0
    floating = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floating and all(x.dtype == jnp.float32 for x in floating)
    reference = _one_device_losses()[0]
    assert losses[0] != reference
    np.testing.assert_allclose(losses[0], reference, rtol=1e-3)  # 5e-6 here: the loss averages 128 tokens' CE
    assert losses[-1] < losses[0] - 0.5, losses  # 8.15 -> 6.79 here


def test_bad_batches_are_rejected_before_compiling():
    trainer = _trainer()
    with pytest.raises(ValueError, match="token id 512 in the batch is outside the vocabulary"):
        trainer.check_batch(np.full((B, T + 1), CFG.vocab_size))
    with pytest.raises(ValueError, match=r"token windows \[B, T\+1\]"):
        trainer.check_batch(np.zeros((B,), np.int32))
    with pytest.raises(ValueError, match="integer token ids"):
        trainer.check_batch(np.zeros((B, T + 1), np.float32))
    eight = Trainer(CFG, TCFG, sharding.make_mesh(*MESHES["fsdp"]))
    with pytest.raises(ValueError, match="batch size 4 is not divisible by the 8 shards"):
        eight.check_batch(np.zeros((4, T + 1), np.int32))
    with pytest.raises(ValueError, match="TrainConfig.optimizer='sgd'"):
        TrainConfig(optimizer="sgd")


@functools.cache
def _one_device_losses():
    trainer = _trainer()
    state, losses = trainer.init(params=_params()), []
    for batch in _batches(3, seed=3):
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses


@pytest.mark.multi_device
@pytest.mark.parametrize("preset", ["fsdp_ep", "ep_tp"])  # between them: the fsdp, expert and tensor axes
def test_same_losses_on_one_and_eight_devices(preset):
    """3 steps (forward, backward, AdamW, bias update) on the 8-device mesh equal the one-device run (1e-5).
    The forward of every rule preset is compared in tests/test_sharding.py."""
    trainer = Trainer(CFG, TCFG, sharding.make_mesh(*MESHES[preset]), preset)
    state, losses = trainer.init(params=_params()), []
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state["params"]))
    for batch in _batches(3, seed=3):
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, _one_device_losses(), rtol=1e-5)
