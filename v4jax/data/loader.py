"""Token streams, deterministic batches, per-host sharding and the resumable iterator state.

Packing: every document's tokens followed by the end-of-text id, concatenated into one int32 stream (cached
at `<cache_dir>/tokens-<corpus fingerprint[:16]>-<tokenizer hash[:16]>.npy`; encoding the standard library
takes a few seconds, loading the cache milliseconds).

Windows: window `w` is `tokens[w*T : w*T + T + 1]` (T = `seq_len`), so neighbouring windows share one token and
every next-token pair of the stream is a label exactly once per epoch; the trainer uses `[:, :-1]` as inputs
and `[:, 1:]` as labels. There are W = (len(tokens) - 1) // T windows; the tail that does not fill one is
dropped.

Order: row `r` of step `s` is flat position k = s*B + r (B = `global_batch`), in epoch k // W at position
k % W of that epoch's permutation, drawn by `np.random.default_rng([seed, epoch])`. So `batch(step)` is a pure
function of (seed, step): resuming at a step reproduces the batches bit for bit, epochs roll over seamlessly
and a batch may straddle two epochs. Each epoch visits every window exactly once. (numpy promises the
`Generator` stream only within a numpy version; the state records the corpus and tokenizer, not numpy's.)

Hosts: `host_batch` gives process p the rows [p*B/P, (p+1)*B/P) of the global batch; `device_batch` builds the
global `jax.Array` from the rows the given sharding places on this process's devices.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence

import jax
import numpy as np

from v4jax.data.corpus import Document, corpus_fingerprint, load_documents, split
from v4jax.data.tokenizer import Tokenizer, atomic_write, cache_root, train_bpe

STATE_FIELDS = ("seed", "seq_len", "global_batch", "step", "corpus_fingerprint", "tokenizer_hash", "num_tokens")


def pack(docs: Sequence[Document], tokenizer: Tokenizer, cache_dir: str | pathlib.Path | None = None) -> np.ndarray:
    """One token stream: each document's ids followed by `tokenizer.eos_id`, cached on disk.

    Args:
      docs: documents, packed in order.
      tokenizer: the tokenizer (its `hash` keys the cache together with the corpus fingerprint).
      cache_dir: cache directory (default `cache_root()/tokens`).

    Returns:
      int32 [N], N = sum of document lengths in tokens + len(docs).
    """
    if not docs:
        raise ValueError("cannot pack an empty list of documents")
    cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else cache_root() / "tokens"
    path = cache_dir / f"tokens-{corpus_fingerprint(docs)[:16]}-{tokenizer.hash[:16]}.npy"
    if path.is_file():
        return np.load(path, allow_pickle=False)
    if tokenizer.vocab_size > np.iinfo(np.int32).max:
        raise ValueError(f"vocab_size {tokenizer.vocab_size} does not fit int32 token ids")
    eos = np.array([tokenizer.eos_id], np.int32)
    pieces = [part for ids in tokenizer.encode_batch([doc.text for doc in docs]) for part in (ids, eos)]
    tokens = np.concatenate([np.asarray(piece, np.int32) for piece in pieces])

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, tokens, allow_pickle=False)

    atomic_write(path, write)
    return tokens


def _check_stream(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"expected a 1-D integer token stream, got {tokens.dtype} {tokens.shape}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if tokens.size < seq_len + 1:
        raise ValueError(f"token stream of {tokens.size} tokens is shorter than one window of {seq_len + 1} tokens")
    return tokens


def _windows(tokens: np.ndarray, seq_len: int, index: np.ndarray) -> np.ndarray:
    """Windows `index` of the stream: int32 [len(index), seq_len + 1]."""
    return tokens[index[:, None] * seq_len + np.arange(seq_len + 1)].astype(np.int32, copy=False)


class Batches:
    """Deterministic global batches of windows of a token stream (see the module docstring for the order).

    Args:
      tokens: int [N] token stream.
      seq_len: T, tokens per training sequence (windows hold T + 1).
      global_batch: B, rows per step over all hosts.
      seed: non-negative int; with the epoch it seeds each epoch's permutation.
      corpus_fingerprint, tokenizer_hash: identify the stream in the iterator state.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        *,
        seq_len: int,
        global_batch: int,
        seed: int,
        corpus_fingerprint: str,
        tokenizer_hash: str,
    ):
        self.tokens = _check_stream(tokens, seq_len)
        if global_batch < 1:
            raise ValueError(f"global_batch must be >= 1, got {global_batch}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.seq_len = seq_len
        self.global_batch = global_batch
        self.seed = seed
        self.corpus_fingerprint = corpus_fingerprint
        self.tokenizer_hash = tokenizer_hash
        self.num_windows = (self.tokens.size - 1) // seq_len
        self._perms: dict[int, np.ndarray] = {}

    @property
    def steps_per_epoch(self) -> float:
        """Steps that visit W windows (fractional when B does not divide W)."""
        return self.num_windows / self.global_batch

    def permutation(self, epoch: int) -> np.ndarray:
        """The window order of `epoch`: a permutation of range(W), int64 [W]."""
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a batch touches at most two epochs when B <= W
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
        return self._perms[epoch]

    def rows(self, step: int, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the global batch of `step`: int32 [stop - start, T + 1]."""
        if step < 0 or not 0 <= start <= stop <= self.global_batch:
            raise ValueError(f"invalid step {step} / rows [{start}, {stop}) of a batch of {self.global_batch}")
        flat = step * self.global_batch + np.arange(start, stop, dtype=np.int64)
        epochs, positions = np.divmod(flat, self.num_windows)
        index = np.empty_like(flat)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            index[mask] = self.permutation(int(epoch))[positions[mask]]
        return _windows(self.tokens, self.seq_len, index)

    def batch(self, step: int) -> np.ndarray:
        """The global batch of `step`: int32 [B, T + 1]."""
        return self.rows(step, 0, self.global_batch)

    def host_batch(self, step: int, process_index: int | None = None, process_count: int | None = None) -> np.ndarray:
        """This process's contiguous share of `batch(step)`: int32 [B / process_count, T + 1]."""
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
        if self.global_batch % process_count:
            raise ValueError(f"global_batch {self.global_batch} is not divisible by process_count {process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        per_host = self.global_batch // process_count
        return self.rows(step, process_index * per_host, (process_index + 1) * per_host)

    def device_batch(self, step: int, sharding: jax.sharding.Sharding) -> jax.Array:
        """`batch(step)` as a global array with `sharding`, built from this process's rows only.

        The rows are those the sharding places on this process's devices (for a batch axis split over
        processes in process order, exactly `host_batch(step)`), concatenated in order of their row ranges.
        """
        shape = (self.global_batch, self.seq_len + 1)
        indices = sharding.addressable_devices_indices_map(shape).values()
        ranges = sorted({index[0].indices(self.global_batch)[:2] for index in indices})
        local = np.concatenate([self.rows(step, start, stop) for start, stop in ranges])
        return jax.make_array_from_process_local_data(sharding, local, shape)

    def state(self, step: int) -> dict[str, int | str]:
        """JSON-serialisable iterator position: the next step to run plus what identifies the stream."""
        values = (
            self.seed,
            self.seq_len,
            self.global_batch,
            step,
            self.corpus_fingerprint,
            self.tokenizer_hash,
            int(self.tokens.size),
        )
        return dict(zip(STATE_FIELDS, values, strict=True))

    def check_state(self, state: dict[str, int | str]) -> int:
        """The step recorded in `state`, after checking that it was saved by an iterator over the same data.

        Raises:
          ValueError naming every missing, unknown or differing field (seed, shapes, corpus, tokenizer).
        """
        missing = sorted(set(STATE_FIELDS) - set(state))
        unknown = sorted(set(state) - set(STATE_FIELDS))
        if missing or unknown:
            raise ValueError(f"data iterator state has missing fields {missing} / unknown fields {unknown}")
        current = self.state(state["step"])
        differ = [f"{k}: saved {state[k]!r}, current {current[k]!r}" for k in STATE_FIELDS if state[k] != current[k]]
        if differ:
            raise ValueError("data iterator state does not match this data: " + "; ".join(differ))
        return int(state["step"])


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy of the token frequencies of `tokens` (int [N]) in nats/token: -sum_v p_v ln p_v.

    The loss of the best context-free predictor fitted to these very tokens, so a trained model's loss on
    them should be well below it.
    """
    tokens = np.asarray(tokens)
    if tokens.size == 0 or tokens.min() < 0:
        raise ValueError("unigram entropy needs a non-empty stream of non-negative token ids")
    counts = np.bincount(tokens.ravel())
    p = counts[counts > 0] / tokens.size
    return float(-(p * np.log(p)).sum())


def eval_windows(tokens: np.ndarray, seq_len: int, max_windows: int) -> np.ndarray:
    """Up to `max_windows` windows spread evenly over the stream (all of them if there are fewer).

    Returns:
      int32 [N, seq_len + 1], windows in stream order, laid out as in `Batches`.
    """
    tokens = _check_stream(tokens, seq_len)
    if max_windows < 1:
        raise ValueError(f"max_windows must be >= 1, got {max_windows}")
    total = (tokens.size - 1) // seq_len
    n = min(total, max_windows)
    return _windows(tokens, seq_len, np.arange(n, dtype=np.int64) * total // n)


@dataclasses.dataclass(frozen=True)
class DataBundle:
    """Everything training needs from the data side.

    Attributes:
      tokenizer: the tokenizer (its `vocab_size` bounds the model's).
      train: batches over the training stream.
      val_tokens: int32 [N_val] validation stream (see `eval_windows`).
      fingerprint: `corpus_fingerprint` of the whole corpus before the split.
      val_unigram_entropy: `unigram_entropy(val_tokens)`, nats/token.
    """

    tokenizer: Tokenizer
    train: Batches
    val_tokens: np.ndarray
    fingerprint: str
    val_unigram_entropy: float


def prepare(
    source: str | pathlib.Path | None = None,
    *,
    seq_len: int,
    global_batch: int,
    vocab_size: int = 2048,
    seed: int = 0,
    val_fraction: float = 0.05,
    tokenizer_path: str | pathlib.Path | None = None,
    cache_dir: str | pathlib.Path | None = None,
) -> DataBundle:
    """Load, split, tokenize (train or load a tokenizer) and pack a corpus.

    Args:
      source: see `load_documents` (None: the standard library).
      seq_len, global_batch, seed: of the training `Batches`.
      vocab_size: of the BPE trained on the training split; unused when `tokenizer_path` is given.
      val_fraction: see `split`.
      tokenizer_path: a `tokenizer.json` to use instead of training one.
      cache_dir: cache root (default `cache_root()`), holding `tokenizers/` and `tokens/`.
    """
    root = pathlib.Path(cache_dir) if cache_dir is not None else cache_root()
    docs = load_documents(source)
    train_docs, val_docs = split(docs, val_fraction)
    if tokenizer_path is not None:
        tokenizer = Tokenizer.from_file(tokenizer_path)
    else:
        tokenizer = train_bpe(train_docs, vocab_size, root / "tokenizers")
    train_tokens = pack(train_docs, tokenizer, root / "tokens")
    val_tokens = pack(val_docs, tokenizer, root / "tokens")
    batches = Batches(
        train_tokens,
        seq_len=seq_len,
        global_batch=global_batch,
        seed=seed,
        corpus_fingerprint=corpus_fingerprint(train_docs),
        tokenizer_hash=tokenizer.hash,
    )
    return DataBundle(tokenizer, batches, val_tokens, corpus_fingerprint(docs), unigram_entropy(val_tokens))
