"""Data pipeline: corpus loading and split, BPE tokenizer and its cache, packing, batches, resume, sharding."""

import hashlib
import json
import math
import time

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from v4jax import data
from v4jax.data import corpus, loader
from v4jax.data import tokenizer as tokenizer_mod

UNICODE_TEXT = "naïve café — Ωμέγα 中文字符 🤖🚀 \x00\x07\t\r\n  tabs\tand <|endoftext|> inside \u200b end"


def _docs(n, prefix="doc"):
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "import", "class", "value", "ünïcode", "数据", "    ", "\n"]
    return [data.Document(f"{prefix}/{i:03d}.py", " ".join(rng.choice(words, size=30))) for i in range(n)]


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    return data.train_bpe(_docs(40), 320, tmp_path_factory.mktemp("tok"))


# ---------------------------------------------------------------- corpus


def test_stdlib_discovery_is_fast_and_filtered():
    t0 = time.perf_counter()
    files = data.stdlib_files()
    elapsed = time.perf_counter() - t0
    root = corpus.stdlib_root()
    rel = [f.relative_to(root).as_posix() for f in files]
    assert len(files) > 300 and elapsed < 2.0
    assert rel == sorted(rel) and all(r.endswith(".py") for r in rel)
    assert "os.py" in rel and "json/decoder.py" in rel
    assert not any(set(r.split("/")[:-1]) & {"site-packages", "test", "tests", "idlelib", "encodings"} for r in rel)


def test_split_is_stable_disjoint_and_matches_name_hash():
    docs = _docs(300)
    train, val = data.split(docs, 0.1)
    expected_val = {
        d.name for d in docs if int.from_bytes(hashlib.sha256(d.name.encode()).digest()[:8], "big") / 2**64 < 0.1
    }
    assert {d.name for d in val} == expected_val
    assert {d.name for d in train} | expected_val == {d.name for d in docs}
    assert not {d.name for d in train} & expected_val
    shuffled = [docs[i] for i in np.random.default_rng(1).permutation(len(docs))]
    assert {d.name for d in data.split(shuffled, 0.1)[1]} == expected_val  # membership ignores order
    assert 10 < len(val) < 50


@pytest.mark.parametrize("fraction", [1e-6, 0.999999])
def test_split_two_docs_keeps_both_sides_non_empty(fraction):
    train, val = data.split(_docs(2), fraction)
    assert len(train) == 1 and len(val) == 1


def test_split_single_document_by_lines():
    doc = data.Document("book.txt", "".join(f"line {i}\n" for i in range(100)))
    train, val = data.split([doc], 0.1)
    assert train[0].text + val[0].text == doc.text
    assert val[0].text.startswith("line 90\n")
    with pytest.raises(ValueError, match="single-line"):
        data.split([data.Document("a", "one line")], 0.1)
    with pytest.raises(ValueError, match="val_fraction"):
        data.split(_docs(5), 0.0)


def test_load_file_jsonl_and_directory(tmp_path):
    (tmp_path / "a.txt").write_text("plain text\n", encoding="utf-8")
    records = [{"text": "first"}, {"text": "second", "meta": 1}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "c.py").write_text("x = 1\n", encoding="utf-8")
    (sub / "ignored.bin").write_bytes(b"\xff\xfe")
    (sub / "empty.md").write_text("", encoding="utf-8")
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "hidden.py").write_text("hidden", encoding="utf-8")

    assert data.load_documents(tmp_path / "a.txt") == [data.Document("a.txt", "plain text\n")]
    assert data.load_documents(str(tmp_path / "b.jsonl")) == [
        data.Document("b.jsonl:1", "first"),
        data.Document("b.jsonl:2", "second"),
    ]
    assert [(d.name, d.text) for d in data.load_documents(tmp_path)] == [
        ("a.txt", "plain text\n"),
        ("b.jsonl:1", "first"),
        ("b.jsonl:2", "second"),
        ("sub/c.py", "x = 1\n"),
    ]


