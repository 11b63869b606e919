"""Generate text from a training run of `experiments.train` or from an HF checkpoint directory.

    python -m experiments.sample runs/default --prompt 'def fibonacci(n):' --max-new-tokens 64
    python -m experiments.sample runs/default --prompt 'import os' --temperature 0.8 --top-p 0.95 --seed 1
    python -m experiments.sample runs/default/checkpoints/200 --prompt 'class Foo:'     # one saved step
    python -m experiments.sample path/to/hf_checkpoint --prompt-file prompts.jsonl      # batched
    python -m experiments.sample runs/default --prompt 'def f(x):' --speculative       # MTP drafts

Model directories:
    run directory      config.json + checkpoints/ (from `experiments.train`): the latest committed step's
                       parameters restored onto one device, the tokenizer saved with that step (else the
                       run's tokenizer.json). `RUN/checkpoints` and `RUN/checkpoints/<step>` work too.
    HF checkpoint      config.json + *.safetensors (`v4jax.hf.load_checkpoint`, float32), and a
                       tokenizer.json in the same directory.

One `--prompt`: stdout gets the prompt, then the continuation token by token as it is decoded (`stream`).
`--prompt-file`: a JSONL file, one prompt per line, each a JSON string or an object with a "prompt" key
(JSON so that prompts can hold newlines); all prompts run as one batch (`generate`) and stdout gets one
JSON object per prompt: {"prompt", "completion", "tokens"}. Timings go to stderr.

Generation stops after `--max-new-tokens` or at the tokenizer's end-of-text token (unless `--no-eos-stop`)
or at a `--stop` string, which must be a single token of the vocabulary. A final end-of-text token is not
printed; other stop tokens are. `--speculative` drafts with the model's first MTP module and verifies with the
main model (`speculative_generate`): greedy only, same output as greedy decoding, and it prints the
drafts' acceptance rate. `--cache-tiers` names where the inference cache lives: `device` (default), `host[:N]`
(blocks older than the last N tokens, default 256, in pinned host memory) or `disk:DIR[:N]` (memory-mapped
under DIR); tiered runs are not streamed (`v4jax.sampling.tiered.generate_tiered`).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

import jax
import tokenizers

from v4jax import hf
from v4jax import sharding as shd
from v4jax.checkpointing import Checkpointer
from v4jax.config import ModelConfig
from v4jax.data.tokenizer import EOS_CANDIDATES, Tokenizer
from v4jax.sampling import generate, speculative_generate, stream
from v4jax.sampling.tiered import Tiers, generate_tiered, slot_granularity
from v4jax.train import TrainConfig, Trainer

DEVICE_TOKENS = 256  # default recent window kept on the device by --cache-tiers host / disk


class SampleError(Exception):
    """A user error: bad arguments, an unknown directory layout, a missing tokenizer."""


# ------------------------------------------------------------------------------------------------ loading
def _tokenizer_from_json(text: str, where: str) -> Tokenizer:
    """A Tokenizer from tokenizer.json content; the end-of-text token is the first of EOS_CANDIDATES present."""
    backend = tokenizers.Tokenizer.from_str(text)
    eos = next((tok for tok in EOS_CANDIDATES if backend.token_to_id(tok) is not None), None)
    if eos is None:
        raise SampleError(f"the tokenizer of {where} has none of the end-of-text tokens {EOS_CANDIDATES}")
    return Tokenizer(backend, eos)


def _is_run(directory: pathlib.Path) -> bool:
    return (directory / "config.json").is_file() and (directory / "checkpoints").is_dir()


def _run_layout(path: pathlib.Path) -> tuple[pathlib.Path, int | None] | None:
    """(run directory, step or None for the latest) if `path` is a run, its checkpoints/ or one step in it."""
    if _is_run(path):
        return path, None
    if path.name == "checkpoints" and _is_run(path.parent):
        return path.parent, None
    if path.name.isdigit() and path.parent.name == "checkpoints" and _is_run(path.parent.parent):
        return path.parent.parent, int(path.name)
    return None


def load_run(run: pathlib.Path, step: int | None) -> tuple[ModelConfig, dict[str, Any], Tokenizer, str]:
    """(cfg, params on one device, tokenizer, description) of a training run's checkpoint."""
    settings = json.loads((run / "config.json").read_text())
    if not isinstance(settings, dict) or "model" not in settings or "train" not in settings:
        raise SampleError(f"{run / 'config.json'} is not a run config of experiments.train (no 'model'/'train')")
    cfg = ModelConfig.from_dict(settings["model"])
    tcfg = TrainConfig(**settings["train"])
    # restored straight onto one device as plain arrays: the caches that sampling creates live there too, so
    # every step sees the same input types (arrays of a one-device mesh would compile the decode step twice)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = Trainer(cfg, tcfg, shd.make_mesh(fsdp=1, devices=jax.devices()[:1]), "fsdp").abstract_state()
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
    checkpoints = Checkpointer(run / "checkpoints", save_every=1, keep=2**31 - 1)  # nothing is saved or deleted
    try:
        steps = checkpoints.all_steps()
        if not steps:
            raise SampleError(f"{run / 'checkpoints'} holds no committed checkpoint")
        if step is not None and step not in steps:
            raise SampleError(f"{run / 'checkpoints'} has no committed step {step}; committed: {steps}")
        step = steps[-1] if step is None else step
        state, _ = checkpoints.restore(step, target=target)
        saved = checkpoints.restore_tokenizer(step)
    finally:
        checkpoints.close()
    if saved is not None:
        tokenizer = _tokenizer_from_json(saved, f"checkpoint step {step}")
    elif (run / "tokenizer.json").is_file():
        tokenizer = _tokenizer_from_json((run / "tokenizer.json").read_text(), str(run / "tokenizer.json"))
    else:
        raise SampleError(
            f"checkpoint step {step} of {run} stores no tokenizer and {run / 'tokenizer.json'} is missing"
        )
    return cfg, state["params"], tokenizer, f"run {run}, step {step}"


