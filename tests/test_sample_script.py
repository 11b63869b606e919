"""`python -m experiments.sample` on a tiny run directory and an HF checkpoint directory, in-process.

The run directory is what `experiments.train` writes (config.json + an orbax checkpoint with the tokenizer),
built here from random `tiny` parameters (V3 with one MTP module; the smallest preset to compile) and a
byte-level BPE trained on a few lines of ASCII Python. The script's output must equal greedy `generate` on
the saved parameters decoded by the tokenizer: the streamed text of one prompt (pieces printed as decoded),
the same text from `--speculative`, and the JSONL completions of a batch from the HF directory.
"""

import io
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import sample
from v4jax import hf, model, presets
from v4jax import sharding as shd
from v4jax.checkpointing import Checkpointer
from v4jax.data import Document, train_bpe
from v4jax.sampling import generate
from v4jax.train import TrainConfig, Trainer

NEW_TOKENS = 10
TEXT = """import os

def walk(top, onerror=None):
    for name in os.listdir(top):
        path = os.path.join(top, name)
        if os.path.isdir(path):
            yield from walk(path, onerror)
        else:
            yield path


class Counter(dict):
    def __missing__(self, key):
        return 0
"""


def _random_params(cfg, seed=0):
    """Random float32 parameters of `cfg` from NumPy (no compilation; their values are not under test)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: rng.normal(0.0, 0.1, a.shape).astype(a.dtype), model.abstract_params(cfg))


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """(run directory, HF directory, cfg, params, tokenizer) of one tiny model (V3 with an MTP module)."""
    root = tmp_path_factory.mktemp("sample")
    tokenizer = train_bpe([Document(f"doc{i}", TEXT) for i in range(3)], 300, cache_dir=root / "bpe")
    cfg = presets.tiny().replace(vocab_size=tokenizer.vocab_size)
    params = _random_params(cfg)
    # the state layout of `experiments.train`: Trainer's state with these params (optimizer state zero)
    tcfg = TrainConfig(total_steps=10, warmup_steps=0)
    trainer = Trainer(cfg, tcfg, shd.make_mesh(fsdp=1, devices=jax.devices()[:1]), "fsdp")
    state = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), trainer.abstract_state())
    state["params"] = jax.tree.map(jnp.asarray, params)
    run = root / "run"
    settings = {"model": cfg.to_dict(), "train": tcfg.to_dict(), "args": {}}
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(settings))
    with Checkpointer(run / "checkpoints", save_every=1, keep=1, tokenizer_json=tokenizer.to_json()) as ckpt:
        ckpt.maybe_save(7, state, settings, force=True)
    hf_dir = root / "hf"
    hf.save_checkpoint(hf_dir, cfg, params)
    tokenizer.save(hf_dir / "tokenizer.json")
    return run, hf_dir, cfg, params, tokenizer


def _main(argv):
    out, err = io.StringIO(), io.StringIO()
    ids = sample.main([str(a) for a in argv], out=out, err=err)
    return ids, out.getvalue(), err.getvalue()


def _expected(cfg, params, tokenizer, prompts):
    """generate's greedy continuations (stopping at end-of-text, which is not printed), decoded."""
    encoded = [tokenizer.encode(p) for p in prompts]
    outputs = generate(cfg, params, encoded, NEW_TOKENS, stop_tokens=[tokenizer.eos_id])
    return outputs, [tokenizer.decode(sample.shown(ids, tokenizer.eos_id)) for ids in outputs]


PROMPT = "def walk(top):\n    for name in"


def test_run_directory_streams_the_greedy_continuation(model_dirs):
    run, _, cfg, params, tokenizer = model_dirs
    (want_ids,), (want_text,) = _expected(cfg, params, tokenizer, [PROMPT])
    ids, out, err = _main([run, "--prompt", PROMPT, "--max-new-tokens", NEW_TOKENS])
    assert ids == [want_ids]
    assert out == PROMPT + want_text + "\n"
    assert "step 7" in err
    # the run's checkpoints/ and a step in it name the same run (latest step / that step)
    assert sample._run_layout(run) == sample._run_layout(run / "checkpoints") == (run, None)
    assert sample._run_layout(run / "checkpoints" / "7") == (run, 7)