def test_load_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: record has no 'text' field"):
        data.load_documents(bad)
    bad.write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        data.load_documents(bad)
    with pytest.raises(FileNotFoundError, match="neither a file nor a directory"):
        data.load_documents(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no non-empty documents"):
        data.load_documents(empty)
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt is not UTF-8"):
        data.load_documents(tmp_path / "latin1.txt")


def test_fingerprint_sees_names_texts_and_boundaries():
    base = data.corpus_fingerprint([data.Document("a", "xy"), data.Document("b", "z")])
    assert base == data.corpus_fingerprint([data.Document("a", "xy"), data.Document("b", "z")])
    assert base != data.corpus_fingerprint([data.Document("a", "x"), data.Document("b", "yz")])
    assert base != data.corpus_fingerprint([data.Document("c", "xy"), data.Document("b", "z")])


# ---------------------------------------------------------------- tokenizer


def test_bpe_round_trips_arbitrary_text(small_tokenizer):
    tok = small_tokenizer
    assert 257 < tok.vocab_size <= 320 and tok.eos_id == 0
    every_byte_char = "".join(map(chr, range(256)))
    for text in (UNICODE_TEXT, every_byte_char, "def return self"):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.eos_id not in tok.encode(UNICODE_TEXT)  # a literal special-token string is plain text
    assert tok.decode([tok.eos_id]) == data.EOS_TOKEN
    assert len(tok.encode("def return self")) < len(b"def return self")  # merges were learnt


def test_bpe_cache_hit_does_not_retrain(tmp_path, monkeypatch):
    docs = _docs(20)
    first = data.train_bpe(docs, 300, tmp_path)
    path = tmp_path / f"bpe-{data.corpus_fingerprint(docs)[:16]}-300.json"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left behind
    mtime = path.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("retrained despite a cached tokenizer")

    monkeypatch.setattr(tokenizer_mod.trainers, "BpeTrainer", no_training)
    second = data.train_bpe(docs, 300, tmp_path)
    assert path.stat().st_mtime_ns == mtime
    assert second.hash == first.hash and second.encode(UNICODE_TEXT) == first.encode(UNICODE_TEXT)
    with pytest.raises(AssertionError, match="retrained"):  # a different vocab size is a different key
        data.train_bpe(docs, 301, tmp_path)
    with pytest.raises(ValueError, match="vocab_size 256"):
        data.train_bpe(docs, 256, tmp_path)


def test_cache_dir_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("V4JAX_CACHE", str(tmp_path / "root"))
    assert data.cache_root() == tmp_path / "root"
    monkeypatch.delenv("V4JAX_CACHE")
    assert data.cache_root().parts[-2:] == (".cache", "v4jax")


def test_from_file_finds_the_end_of_text_token(tmp_path, small_tokenizer):
    small_tokenizer.save(tmp_path / "tokenizer.json")
    backend = tokenizer_mod.tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    backend.add_special_tokens(["</s>", "<my_eos>"])
    backend.save(str(tmp_path / "tokenizer.json"))
    loaded = data.Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert loaded.eos_token == data.EOS_TOKEN  # first of the known candidates
    assert loaded.vocab_size == small_tokenizer.vocab_size + 2
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<my_eos>"}}))
    configured = data.Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert configured.eos_token == "<my_eos>" and configured.eos_id == backend.token_to_id("<my_eos>")
    assert configured.decode(configured.encode(UNICODE_TEXT)) == UNICODE_TEXT
    with pytest.raises(ValueError, match="'<absent>' is not in the tokenizer's vocabulary"):
        data.Tokenizer.from_file(tmp_path / "tokenizer.json", eos_token="<absent>")
    with pytest.raises(FileNotFoundError):
        data.Tokenizer.from_file(tmp_path / "nope.json")


def test_from_file_without_eos_raises(tmp_path):
    bare = tokenizer_mod.tokenizers.Tokenizer(tokenizer_mod.models.BPE())
    bare.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="pass eos_token= explicitly"):
        data.Tokenizer.from_file(tmp_path / "tokenizer.json")


