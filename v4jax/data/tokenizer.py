"""Tokenizers: a byte-level BPE trained on the training split (cached on disk), or any `tokenizer.json`.

The trained BPE is GPT-2 style: the ByteLevel pre-tokenizer maps every byte to a printable symbol and splits
on the GPT-2 regex, its initial alphabet is all 256 byte symbols (so every byte string is encodable and
`decode(encode(text)) == text` for any text), and one special token, `<|endoftext|>` (id 0), separates
documents. Training is deterministic; the result is cached at
`<cache_dir>/bpe-<corpus fingerprint[:16]>-<vocab_size>.json`, where `cache_dir` defaults to
`$V4JAX_CACHE/tokenizers` (`~/.cache/v4jax/tokenizers` when the variable is unset).

Special-token strings inside the text are encoded as ordinary text, so the end-of-text id appears in a
token stream only where the packer puts it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import uuid
from collections.abc import Callable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from v4jax.data.corpus import Document, corpus_fingerprint

EOS_TOKEN = "<|endoftext|>"
# End-of-document tokens of published tokenizers, tried in order when a tokenizer.json names none.
EOS_CANDIDATES = (EOS_TOKEN, "<｜end▁of▁sentence｜>", "</s>", "<|end_of_text|>", "<eos>")


def cache_root() -> pathlib.Path:
    """Root of the on-disk caches: `$V4JAX_CACHE`, or `~/.cache/v4jax`."""
    return pathlib.Path(os.environ.get("V4JAX_CACHE") or pathlib.Path.home() / ".cache" / "v4jax").expanduser()


def atomic_write(path: pathlib.Path, write: Callable[[str], object]) -> None:
    """Call `write(tmp_path)`, then rename the temporary file to `path` (readers never see a partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _configured_eos(path: pathlib.Path) -> str | None:
    """The `eos_token` of a `tokenizer_config.json` next to `path`, if there is one."""
    config = path.with_name("tokenizer_config.json")
    if not config.is_file():
        return None
    eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos


class Tokenizer:
    """A `tokenizers.Tokenizer` with a designated end-of-text token; encodes without BOS/EOS templates.

    Attributes:
      eos_token, eos_id: the document separator.
      vocab_size: the number of embedding rows a model needs (largest id + 1).
      hash: sha256 of the tokenizer's JSON serialisation (identifies it in cache keys and iterator states).
    """

    def __init__(self, backend: tokenizers.Tokenizer, eos_token: str):
        eos_id = backend.token_to_id(eos_token)
        if eos_id is None:
            raise ValueError(f"end-of-text token {eos_token!r} is not in the tokenizer's vocabulary")
        self.hash = hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()
        backend.encode_special_tokens = True
        self._backend = backend
        self.eos_token = eos_token
        self.eos_id = eos_id
        self.vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens added)."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text, in parallel threads."""
        return [enc.ids for enc in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens included."""
        return self._backend.decode(list(ids), skip_special_tokens=False)

    def to_json(self) -> str:
        """The tokenizer.json content (what `save` writes)."""
        return self._backend.to_str()

    def save(self, path: str | pathlib.Path) -> None:
        """Write the tokenizer.json to `path` atomically."""
        atomic_write(pathlib.Path(path), lambda tmp: self._backend.save(tmp))

    @classmethod
    def from_file(cls, path: str | pathlib.Path, eos_token: str | None = None) -> Tokenizer:
        """Load any `tokenizer.json`.

        The end-of-text token is `eos_token` if given, else the `eos_token` of a `tokenizer_config.json`
        beside the file (Hugging Face layout), else the first of `EOS_CANDIDATES` in the vocabulary.
        """
        path = pathlib.Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        backend = tokenizers.Tokenizer.from_file(str(path))
        eos_token = eos_token or _configured_eos(path)
        if eos_token is None:
            eos_token = next((tok for tok in EOS_CANDIDATES if backend.token_to_id(tok) is not None), None)
        if eos_token is None:
            raise ValueError(
                f"{path} has none of the end-of-text tokens {EOS_CANDIDATES}; pass eos_token= explicitly"
            )
        return cls(backend, eos_token)


def train_bpe(docs: Sequence[Document], vocab_size: int, cache_dir: str | pathlib.Path | None = None) -> Tokenizer:
    """Byte-level BPE with `vocab_size` entries trained on `docs`, or its cached copy.

    Args:
      docs: the training documents; their `corpus_fingerprint` keys the cache.
      vocab_size: total entries including the 256 byte symbols and `<|endoftext|>`. A corpus with too few
        distinct pairs stops merging early, giving a smaller vocabulary.
      cache_dir: where `bpe-<fingerprint[:16]>-<vocab_size>.json` lives (default `cache_root()/tokenizers`).
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(f"vocab_size {vocab_size} < {len(alphabet) + 1} (256 byte symbols + {EOS_TOKEN})")
    if not docs:
        raise ValueError("cannot train a tokenizer on an empty corpus")
    cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else cache_root() / "tokenizers"
    path = cache_dir / f"bpe-{corpus_fingerprint(docs)[:16]}-{vocab_size}.json"
    if path.is_file():
        return Tokenizer.from_file(path, eos_token=EOS_TOKEN)
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_TOKEN], initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator((doc.text for doc in docs), trainer, length=len(docs))
    tokenizer = Tokenizer(backend, EOS_TOKEN)
    tokenizer.save(path)
    return tokenizer
