"""A tiered inference cache: recent positions on the device, older blocks in host memory or on disk.

The position-indexed parts of the cache (MLA's c_kv / k_rope / V3.2 index keys, one slot per token; V4's
compressed entries, one slot per m tokens) grow with the context; everything else (V4 windows and
compressor rings) is fixed-size and stays on the device. Per tiered leaf, slots are split at a boundary:

    [ cold: blocks of `block` tokens, host (`pinned_host` memory) or disk (np.memmap) | hot: on the device ]

The boundary only moves forward, by whole blocks, keeping every row of the batch at least `device_tokens`
past it, so new tokens are always written to the hot part. Each decode step brings the cold blocks back to the
device, runs the ordinary jitted step on the joined cache, and keeps only the hot part afterwards: the
tokens are exactly those of the all-on-device cache, the resident device footprint is the hot part, and
the price is the host-to-device copy per step (`stats()` reports the bytes per tier). The step itself
still sees the whole joined cache; attending block by block over the cold tier (so the transient copy is
bounded too) is the next step.

    tokens, stats = generate_tiered(cfg, params, prompts, max_new_tokens, Tiers(device_tokens=256), ...)
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from v4jax.config import ModelConfig
from v4jax.sampling import engine
from v4jax.sampling.generate import check_prompts, prefill_prompts, sample_and_append
from v4jax.sampling.samplers import check_settings

POSITION_INDEXED = ("c_kv", "k_rope", "index_k", "entries")
SLOT_AXIS = 1  # [B, S, ...] in a layer's cache


@dataclasses.dataclass(frozen=True)
class Tiers:
    """Where cache blocks live: the last `device_tokens` (at least) on the device, older ones in blocks of
    `block` tokens in host memory, or memory-mapped under `spill_dir` when it is given."""

    device_tokens: int = 256
    block: int = 64
    spill_dir: str | None = None

    def __post_init__(self):
        if self.block < 1 or self.device_tokens < 1:
            raise ValueError(f"Tiers.block={self.block} and Tiers.device_tokens={self.device_tokens} must be >= 1")


def _tiered(path) -> bool:
    """Whether a cache leaf grows with the context (position-indexed: it is tiered)."""
    return any(getattr(key, "key", getattr(key, "name", None)) in POSITION_INDEXED for key in path)


def slot_granularity(cfg: ModelConfig) -> int:
    """Cache capacities and tier blocks are multiples of this: every compression rate divides it."""
    return int(np.lcm(cfg.compress_rate_csa, cfg.compress_rate_hca)) if cfg.is_v4 else 1


class TieredCache:
    """An engine cache (`engine.new_cache`) whose position-indexed leaves are split into a cold tier and a
    device tier; its capacity must be a multiple of `slot_granularity(cfg)`."""

    def __init__(self, cfg: ModelConfig, cache: dict[str, Any], capacity: int, tiers: Tiers):
        unit = slot_granularity(cfg)
        if capacity % unit or tiers.block % unit:
            raise ValueError(f"capacity {capacity} and Tiers.block={tiers.block} must be multiples of {unit} "
                             "(the compression rates)")  # fmt: skip
        self.tiers = tiers
        device = jax.devices()[0]
        self._host = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
        self._on_device = jax.sharding.SingleDeviceSharding(device, memory_kind="device")
        self._dir = None
        if tiers.spill_dir is not None:
            os.makedirs(tiers.spill_dir, exist_ok=True)
            self._dir = tempfile.mkdtemp(prefix="v4jax-cache-", dir=tiers.spill_dir)
        leaves, self._treedef = jax.tree_util.tree_flatten_with_path(cache)
        # tokens per slot of each tiered leaf (1 per-token, m for entries); None: not tiered
        self._rates = [capacity // leaf.shape[SLOT_AXIS] if _tiered(path) else None for path, leaf in leaves]
        # committed to the device like the cold blocks brought back, so every step compiles to one program
        self.hot = [jax.device_put(leaf, self._on_device) for _, leaf in leaves]
        self.cold: list[list[Any]] = [[] for _ in leaves]  # per leaf: its cold blocks, oldest first
        self.boundary = 0  # tokens [0, boundary) are cold in every tiered leaf

    def joined(self) -> dict[str, Any]:
        """The whole cache on the device (cold blocks copied back) for one step."""
        back = [[jax.device_put(np.asarray(x) if self._dir else x, self._on_device) for x in c] for c in self.cold]
        return jax.tree_util.tree_unflatten(self._treedef, _join(back, self.hot))

    def update(self, cache: dict[str, Any]) -> None:
        """Take the cache after a step: keep its hot part, and move whole blocks to the cold tier while every
        row stays `device_tokens` past the boundary."""
        lengths = np.asarray(cache["length"])
        tokens = max(0, int(lengths.min()) - self.boundary - self.tiers.device_tokens) // self.tiers.block
        tokens *= self.tiers.block  # tokens that turn cold now
        cold_slots = tuple(None if r is None else self.boundary // r for r in self._rates)
        moved = tuple(None if r is None else tokens // r for r in self._rates)
        self.hot, blocks = _split(jax.tree.leaves(cache), cold_slots, moved)
        if tokens:
            for i, block in enumerate(blocks):
                if block is not None:
                    self._keep_cold(i, block)
            self.boundary += tokens

    def _keep_cold(self, i: int, block: jax.Array) -> None:
        """Append a block to leaf i's cold tier: pinned host memory, or a memory-mapped file."""
        if self._dir is None:
            self.cold[i].append(jax.device_put(block, self._host))
            return
        path = os.path.join(self._dir, f"leaf{i}_block{len(self.cold[i])}.npy")
        mm = np.lib.format.open_memmap(path + ".tmp", mode="w+", dtype=block.dtype, shape=block.shape)
        mm[...] = np.asarray(block)
        mm.flush()
        del mm
        os.replace(path + ".tmp", path)
        self.cold[i].append(np.load(path, mmap_mode="r"))

    def stats(self) -> dict[str, int]:
        """Bytes held per tier: 'device', 'host' and 'disk'."""
        device = sum(int(x.nbytes) for x in self.hot)
        cold = sum(int(x.nbytes) for blocks in self.cold for x in blocks)
        return {"device": device, "host": 0 if self._dir else cold, "disk": cold if self._dir else 0}


