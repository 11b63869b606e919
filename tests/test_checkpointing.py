"""Checkpoints: cadence and retention, bit-exact round trips across meshes, mismatch and corruption errors, a
process killed mid-save, donation after an asynchronous save, and an exact toy resume.

Expected values are numpy arrays built independently of the code under test; equality is on bit patterns."""

import functools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from v4jax import model, sharding
from v4jax.checkpointing import (
    CheckpointCorruptError,
    Checkpointer,
    CheckpointMismatchError,
    _device_checksums,
    _leaves_by_path,
    _state_checksums,
    check_meta,
)

# A failed orbax read leaves tensorstore callbacks aimed at orbax's closed event loop ("Event loop is closed",
# reported whenever they are collected); they are harmless.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

META = {"model_config": {"hidden_size": 64, "layers": (2, 3)}, "data": {"position": 17}, "trainer": {"lr": 1e-3}}


class Moments(NamedTuple):
    mu: jax.Array
    count: jax.Array


def numpy_state(seed: int = 0) -> dict:
    """A state with float32, bfloat16, int32 and uint32 leaves under dicts, a NamedTuple and a list."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((8, 12)).astype(np.float32)
    return {
        "params": {"w": w, "emb": rng.standard_normal((16, 4)).astype(jnp.bfloat16)},
        "opt": Moments(mu=w * 0.5, count=np.int32(3 + seed)),
        "rng": [np.array([seed, 2**32 - 1 - seed], np.uint32)],  # PRNG key data: uint32 with the top bit set
        "step": np.int32(100 + seed),
        "ids": np.arange(32, dtype=np.int32).reshape(4, 8) - 5,
    }


def bits(x) -> np.ndarray:
    """The bit pattern of an array as unsigned integers of its width (bit-exact comparisons, NaN-safe)."""
    x = np.asarray(x)
    return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize])


def assert_bit_equal(restored, expected):
    assert jax.tree.structure(restored) == jax.tree.structure(jax.tree.map(jnp.asarray, expected))
    flat = jax.tree_util.tree_flatten_with_path(restored)[0]
    for (path, r), e in zip(flat, jax.tree.leaves(expected), strict=True):
        e = np.asarray(e)
        assert r.dtype == e.dtype and r.shape == e.shape, path
        np.testing.assert_array_equal(bits(r), bits(e), err_msg=jax.tree_util.keystr(path))


def place(tree, shardings):
    """Numpy leaves as jax.Arrays on `shardings`, each shard cut on the host (no resharding computation)."""
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda index: np.asarray(x)[index]), tree, shardings
    )


def abstract(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=s), tree, shardings
    )


def on_one_device(tree):
    return jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), tree)


def on_mesh(tree):
    """A 2x4 mesh (fsdp=2, expert=4): 2-D leaves split over both axes, vectors over `fsdp`, scalars replicated."""
    mesh = sharding.make_mesh(data=1, fsdp=2, expert=4, tensor=1)
    specs = {2: PartitionSpec("fsdp", "expert"), 1: PartitionSpec("fsdp"), 0: PartitionSpec()}
    return jax.tree.map(lambda x: NamedSharding(mesh, specs[np.ndim(x)]), tree)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A directory holding committed step 5 of numpy_state(0) (1-device layout) with META."""
    directory = tmp_path_factory.mktemp("ckpt") / "run"
    state = numpy_state(0)
    with Checkpointer(directory, save_every=5, keep=2) as ckpt:
        assert ckpt.maybe_save(5, place(state, on_one_device(state)), META)
    return directory


