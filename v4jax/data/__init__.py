"""The training data pipeline: corpus -> split -> tokenizer -> packed token stream -> deterministic batches.

1. `load_documents(source)` (corpus.py): the interpreter's standard-library source by default (no download),
   or a text file, a JSONL file (`text` field per line) or a directory of text files.
2. `split(docs, val_fraction)`: train / validation by a stable hash of each document's name.
3. `train_bpe(train_docs, vocab_size)` (tokenizer.py): byte-level BPE, cached by corpus fingerprint and vocab
   size; or `Tokenizer.from_file("tokenizer.json")` for any published tokenizer.
4. `pack(docs, tokenizer)` (loader.py): one int32 stream, each document followed by the end-of-text id, cached.
5. `Batches(stream, seq_len=, global_batch=, seed=, ...)`: `batch(step)` [B, T + 1] is a pure function of
   (seed, step), so `state(step)` / `check_state(state)` give bit-exact resume; `host_batch` and
   `device_batch` split the global batch over processes and devices.

`prepare(source, seq_len=, global_batch=, ...)` runs steps 1-5 and returns a `DataBundle` with the validation
stream and its unigram entropy (the loss a context-free model reaches). Caches live under `$V4JAX_CACHE`
(default `~/.cache/v4jax`).
"""

from v4jax.data.corpus import Document, corpus_fingerprint, load_documents, split, stdlib_files
from v4jax.data.loader import Batches, DataBundle, eval_windows, pack, prepare, unigram_entropy
from v4jax.data.tokenizer import EOS_TOKEN, Tokenizer, cache_root, train_bpe

__all__ = [
    "EOS_TOKEN",
    "Batches",
    "DataBundle",
    "Document",
    "Tokenizer",
    "cache_root",
    "corpus_fingerprint",
    "eval_windows",
    "load_documents",
    "pack",
    "prepare",
    "split",
    "stdlib_files",
    "train_bpe",
    "unigram_entropy",
]
