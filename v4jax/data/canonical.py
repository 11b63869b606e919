"""Tokenizer compression for Engram (architecture.md §9.2.1): every token id -> a canonical id.

Each id's decoded text is normalised and identical normal forms share one canonical id; DeepSeek's
release reports 129,280 -> 99,092 ids (−23%). The normaliser is the `tokenizers` normaliser sequence of
DeepSeek's Engram demo (built with the same library, so its Unicode tables match too):

    NFKC -> NFD -> StripAccents (drops combining marks Mn, Mc, Me) -> Lowercase (per character)
         -> runs of [ \\t\\r\\n] become one space -> a text that is exactly " " is protected (U+E000)
         -> Strip (Unicode White_Space at both ends) -> U+E000 (the protection, or a literal one) becomes " "

The key of a token is its normal form, or the decoded text itself when the normal form is empty; a
token whose decoded text contains U+FFFD (an incomplete UTF-8 sequence of a byte-level BPE) keeps its
raw vocabulary string as key instead. Canonical ids are numbered by first occurrence in id order
0, 1, 2, ..., so the map is deterministic and canonical_id[t] <= t.

In use: `with_canonical_map(cfg, params, tokenizer)` sets `engram_compressed_vocab_size` to the tokenizer's V'
and writes its map into every Engram layer's CONSTANTS leaf `canonical` (`experiments/train.py` does this for
every config with Engram); `compressed_config` and `install_canonical` are its two halves (a resumed run
needs only the config).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
from flax import traverse_util
from tokenizers import Regex, normalizers

from v4jax.config import ModelConfig
from v4jax.data.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
_SENTINEL = "\ue000"  # protects a lone-space token from Strip (a private-use character)


@functools.cache
def _normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
            normalizers.Replace(Regex(r"^ $"), _SENTINEL),
            normalizers.Strip(),
            normalizers.Replace(_SENTINEL, " "),
        ]
    )


def normalize_token_text(text: str) -> str:
    """The demo's normal form of one decoded token (may be empty)."""
    return _normalizer().normalize_str(text)


def token_key(text: str, raw_token: str | None = None) -> str:
    """The string a token is grouped by: `raw_token` (else `text`) if `text` holds U+FFFD, else the normal
    form of `text`, or `text` itself when that normal form is empty."""
    if REPLACEMENT_CHAR in text:
        return raw_token if raw_token is not None else text
    return normalize_token_text(text) or text


def canonical_ids(
    token_strings: Sequence[str], raw_tokens: Sequence[str | None] | None = None
) -> tuple[np.ndarray, int]:
    """Canonical ids of a vocabulary.

    Args:
      token_strings: the decoded text of every id 0..V-1 (decode([id]) with special tokens kept).
      raw_tokens: the vocabulary string of every id (`convert_ids_to_tokens`), used as key of tokens whose
        text holds U+FFFD; without it such tokens are keyed by their text.

    Returns:
      (int32 [V] canonical id of each token, V' the number of canonical ids).
    """
    if raw_tokens is not None and len(raw_tokens) != len(token_strings):
        raise ValueError(f"raw_tokens has {len(raw_tokens)} entries, token_strings {len(token_strings)}")
    key_to_id: dict[str, int] = {}
    out = np.empty(len(token_strings), dtype=np.int32)
    for tid, text in enumerate(token_strings):
        key = token_key(text, None if raw_tokens is None else raw_tokens[tid])
        out[tid] = key_to_id.setdefault(key, len(key_to_id))
    return out, len(key_to_id)


def canonical_ids_from_tokenizer(tokenizer: Tokenizer, vocab_size: int | None = None) -> tuple[np.ndarray, int]:
    """`canonical_ids` of a v4jax `Tokenizer` (trained BPE or any tokenizer.json).

    Every id is decoded alone with special tokens kept (`Tokenizer.decode([id])`). `vocab_size` (default
    the tokenizer's) may exceed the tokenizer: ids it does not know decode to "" and share that key.
    The result is the CONSTANTS value `canonical` of every Engram layer (`v4jax.layers.engram`) and V' is
    `ModelConfig.engram_compressed_vocab_size`.
    """
    backend = tokenizer._backend
    n = tokenizer.vocab_size if vocab_size is None else vocab_size
    known = min(n, tokenizer.vocab_size)
    texts = backend.decode_batch([[i] for i in range(known)], skip_special_tokens=False)
    raws = [backend.id_to_token(i) for i in range(known)]
    texts += [""] * (n - known)
    raws += [None] * (n - known)
    return canonical_ids(texts, raws)


CANONICAL_LEAF = "canonical"  # the CONSTANTS leaf of every Engram layer (`v4jax.layers.engram.Engram`)


def compressed_config(cfg: ModelConfig, tokenizer: Tokenizer) -> tuple[ModelConfig, np.ndarray | None]:
    """(cfg with `engram_compressed_vocab_size` = the tokenizer's V', its canonical map int32 [vocab_size]);
    (cfg, None) unchanged when cfg has no Engram layer.

    A nonzero `engram_compressed_vocab_size` already in cfg must equal the tokenizer's V' (another value would
    hash with multipliers that do not belong to this map)."""
    if not cfg.engram_layer_ids:
        return cfg, None
    ids, v_c = canonical_ids_from_tokenizer(tokenizer, cfg.vocab_size)
    if cfg.engram_compressed_vocab_size not in (0, v_c):
        raise ValueError(
            f"ModelConfig.engram_compressed_vocab_size={cfg.engram_compressed_vocab_size}, but the tokenizer's "
            f"canonical map has V'={v_c} ids (vocab_size={cfg.vocab_size}); leave it 0 to take the tokenizer's"
        )
    return cfg.replace(engram_compressed_vocab_size=v_c), ids


def install_canonical(params: dict[str, Any], canonical: np.ndarray) -> dict[str, Any]:
    """`params` with every leaf named `canonical` (shape [..., vocab], leading axes the stacked layers) set to
    `canonical` int32 [vocab] broadcast over those axes; other leaves are shared, not copied.

    Raises if `params` holds no such leaf or a leaf's last axis is not len(canonical)."""
    canonical = np.asarray(canonical, np.int32)
    if canonical.ndim != 1:
        raise ValueError(f"canonical map must have shape [vocab], got {canonical.shape}")
    flat = traverse_util.flatten_dict(params)
    found = [path for path in flat if path[-1] == CANONICAL_LEAF]
    if not found:
        raise ValueError(f"params hold no {CANONICAL_LEAF!r} leaf (a config without Engram layers?)")
    for path in found:
        shape = tuple(flat[path].shape)
        if shape[-1:] != canonical.shape:
            raise ValueError(
                f"params {'/'.join(path)} has shape {shape}, the canonical map {canonical.shape}: vocabularies differ"
            )
        flat[path] = np.broadcast_to(canonical, shape).copy()
    return traverse_util.unflatten_dict(flat)


def with_canonical_map(
    cfg: ModelConfig, params: dict[str, Any], tokenizer: Tokenizer
) -> tuple[ModelConfig, dict[str, Any]]:
    """Tokenizer compression in use: (cfg with V' = the tokenizer's compressed vocabulary, params with its
    canonical map in every Engram layer); both unchanged when cfg has no Engram. The params' shapes do not
    depend on V', so `params` may come from `init_params` of cfg before the change; build the training step
    and the hash plan from the returned cfg."""
    cfg, canonical = compressed_config(cfg, tokenizer)
    if canonical is None:
        return cfg, params
    return cfg, install_canonical(params, canonical)