# ---------------------------------------------------------------- packing


def test_pack_joins_documents_with_eos_and_caches(tmp_path, small_tokenizer, monkeypatch):
    docs = _docs(5)
    tokens = data.pack(docs, small_tokenizer, tmp_path)
    expected = [i for d in docs for i in [*small_tokenizer.encode(d.text), small_tokenizer.eos_id]]
    assert tokens.dtype == np.int32 and tokens.tolist() == expected
    monkeypatch.setattr(data.Tokenizer, "encode_batch", lambda *a: pytest.fail("re-encoded a cached stream"))
    np.testing.assert_array_equal(data.pack(docs, small_tokenizer, tmp_path), tokens)
    assert len(list(tmp_path.iterdir())) == 1


# ---------------------------------------------------------------- batches


def _batches(n_tokens=1001, seq_len=10, global_batch=8, seed=3, **kw):
    kw = {"corpus_fingerprint": "corpus-a", "tokenizer_hash": "tok-a", **kw}
    return data.Batches(np.arange(n_tokens), seq_len=seq_len, global_batch=global_batch, seed=seed, **kw)


def test_windows_cover_the_stream_with_stride_seq_len():
    b = _batches()  # token t has value t, so a row identifies its window
    assert b.num_windows == 100
    rows = b.batch(0)
    assert rows.shape == (8, 11) and rows.dtype == np.int32
    starts = rows[:, 0]
    assert np.all(starts % 10 == 0)
    np.testing.assert_array_equal(rows, starts[:, None] + np.arange(11))


def test_every_epoch_visits_each_window_once():
    b = _batches(global_batch=7)  # 100 windows, 7 rows: batches straddle epoch boundaries
    order = np.concatenate([b.batch(s)[:, 0] // 10 for s in range(3 * 100 // 7 + 1)])
    for epoch in range(3):
        assert sorted(order[epoch * 100 : (epoch + 1) * 100]) == list(range(100))
    assert not np.array_equal(order[:100], order[100:200])  # a fresh order each epoch


def test_batch_is_a_pure_function_of_seed_and_step():
    a, b = _batches(), _batches()
    for step in (5, 0, 123, 5):  # any order, fresh objects: same rows
        np.testing.assert_array_equal(a.batch(step), b.batch(step))
    assert not np.array_equal(a.batch(0), _batches(seed=4).batch(0))
    # resume: the state round-trips through JSON and a new iterator continues identically
    state = json.loads(json.dumps(a.state(37)))
    resumed = _batches()
    step = resumed.check_state(state)
    assert step == 37
    np.testing.assert_array_equal(resumed.batch(step), a.batch(37))


@pytest.mark.parametrize("count", [1, 2, 4, 8])
def test_host_batches_concatenate_to_the_global_batch(count):
    b = _batches()
    hosts = [b.host_batch(11, index, count) for index in range(count)]
    np.testing.assert_array_equal(np.concatenate(hosts), b.batch(11))


def test_host_batch_errors():
    with pytest.raises(ValueError, match="not divisible by process_count 3"):
        _batches().host_batch(0, 0, 3)
    with pytest.raises(ValueError, match="process_index 2"):
        _batches().host_batch(0, 2, 2)
    assert _batches().host_batch(0).shape == (8, 11)  # single process: the whole batch


@pytest.mark.parametrize(
    ("mesh_shape", "spec"),
    [((8,), P("data")), ((2, 4), P(("data", "fsdp"))), ((2, 4), P("data")), ((2, 4), P())],
)
def test_device_batch_matches_global_batch(mesh_shape, spec):
    names = ("data", "fsdp")[: len(mesh_shape)]
    mesh = jax.make_mesh(mesh_shape, names, axis_types=(AxisType.Auto,) * len(mesh_shape))
    b = _batches()
    array = b.device_batch(9, NamedSharding(mesh, spec))
    expected = b.batch(9)
    assert array.shape == expected.shape and array.sharding.spec == spec
    np.testing.assert_array_equal(np.asarray(array), expected)
    for shard in array.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), expected[shard.index])