def load_hf(directory: pathlib.Path, with_mtp: bool) -> tuple[ModelConfig, dict[str, Any], Tokenizer, str]:
    """(cfg, params, tokenizer, description) of an HF checkpoint directory with a tokenizer.json."""
    if not (directory / "tokenizer.json").is_file():
        raise SampleError(
            f"{directory} is an HF checkpoint without a tokenizer.json: copy the model's tokenizer.json into it"
        )
    try:
        tokenizer = Tokenizer.from_file(directory / "tokenizer.json")
    except ValueError as e:
        raise SampleError(str(e)) from e
    cfg, params = hf.load_checkpoint(directory, mtp="require" if with_mtp else "drop")
    return cfg, params, tokenizer, f"HF checkpoint {directory}"


def load(path: str, with_mtp: bool = False) -> tuple[ModelConfig, dict[str, Any], Tokenizer, str]:
    """Detect the directory's layout and load it (see the module docstring)."""
    directory = pathlib.Path(path).expanduser()
    if not directory.is_dir():
        raise SampleError(f"{directory} is not a directory")
    if (run := _run_layout(directory)) is not None:
        return load_run(*run)
    if (directory / "config.json").is_file() and any(directory.glob("*.safetensors")):
        return load_hf(directory, with_mtp)
    raise SampleError(
        f"{directory} is neither a training run (config.json + checkpoints/, from experiments.train) nor an HF "
        "checkpoint (config.json + *.safetensors)"
    )


# ------------------------------------------------------------------------------------------------ output
def read_prompts(path: str) -> list[str]:
    """Prompts of a JSONL file: each non-blank line a JSON string or an object with a "prompt" string."""
    prompts = []
    for number, line in enumerate(pathlib.Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise SampleError(
                f'{path}:{number}: not JSON ({e}); each line is a JSON string or {{"prompt": ...}}'
            ) from e
        if isinstance(record, dict):
            record = record.get("prompt")
        if not isinstance(record, str) or not record:
            raise SampleError(f'{path}:{number}: expected a non-empty JSON string or {{"prompt": "<text>"}}')
        prompts.append(record)
    if not prompts:
        raise SampleError(f"{path} holds no prompts")
    return prompts


def incremental_text(tokenizer: Tokenizer, ids: Iterable[int]) -> Iterator[str]:
    """The text of a growing id list, piece by piece: each piece is the new suffix of the decoded list, held
    back while the text ends in an incomplete character (U+FFFD from a partial UTF-8 sequence). The pieces
    concatenate to `tokenizer.decode` of all ids."""
    seen: list[int] = []
    printed = 0
    for token in ids:
        seen.append(token)
        text = tokenizer.decode(seen)
        if not text.endswith("\ufffd") and len(text) > printed:
            yield text[printed:]
            printed = len(text)
    text = tokenizer.decode(seen)
    if len(text) > printed:
        yield text[printed:]


def shown(ids: list[int], eos: int | None) -> list[int]:
    """The ids to print: all but a final `eos` (None: all)."""
    return ids[:-1] if ids and eos is not None and ids[-1] == eos else ids


def _stop_tokens(tokenizer: Tokenizer, stops: list[str], eos_stop: bool) -> list[int]:
    ids = [tokenizer.eos_id] if eos_stop else []
    for text in stops:
        pieces = tokenizer.encode(text)
        if len(pieces) != 1:
            raise SampleError(f"--stop {text!r} is {len(pieces)} tokens {pieces}; a stop string must be one token")
        ids.append(pieces[0])
    return ids


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("directory", help="run directory, its checkpoints/ or a step in it, or an HF checkpoint")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt; its continuation streams to stdout")
    source.add_argument("--prompt-file", help='JSONL: one JSON string or {"prompt": ...} per line; run as a batch')
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0, help="PRNG seed of the sampler (temperature > 0)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop token text (repeatable)")
    p.add_argument("--no-eos-stop", action="store_true", help="do not stop at the end-of-text token")
    p.add_argument("--speculative", action="store_true", help="MTP self-speculative greedy decoding")
    p.add_argument(
        "--cache-tiers",
        default="device",
        metavar="SPEC",
        help="device | host[:N] | disk:DIR[:N]",
    )
    return p.parse_args(argv)