def test_speculative_prints_the_greedy_text_and_the_acceptance(model_dirs):
    run, _, cfg, params, tokenizer = model_dirs
    (want_ids,), (want_text,) = _expected(cfg, params, tokenizer, [PROMPT])
    ids, out, err = _main([run, "--prompt", PROMPT, "--max-new-tokens", NEW_TOKENS, "--speculative"])
    assert ids == [want_ids]
    assert out == PROMPT + want_text + "\n"
    assert "drafts accepted" in err


def test_cache_tiers_print_the_same_text(model_dirs, tmp_path):
    """A cache with 8 tokens on the device and older blocks on disk gives the streamed greedy text."""
    run, _, cfg, params, tokenizer = model_dirs
    (want_ids,), (want_text,) = _expected(cfg, params, tokenizer, [PROMPT])
    tiers = f"disk:{tmp_path}:8"
    ids, out, err = _main([run, "--prompt", PROMPT, "--max-new-tokens", NEW_TOKENS, "--cache-tiers", tiers])
    assert ids == [want_ids]
    assert out == PROMPT + want_text + "\n"
    assert "cache bytes per tier" in err and "'disk': 0}" not in err


def test_hf_checkpoint_batches_a_prompt_file(model_dirs, tmp_path):
    _, hf_dir, cfg, params, tokenizer = model_dirs
    prompts = ["import os\n", "class Counter(dict):\n    def"]
    file = tmp_path / "prompts.jsonl"
    file.write_text(json.dumps(prompts[0]) + "\n\n" + json.dumps({"prompt": prompts[1]}) + "\n")
    # without --speculative the script loads the checkpoint without its MTP module
    main_only = {name: leaf for name, leaf in params.items() if name != "mtp_0"}
    want_ids, want_text = _expected(cfg.replace(num_nextn_predict_layers=0), main_only, tokenizer, prompts)
    ids, out, _ = _main([hf_dir, "--prompt-file", file, "--max-new-tokens", NEW_TOKENS])
    assert ids == want_ids
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in records] == prompts
    assert [r["completion"] for r in records] == want_text
    assert [r["tokens"] for r in records] == [len(i) for i in want_ids]


def test_incremental_text_never_splits_a_character(model_dirs):
    tokenizer = model_dirs[4]
    text = "a π = 3.14 € ü"  # the BPE saw only ASCII: each non-ASCII byte is its own token
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())
    pieces = list(sample.incremental_text(tokenizer, ids))
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def _error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample.main([str(a) for a in argv])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_errors_name_the_problem(model_dirs, tmp_path, capsys):
    run, hf_dir, _, _, tokenizer = model_dirs
    assert "neither a training run" in _error([tmp_path, "--prompt", "x"], capsys)
    bare = tmp_path / "bare"
    shutil.copytree(hf_dir, bare)
    (bare / "tokenizer.json").unlink()
    assert "without a tokenizer.json" in _error([bare, "--prompt", "x"], capsys)
    assert "expected device, host[:N] or disk:DIR[:N]" in _error([run, "--prompt", "x", "--cache-tiers", "gpu"], capsys)
    assert "needs a directory" in _error([run, "--prompt", "x", "--cache-tiers", "disk"], capsys)
    assert "greedily" in _error([run, "--prompt", "x", "--speculative", "--temperature", "0.5"], capsys)
    assert "is not a directory" in _error([run / "checkpoints" / "3", "--prompt", "x"], capsys)
    # a tokenizer with more entries than the model's vocabulary: the prompt's merged tokens lie outside it
    bigger = train_bpe([Document("big", TEXT * 2)], 400, cache_dir=tmp_path / "bpe")
    bigger.save(bare / "tokenizer.json")
    assert max(bigger.encode(TEXT)) >= tokenizer.vocab_size
    assert "outside the vocabulary" in _error([bare, "--prompt", TEXT], capsys)
