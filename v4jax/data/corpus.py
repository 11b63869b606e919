"""Text corpora: discovery, loading, a deterministic train/validation split and a content fingerprint.

The default corpus is the running interpreter's standard library (`*.py` source: real code and docstrings),
present on every machine without a download. The test suites, IDLE, lib2to3, the turtle demos, the generated
`pydoc_data` topics and the generated `encodings` codec tables are left out: the first four are test and
tool code (17 MB of it for the tests alone), the last two are generated text (one 750 kB string; 120 nearly
identical codec tables, which would leak across the split and flatter the validation loss). On CPython 3.11.7
that leaves 456 files (454 non-empty), 8.8 MB of text.

User corpora: a text file (one document), a `.jsonl` file (one document per line, from its `text` field),
or a directory (every file with a suffix in `TEXT_SUFFIXES`, recursively, plus `.jsonl` files read as above;
dot-files and dot-directories such as `.git` or `.venv` are skipped).

The split is by document, decided by a stable hash of the document name (sha256, not Python's salted
`hash`), so adding or removing a file moves no other file across the split. A corpus of one document is
split by lines instead: its last `val_fraction` of lines becomes the validation document.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import sysconfig
from collections.abc import Sequence

# Path components never descended into when collecting the standard library.
STDLIB_EXCLUDE = frozenset(
    {
        "site-packages",
        "dist-packages",
        "__pycache__",
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "turtledemo",
        "pydoc_data",
        "encodings",
    }
)
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
JSONL_SUFFIX = ".jsonl"


@dataclasses.dataclass(frozen=True)
class Document:
    """One document: `name` (a '/'-separated path relative to the source, `:<line>` for JSONL records)."""

    name: str
    text: str


def stdlib_root() -> pathlib.Path:
    """The running interpreter's standard-library directory."""
    return pathlib.Path(sysconfig.get_path("stdlib"))


def stdlib_files() -> list[pathlib.Path]:
    """Sorted `.py` files of the interpreter's standard library, without tests and generated tables."""
    root = stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_EXCLUDE]  # prune: site-packages alone is ~100 MB
        files += [pathlib.Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _read_text(path: pathlib.Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None


def _read_jsonl(path: pathlib.Path, name: str) -> list[Document]:
    """One document per non-blank line of `path`, from the line's `text` field."""
    docs = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
        if not isinstance(record, dict) or "text" not in record:
            raise ValueError(f"{path}:{lineno}: record has no 'text' field")
        if not isinstance(record["text"], str):
            raise ValueError(f"{path}:{lineno}: 'text' is {type(record['text']).__name__}, expected a string")
        docs.append(Document(f"{name}:{lineno}", record["text"]))
    return docs


def _hidden(path: pathlib.Path, root: pathlib.Path) -> bool:
    """Whether `path` lies in (or is) a dot-file or dot-directory below `root` (.git, .venv, ...)."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _read_file(path: pathlib.Path, name: str) -> list[Document]:
    if path.suffix == JSONL_SUFFIX:
        return _read_jsonl(path, name)
    return [Document(name, _read_text(path))]


def load_documents(source: str | pathlib.Path | None = None) -> list[Document]:
    """Documents of `source`, in a deterministic order, empty documents dropped.

    Args:
      source: None or "stdlib" for the standard library; a text file (`.jsonl`: one document per line's
        `text` field; any other suffix: the whole file); or a directory (recursively, files whose suffix is
        in `TEXT_SUFFIXES` or `.jsonl`, sorted by relative path).

    Returns:
      Non-empty documents named by their path relative to the source (`stdlib` / directory) or by the file
      name (single file).
    """
    if source is None or source == "stdlib":
        root = stdlib_root()
        docs = [Document(p.relative_to(root).as_posix(), _read_text(p)) for p in stdlib_files()]
        where = f"the standard library at {root}"
    else:
        path = pathlib.Path(source).expanduser()
        if path.is_dir():
            suffixes = (*TEXT_SUFFIXES, JSONL_SUFFIX)
            files = sorted(
                (p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes and not _hidden(p, path)),
                key=lambda p: p.relative_to(path).as_posix(),
            )
            docs = [doc for p in files for doc in _read_file(p, p.relative_to(path).as_posix())]
            where = f"directory {path} (suffixes {', '.join(suffixes)})"
        elif path.is_file():
            docs = _read_file(path, path.name)
            where = f"file {path}"
        else:
            raise FileNotFoundError(f"corpus source {str(source)!r} is neither a file nor a directory")
    docs = [doc for doc in docs if doc.text]
    if not docs:
        raise ValueError(f"no non-empty documents in {where}")
    return docs


def _unit_hash(name: str) -> float:
    """A stable pseudo-random number in [0, 1) for a document name."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2**64


def _split_lines(doc: Document, val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Train / validation halves of a single document: the last `val_fraction` of its lines is validation."""
    lines = doc.text.splitlines(keepends=True)
    if len(lines) < 2:
        raise ValueError(f"cannot split a corpus of one single-line document ({doc.name!r}) into train and val")
    n_val = min(len(lines) - 1, max(1, round(len(lines) * val_fraction)))
    cut = len(lines) - n_val
    return [Document(f"{doc.name}[train]", "".join(lines[:cut]))], [Document(f"{doc.name}[val]", "".join(lines[cut:]))]


def split(docs: Sequence[Document], val_fraction: float = 0.05) -> tuple[list[Document], list[Document]]:
    """Deterministic (train, validation) split by document name; both halves are non-empty.

    A document goes to validation when the stable hash of its name is below `val_fraction`. If that leaves one
    side empty, the document with the lowest (for validation) or highest (for train) hash moves across. A
    single document is split by lines (see the module docstring). The order of `docs` is kept in both halves.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    names = [doc.name for doc in docs]
    if len(set(names)) != len(names):
        raise ValueError("document names are not unique, so the split by name is ambiguous")
    if len(docs) == 1:
        return _split_lines(docs[0], val_fraction)
    if not docs:
        raise ValueError("cannot split an empty corpus")
    keys = [_unit_hash(name) for name in names]
    in_val = [key < val_fraction for key in keys]
    if not any(in_val):
        in_val[min(range(len(docs)), key=keys.__getitem__)] = True
    if all(in_val):
        in_val[max(range(len(docs)), key=keys.__getitem__)] = False
    train = [doc for doc, v in zip(docs, in_val, strict=True) if not v]
    val = [doc for doc, v in zip(docs, in_val, strict=True) if v]
    return train, val


def corpus_fingerprint(docs: Sequence[Document]) -> str:
    """sha256 hex digest over the documents' names and texts, in order (length-prefixed, so unambiguous)."""
    digest = hashlib.sha256()
    for doc in docs:
        for part in (doc.name.encode("utf-8"), doc.text.encode("utf-8")):
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
    return digest.hexdigest()