def parse_tiers(spec: str, cfg: ModelConfig) -> Tiers | None:
    """--cache-tiers SPEC -> Tiers (None: everything on the device)."""
    kind, *rest = spec.split(":")
    if kind == "device" and not rest:
        return None
    spill = None
    if kind == "disk":
        if not rest or not rest[0]:
            raise SampleError("--cache-tiers disk needs a directory: disk:DIR[:N]")
        spill, *rest = rest
    if kind not in ("host", "disk") or len(rest) > 1 or (rest and not rest[0].isdigit()):
        raise SampleError(f"--cache-tiers {spec!r}: expected device, host[:N] or disk:DIR[:N] (N an integer)")
    unit, device_tokens = slot_granularity(cfg), int(rest[0]) if rest else DEVICE_TOKENS
    block = -(-min(64, device_tokens) // unit) * unit  # blocks of up to 64 tokens, whole compression windows
    return Tiers(device_tokens, block, spill)


def _check_args(args: argparse.Namespace) -> None:
    if args.cache_tiers != "device" and args.speculative:
        raise SampleError("--speculative keeps its cache on the device: drop --cache-tiers")
    if args.speculative and (args.temperature > 0 or args.top_k is not None or args.top_p is not None):
        raise SampleError("--speculative decodes greedily: drop --temperature/--top-k/--top-p")
    if args.max_new_tokens < 1:
        raise SampleError(f"--max-new-tokens must be ≥ 1, got {args.max_new_tokens}")


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> list[list[int]]:
    """Load, generate and print; returns the generated ids per prompt (stop tokens included)."""
    _check_args(args)
    cfg, params, tokenizer, what = load(args.directory, with_mtp=args.speculative)
    print(f"{what}: {cfg.model_type}, {cfg.num_hidden_layers} layers, vocab {cfg.vocab_size}", file=err)
    texts = [args.prompt] if args.prompt is not None else read_prompts(args.prompt_file)
    prompts = tokenizer.encode_batch(texts)
    if empty := [i for i, ids in enumerate(prompts) if not ids]:
        raise SampleError(f"prompt {empty[0]} encodes to no tokens")
    stops = _stop_tokens(tokenizer, args.stop, not args.no_eos_stop)
    eos = None if args.no_eos_stop else tokenizer.eos_id
    # a committed key: `stream` compiles its step again when the first call's key is uncommitted and later ones not
    key = jax.device_put(jax.random.key(args.seed), jax.devices()[0])
    sampler = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, key=key)
    start = time.perf_counter()
    stats = None
    tiers = parse_tiers(args.cache_tiers, cfg)
    if args.prompt is not None and not args.speculative and tiers is None:
        out.write(args.prompt)
        out.flush()
        ids: list[int] = []

        def printable() -> Iterator[int]:  # records every id; a final stopping end-of-text is not printed
            for token in stream(cfg, params, prompts[0], args.max_new_tokens, stop_tokens=stops, **sampler):
                ids.append(token)
                if token != eos:
                    yield token

        for piece in incremental_text(tokenizer, printable()):
            out.write(piece)
            out.flush()
        out.write("\n")
        outputs = [ids]
    else:
        if args.speculative:
            outputs, stats = speculative_generate(cfg, params, prompts, args.max_new_tokens, stop_tokens=stops)
        elif tiers is not None:  # no stop tokens inside: cut each row after its first one
            outputs, held = generate_tiered(cfg, params, prompts, args.max_new_tokens, tiers, **sampler)
            outputs = [ids[: next((i + 1 for i, t in enumerate(ids) if t in stops), len(ids))] for ids in outputs]
            print(f"cache bytes per tier: {held}", file=err)
        else:
            outputs = generate(cfg, params, prompts, args.max_new_tokens, stop_tokens=stops, **sampler)
        for text, ids in zip(texts, outputs, strict=True):
            completion = tokenizer.decode(shown(ids, eos))
            if args.prompt is not None:
                out.write(text + completion + "\n")
            else:
                out.write(json.dumps({"prompt": text, "completion": completion, "tokens": len(ids)}) + "\n")
    out.flush()
    seconds = time.perf_counter() - start
    count = sum(len(ids) for ids in outputs)
    print(f"{count} tokens in {seconds:.2f} s ({count / seconds:.1f} tokens/s, compilation included)", file=err)
    if stats is not None:
        rate = stats["accepted"] / stats["drafted"] if stats["drafted"] else float("nan")
        print(
            f"speculative: {stats['accepted']}/{stats['drafted']} drafts accepted ({rate:.1%}), "
            f"{stats['steps']} verification passes for {count} tokens",
            file=err,
        )
    return outputs


def main(argv: list[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> list[list[int]]:
    """Command-line entry point. User errors (and generate's checks: token ids outside the vocabulary, a
    prompt too long for the model) print `error: ...` to stderr and exit with status 2."""
    args = parse_args(argv)
    err = err or sys.stderr
    try:
        return run(args, out or sys.stdout, err)
    except (SampleError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=err)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