def test_state_mismatch_names_the_field():
    state = _batches().state(12)
    for other, field in [
        (_batches(corpus_fingerprint="corpus-b"), "corpus_fingerprint"),
        (_batches(tokenizer_hash="tok-b"), "tokenizer_hash"),
        (_batches(seq_len=9), "seq_len"),
        (_batches(global_batch=4), "global_batch"),
        (_batches(seed=0), "seed"),
        (_batches(n_tokens=1002), "num_tokens"),
    ]:
        with pytest.raises(ValueError, match=f"does not match this data: {field}: saved"):
            other.check_state(state)
    with pytest.raises(ValueError, match=r"missing fields \['seed'\]"):
        _batches().check_state({k: v for k, v in state.items() if k != "seed"})


def test_stream_shorter_than_a_window_raises():
    with pytest.raises(ValueError, match="shorter than one window of 11 tokens"):
        _batches(n_tokens=10)
    assert _batches(n_tokens=11, global_batch=4).batch(2).shape == (4, 11)  # one window, repeated per epoch


# ---------------------------------------------------------------- evaluation helpers


def test_unigram_entropy_hand_values():
    assert data.unigram_entropy(np.array([0, 1, 2, 3] * 5)) == pytest.approx(math.log(4), rel=1e-12)
    # p = (1/2, 1/4, 1/4): H = 1/2 ln 2 + 2 * 1/4 ln 4 = 1.5 ln 2; unused ids (7 absent) contribute nothing
    assert data.unigram_entropy(np.array([0, 0, 1, 9])) == pytest.approx(1.5 * math.log(2), rel=1e-12)
    assert data.unigram_entropy(np.array([5, 5, 5])) == 0.0
    with pytest.raises(ValueError, match="non-empty"):
        data.unigram_entropy(np.array([], np.int32))


def test_eval_windows_spread_over_the_stream():
    windows = data.eval_windows(np.arange(1001), 10, 4)
    np.testing.assert_array_equal(windows[:, 0], [0, 250, 500, 750])
    np.testing.assert_array_equal(windows, windows[:, :1] + np.arange(11))
    assert data.eval_windows(np.arange(31), 10, 100).shape == (3, 11)
    with pytest.raises(ValueError, match="shorter than one window"):
        data.eval_windows(np.arange(5), 10, 4)


# ---------------------------------------------------------------- end to end


def test_prepare_end_to_end_with_cache(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    for d in _docs(30):
        (src / d.name.replace("/", "_")).write_text(d.text, encoding="utf-8")
    cache = tmp_path / "cache"
    bundle = data.prepare(src, seq_len=16, global_batch=4, vocab_size=300, seed=1, val_fraction=0.2, cache_dir=cache)
    train_docs, val_docs = data.split(data.load_documents(src), 0.2)
    tok = bundle.tokenizer
    assert bundle.fingerprint == data.corpus_fingerprint(data.load_documents(src))
    assert bundle.train.state(0)["corpus_fingerprint"] == data.corpus_fingerprint(train_docs)
    assert bundle.train.state(0)["tokenizer_hash"] == tok.hash
    expected_val = [i for d in val_docs for i in [*tok.encode(d.text), tok.eos_id]]
    assert bundle.val_tokens.tolist() == expected_val
    assert bundle.val_unigram_entropy == pytest.approx(data.unigram_entropy(np.array(expected_val)))
    assert bundle.train.batch(0).shape == (4, 17) and bundle.train.batch(0).max() < tok.vocab_size
    assert sorted(p.name for p in cache.iterdir()) == ["tokenizers", "tokens"]
    again = loader.prepare(src, seq_len=16, global_batch=4, vocab_size=300, seed=1, val_fraction=0.2, cache_dir=cache)
    assert again.train.check_state(bundle.train.state(5)) == 5
    np.testing.assert_array_equal(again.train.batch(5), bundle.train.batch(5))