# ----------------------------------------------------------------- cadence, retention, round trips
def test_saves_every_n_steps_and_keeps_the_last_k(tmp_path):
    state = jax.tree.map(jnp.asarray, numpy_state(0))
    with Checkpointer(tmp_path, save_every=2, keep=2) as ckpt:
        assert ckpt.latest_step() is None
        assert [ckpt.maybe_save(s, state, META) for s in range(1, 8)] == [False, True, False, True, False, True, False]
        assert ckpt.all_steps() == [4, 6] and ckpt.latest_step() == 6
        assert ckpt.maybe_save(7, state, META, force=True)
        assert ckpt.all_steps() == [6, 7]
        assert_bit_equal(ckpt.restore(target=state)[0], numpy_state(0))  # live arrays serve as the target too
        with pytest.raises(FileNotFoundError, match=r"no committed checkpoint step 4 .*committed: \[6, 7\]"):
            ckpt.restore(4, target=abstract(numpy_state(0), on_one_device(state)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["6", "7"]


@pytest.mark.parametrize("direction", ["one_device_to_mesh", "mesh_to_one_device"])
def test_restore_puts_every_leaf_on_the_target_sharding_bit_exactly(tmp_path, direction):
    state = numpy_state(1)
    save_sh, load_sh = on_one_device(state), on_mesh(state)
    if direction == "mesh_to_one_device":
        save_sh, load_sh = load_sh, save_sh
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        ckpt.maybe_save(3, place(state, save_sh), META)
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        restored, meta = ckpt.restore(target=abstract(state, load_sh))
    assert_bit_equal(restored, state)
    for leaf, target in zip(jax.tree.leaves(restored), jax.tree.leaves(load_sh), strict=True):
        assert leaf.sharding.is_equivalent_to(target, leaf.ndim)
        assert {s.data.shape for s in leaf.addressable_shards} == {target.shard_shape(leaf.shape)}
    assert meta == json.loads(json.dumps(META))  # tuples come back as lists


def random_like(abstract_tree, seed: int = 0):
    """Numpy arrays of the shapes and dtypes of `abstract_tree` (random normals; integers in [0, 100))."""
    rng = np.random.default_rng(seed)

    def draw(a):
        if jnp.issubdtype(a.dtype, jnp.integer):
            return rng.integers(0, 100, a.shape).astype(a.dtype)
        return rng.standard_normal(a.shape).astype(a.dtype)

    return jax.tree.map(draw, abstract_tree)


def test_tiny_model_params_move_between_rule_presets(tmp_path, tiny_cfg):
    params = random_like(model.abstract_params(tiny_cfg))
    specs = model.param_logical_specs(tiny_cfg)
    fsdp_ep = sharding.param_shardings(specs, sharding.make_mesh(data=1, fsdp=2, expert=4, tensor=1), "fsdp_ep")
    fsdp_tp = sharding.param_shardings(specs, sharding.make_mesh(data=1, fsdp=4, expert=1, tensor=2), "fsdp_tp")
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        start = time.perf_counter()
        ckpt.maybe_save(1, place(params, fsdp_ep), {})
        blocked = time.perf_counter() - start
        restored, _ = ckpt.restore(target=abstract(params, fsdp_tp))
    assert blocked < 15, blocked  # orbax's default replica-parallel writer took 45 s here (eager slice compiles)
    assert_bit_equal(restored, params)
    for leaf, target_sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(fsdp_tp), strict=True):
        assert leaf.sharding == target_sharding


def test_tokenizer_json_is_stored_with_every_step(tmp_path):
    content = json.dumps({"version": "1.0", "model": {"type": "WordLevel", "vocab": {"é": 0, "b": 1}}, "x": 0.1})
    state = jax.tree.map(jnp.asarray, numpy_state(0))
    with Checkpointer(tmp_path, save_every=1, keep=2, tokenizer_json=content) as ckpt:
        ckpt.maybe_save(1, state, META)
        assert json.loads(ckpt.restore_tokenizer(1)) == json.loads(content)
        assert json.loads((ckpt.step_dir(1) / "tokenizer" / "tokenizer.json").read_text()) == json.loads(content)
    with Checkpointer(tmp_path / "none", save_every=1, keep=2) as ckpt:
        ckpt.maybe_save(1, state, META)
        assert ckpt.restore_tokenizer() is None


def test_tokenizer_file_loads_with_the_tokenizers_library(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    with Checkpointer(tmp_path, save_every=1, keep=1, tokenizer_json=tok.to_str()) as ckpt:
        ckpt.maybe_save(1, {"x": jnp.zeros(2)}, {})
        again = tokenizers.Tokenizer.from_str(ckpt.restore_tokenizer())
        from_file = tokenizers.Tokenizer.from_file(str(ckpt.step_dir(1) / "tokenizer" / "tokenizer.json"))
    assert again.to_str() == tok.to_str()
    assert from_file.encode("hello there world").ids == [1, 0, 2]


# ----------------------------------------------------------------- mismatches
def test_tree_mismatch_names_missing_and_extra_paths(saved):
    state = numpy_state(0)
    state["params"]["bias"] = np.zeros(3, np.float32)
    del state["ids"]
    with Checkpointer(saved, save_every=5, keep=2) as ckpt:
        with pytest.raises(CheckpointMismatchError) as err:
            ckpt.restore(target=abstract(state, on_one_device(state)))
    message = str(err.value)
    assert f"{saved}/5" in message
    assert "missing from the checkpoint: params/bias" in message
    assert "in the checkpoint but not in the target: ids" in message


def test_shape_and_dtype_mismatch_name_the_leaf(saved):
    state = numpy_state(0)
    state["params"]["w"] = np.zeros((12, 8), np.float32)
    state["rng"][0] = np.zeros(2, np.int32)
    with Checkpointer(saved, save_every=5, keep=2) as ckpt:
        with pytest.raises(CheckpointMismatchError) as err:
            ckpt.restore(target=abstract(state, on_one_device(state)))
    assert "params/w: shape saved (8, 12) vs expected (12, 8)" in str(err.value)
    assert "rng/0: dtype saved uint32 vs expected int32" in str(err.value)


def test_check_meta_names_the_differing_fields():
    saved = json.loads(json.dumps(META))
    check_meta(saved, META, ["model_config", "data"])  # tuple (2, 3) equals the saved list [2, 3]
    changed = {**META, "model_config": {"hidden_size": 128, "layers": (2, 3)}, "data": {"position": 17, "epoch": 1}}
    with pytest.raises(CheckpointMismatchError) as err:
        check_meta(saved, changed, ["model_config", "data", "trainer"])
    assert "model_config.hidden_size: saved 64 vs expected 128" in str(err.value)
    assert "data.epoch: missing from the checkpoint" in str(err.value)
    assert "trainer" not in str(err.value)
    with pytest.raises(CheckpointMismatchError, match="tokenizer_hash: missing from the checkpoint"):
        check_meta(saved, {"tokenizer_hash": "ab"}, ["tokenizer_hash"])
    with pytest.raises(CheckpointMismatchError, match=r"model_config.layers\[1\]: saved 3 vs expected 4"):
        check_meta(saved, {"model_config": {"hidden_size": 64, "layers": [2, 4]}}, ["model_config"])


# ----------------------------------------------------------------- corruption
def _data_files(step_dir):
    return sorted(
        (p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"), key=os.path.getsize
    )


def _truncate(step_dir):
    for f in _data_files(step_dir):
        os.truncate(f, os.path.getsize(f) // 2)


def _delete(step_dir):
    for f in _data_files(step_dir):
        f.unlink()


def _tamper_checksum(step_dir):
    path = step_dir / "checksums" / "checksums.json"
    sums = json.loads(path.read_text())
    sums["params/w"] = (sums["params/w"] + 1) % 2**32
    path.write_text(json.dumps(sums))


def _garbage(relative):
    return lambda step_dir: (step_dir / relative).write_text("{garbage")


CORRUPTIONS = {
    "truncated_array_files": (_truncate, ""),
    "deleted_array_files": (_delete, ""),
    "tampered_checksum": (_tamper_checksum, "checksum mismatch in state leaves params/w"),
    "garbage_state_metadata": (_garbage("state/_METADATA"), ""),
    "deleted_state_metadata": (lambda d: (d / "state" / "_METADATA").unlink(), "state/_METADATA is missing"),
    "garbage_meta_json": (_garbage("meta/meta.json"), ""),
    "deleted_checksums": (lambda d: shutil.rmtree(d / "checksums"), ""),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_corrupt_checkpoint_error_names_the_step_directory(saved, tmp_path, corruption):
    damage, detail = CORRUPTIONS[corruption]
    directory = tmp_path / "run"
    shutil.copytree(saved, directory)
    damage(directory / "5")
    state = numpy_state(0)
    with Checkpointer(directory, save_every=5, keep=2) as ckpt:
        with pytest.raises(CheckpointCorruptError, match=f"checkpoint step directory {directory}/5 is corrupt") as err:
            ckpt.restore(target=abstract(state, on_one_device(state)))
    assert detail in str(err.value)


def test_silent_data_corruption_is_caught_by_the_checksums(tmp_path):
    """A flipped bit inside zstd-compressed array data: orbax 0.12.8 reads back wrong values without an error."""
    expected = {"w": np.arange(256 * 256, dtype=np.float32).reshape(256, 256), "i": np.arange(8, dtype=np.int32)}
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        ckpt.maybe_save(1, jax.tree.map(jnp.asarray, expected), {})
    biggest = _data_files(tmp_path / "1")[-1]
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0x40
    biggest.write_bytes(bytes(data))
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        with pytest.raises(
            CheckpointCorruptError, match=f"{tmp_path}/1 is corrupt: checksum mismatch in state leaves w$"
        ):
            ckpt.restore(target=abstract(expected, on_one_device(expected)))


def numpy_checksum(x) -> int:
    """sum_i fmix32(bits_i ^ (i * 0x9E3779B9)) mod 2^32 over row-major elements (bool as 0/1), in uint64 + masks."""
    x, mask = np.asarray(x), np.uint64(2**32 - 1)
    h = (x.astype(np.uint64) if x.dtype == bool else bits(x).astype(np.uint64)).reshape(-1)
    h ^= (np.arange(h.size, dtype=np.uint64) * np.uint64(0x9E3779B9)) & mask
    for shift, multiplier in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
        h = ((h ^ (h >> np.uint64(shift))) * np.uint64(multiplier)) & mask
    h ^= h >> np.uint64(16)
    return int(h.sum() & mask)


def test_checksums_match_numpy_on_host_and_device_for_any_sharding():
    state = numpy_state(2)
    state["mask"] = np.arange(32).reshape(4, 8) % 3 == 0
    expected = {path: numpy_checksum(x) for path, x in _leaves_by_path(state).items()}
    for shardings in (on_one_device(state), on_mesh(state)):
        leaves = _leaves_by_path(place(state, shardings))
        assert _state_checksums(leaves) == expected  # numpy on the CPU arrays
        on_device = jax.device_get(_device_checksums(list(leaves.values())))  # the accelerator path
        assert dict(zip(leaves, map(int, on_device), strict=True)) == expected
    w = state["params"]["w"].copy()
    w.view(np.uint32)[5, 7] ^= 1
    assert _state_checksums({"w": jnp.asarray(w)})["w"] != expected["params/w"]
    swapped = state["ids"].copy()
    swapped[0, [0, 1]] = swapped[0, [1, 0]]
    assert _state_checksums({"ids": jnp.asarray(swapped)})["ids"] != expected["ids"]


# ----------------------------------------------------------------- crash safety
KILLED_SAVER = textwrap.dedent(
    """
    import sys, time
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from v4jax.checkpointing import Checkpointer

    def state(step):
        return {"w": jnp.arange(4096, dtype=jnp.float32) * step, "step": jnp.int32(step)}

    ckpt = Checkpointer(sys.argv[1], save_every=1, keep=3)
    ckpt.maybe_save(1, state(1), {"position": 1})
    ckpt.wait()
    commit = atomicity.AtomicRenameTemporaryPath.finalize

    async def hang_before_step_commit(self):  # every item is written and renamed; the step rename never comes
        if self.get().name.startswith("2."):
            print("STEP2_WRITTEN", flush=True)
            time.sleep(600)
        return await commit(self)

    atomicity.AtomicRenameTemporaryPath.finalize = hang_before_step_commit
    ckpt.maybe_save(2, state(2), {"position": 2})
    time.sleep(600)
    """
)


def _expected(step):
    return {"w": np.arange(4096, dtype=np.float32) * step, "step": np.int32(step)}


def test_sigkill_mid_save_leaves_the_previous_step_restorable(tmp_path):
    directory = tmp_path / "run"
    tmp = directory / "2.orbax-checkpoint-tmp"
    with subprocess.Popen(
        [sys.executable, "-c", KILLED_SAVER, str(directory)], stdout=subprocess.PIPE, text=True
    ) as proc:
        try:
            deadline, line = time.monotonic() + 60, ""
            while "STEP2_WRITTEN" not in line and time.monotonic() < deadline and proc.poll() is None:
                if select.select([proc.stdout], [], [], 1.0)[0]:
                    line = proc.stdout.readline()
            assert "STEP2_WRITTEN" in line, "the saver never reached the commit of step 2"
            assert (tmp / "state" / "_METADATA").is_file() and (tmp / "meta" / "meta.json").is_file()
            assert not (directory / "2").exists()
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert tmp.exists()  # the killed save left its tmp directory behind

    target = abstract(_expected(0), on_one_device(_expected(0)))
    with Checkpointer(directory, save_every=1, keep=3) as ckpt:
        assert ckpt.all_steps() == [1]
        state, meta = ckpt.restore(target=target)
        assert_bit_equal(state, _expected(1))
        assert meta == {"position": 1}
        assert ckpt.maybe_save(2, jax.tree.map(jnp.asarray, _expected(2)), {"position": 2})  # tmp dir no obstacle
        assert ckpt.latest_step() == 2
        assert_bit_equal(ckpt.restore(target=target)[0], _expected(2))
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]


def test_async_save_survives_donation(tmp_path):
    """The caller donates the state to the next steps right after an asynchronous save returns."""
    expected = {"w": np.random.default_rng(0).standard_normal((512, 1024)).astype(np.float32)}
    state = jax.tree.map(jnp.asarray, expected)
    step = jax.jit(lambda s: jax.tree.map(lambda x: -2.0 * x - 1.0, s), donate_argnums=0)
    with Checkpointer(tmp_path, save_every=1, keep=1, async_save=True) as ckpt:
        assert ckpt.maybe_save(1, state, {})
        for _ in range(3):
            state = step(state)
        jax.block_until_ready(state)
        ckpt.wait()
        restored, _ = ckpt.restore(target=abstract(expected, on_one_device(expected)))
    assert_bit_equal(restored, expected)


# ----------------------------------------------------------------- exact resume (toy trainer)
TOY_TX = optax.adam(1e-2)


def _toy_init():
    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.standard_normal((6, 3)).astype(np.float32)), "b": jnp.zeros(3)}
    state = {"params": params, "opt": TOY_TX.init(params), "key": jax.random.key_data(jax.random.key(7))}
    return jax.device_put(state, jax.devices()[0])  # committed, like restored arrays: _toy_step compiles once


def _toy_batch(position):
    rng = np.random.default_rng(1000 + position)
    return rng.standard_normal((4, 6)).astype(np.float32), rng.standard_normal((4, 3)).astype(np.float32)


@functools.partial(jax.jit, donate_argnums=0)
def _toy_step(state, x, y):
    """One Adam step on a noisy linear regression; the noise consumes the PRNG key carried in the state."""
    key, noise_key = jax.random.split(jax.random.wrap_key_data(state["key"]))
    x = x + 0.01 * jax.random.normal(noise_key, x.shape)
    loss, grads = jax.value_and_grad(lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2))(state["params"])
    updates, opt = TOY_TX.update(grads, state["opt"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt": opt, "key": jax.random.key_data(key)}, loss


def _run(state, position, steps, ckpt=None):
    losses = []
    for _ in range(steps):
        state, loss = _toy_step(state, *_toy_batch(position))
        position += 1
        losses.append(np.asarray(loss))
        if ckpt is not None:
            ckpt.maybe_save(position, state, {"data": {"position": position}})
    return state, losses


def test_toy_training_resumes_bit_exactly(tmp_path):
    straight, straight_losses = _run(_toy_init(), 0, 6)
    straight = jax.device_get(straight)

    state = _toy_init()
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    with Checkpointer(tmp_path, save_every=3, keep=1) as ckpt:
        _, first_losses = _run(state, 0, 3, ckpt)
    with Checkpointer(tmp_path, save_every=3, keep=1) as ckpt:
        state, meta = ckpt.restore(target=target)
        resumed, second_losses = _run(state, meta["data"]["position"], 3)
    assert meta == {"data": {"position": 3}}
    assert_bit_equal(resumed, straight)
    np.testing.assert_array_equal(bits(np.stack(first_losses + second_losses)), bits(np.stack(straight_losses)))


# ----------------------------------------------------------------- bad input
def test_bad_input_raises_clear_errors(tmp_path):
    state = {"x": jnp.zeros(2)}
    with pytest.raises(ValueError, match="save_every and keep must be >= 1"):
        Checkpointer(tmp_path, save_every=0, keep=1)
    with pytest.raises(ValueError, match="tokenizer_json is not valid JSON"):
        Checkpointer(tmp_path, save_every=1, keep=1, tokenizer_json="tokenizer.json")
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        with pytest.raises(FileNotFoundError, match="no committed checkpoint in"):
            ckpt.restore(target={"x": jax.ShapeDtypeStruct((2,), jnp.float32, sharding=state["x"].sharding)})
        with pytest.raises(TypeError, match="meta must be JSON-serialisable"):
            ckpt.maybe_save(1, state, {"bad": {1, 2}})
        with pytest.raises(TypeError, match=r"'key' is a typed PRNG key .*jax.random.key_data"):
            ckpt.maybe_save(1, {"key": jax.random.key(0)}, {})
        with pytest.raises(TypeError, match="'x' is a ndarray; every leaf must be a jax.Array"):
            ckpt.maybe_save(1, {"x": np.zeros(2)}, {})
        assert ckpt.latest_step() is None
        ckpt.maybe_save(1, state, {})
        with pytest.raises(TypeError, match=r"target leaf \['x'\] must have shape, dtype and a sharding"):
            ckpt.restore(target={"x": jax.ShapeDtypeStruct((2,), jnp.float32)})
        mesh = sharding.make_mesh(data=1, fsdp=2, expert=4, tensor=1)
        uneven = NamedSharding(mesh, PartitionSpec("expert"))
        with pytest.raises(ValueError, match=r"target leaf \['x'\]: .*dimension size is 2"):
            ckpt.restore(target={"x": jax.ShapeDtypeStruct((2,), jnp.float32, sharding=uneven)})
    with pytest.raises(KeyError, match="expected meta has no field 'a'"):
        check_meta({"a": 1}, {}, ["a"])