@jax.jit
def _join(cold: list[list[jax.Array]], hot: list[jax.Array]) -> list[jax.Array]:
    """Each leaf's cold blocks (on the device again) and hot part, joined along the slot axis."""
    return [jnp.concatenate([*c, h], axis=SLOT_AXIS) if c else h for c, h in zip(cold, hot, strict=True)]


@functools.partial(jax.jit, static_argnums=(1, 2))
def _split(leaves: list[jax.Array], cold_slots: tuple, moved: tuple) -> tuple[list, list]:
    """(hot parts, blocks that turn cold): leaf i drops its first cold_slots[i] slots and hands over the next
    moved[i] (None: the leaf is not tiered, all hot)."""
    hot, blocks = [], []
    for leaf, start, n in zip(leaves, cold_slots, moved, strict=True):
        if start is None:
            hot.append(leaf)
            blocks.append(None)
            continue
        size = leaf.shape[SLOT_AXIS]
        blocks.append(jax.lax.slice_in_dim(leaf, start, start + n, axis=SLOT_AXIS) if n else None)
        hot.append(jax.lax.slice_in_dim(leaf, start + n, size, axis=SLOT_AXIS))
    return hot, blocks


def generate_tiered(
    cfg: ModelConfig,
    params: dict[str, Any],
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    tiers: Tiers,
    *,
    temperature: float = 0.0,
    key: jax.Array | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    prefill_chunk: int = engine.PREFILL_CHUNK,
) -> tuple[list[list[int]], dict[str, int]]:
    """`generate` (without stop tokens) over a tiered cache -> (token ids per prompt, bytes per tier at the
    end: `TieredCache.stats`)."""
    lengths = check_prompts(cfg, prompts, max_new_tokens)
    check_settings(temperature, top_k, top_p, key)
    b, unit = len(prompts), slot_granularity(cfg)
    params = engine.inference_params(cfg, params)
    capacity = -(-(int(lengths.max()) + max_new_tokens) // unit) * unit
    logits, cache = prefill_prompts(cfg, params, prompts, lengths, capacity, prefill_chunk)
    tiered = TieredCache(cfg, cache, capacity, tiers)
    tiered.update(cache)
    key, logits = jax.device_put((jax.random.key(0) if key is None else key, logits), tiered._on_device)
    out = []
    for i in range(max_new_tokens):
        last = i + 1 == max_new_tokens
        token, logits, cache, key = sample_and_append(
            cfg, params, tiered.joined(), logits, key, temperature, top_k, top_p, last
        )
        out.append(np.asarray(token))
        tiered.update(cache)
    tokens = np.stack(out, axis=1)
    return [tokens[i].tolist() for i in range(b)], tiered.stats()
