"""Cache entries that are either what was written or thrown away.

Decoded images and sensitivity tables are cached under ``$QCOMPILE_CACHE`` because they take minutes to
recompute, and a cache is trusted silently: a truncated file, a disk error or an entry written by another version
of qcompile would otherwise be read as data (or crash the run with a traceback). So every entry carries a header
with the entry's kind, a format version and the sha256 of its content, and is written atomically (a temporary
file beside it, then ``os.replace``), so a reader never sees half an entry. A reader that finds an entry it
cannot read, or whose header does not match, deletes it with a one-line :class:`CacheWarning` naming the file and
gets None, so the caller recomputes and stores it again.

Two layouts: arrays in an ``.npz`` (the header is the member :data:`HEADER`, a JSON string) and JSON documents
(``{"format", "kind", "version", "sha256", "content"}``).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from qcompile.artifacts import atomic_path
from qcompile.artifacts import write_json as write_json_atomically

FORMAT = "qcompile-cache"
HEADER = "__qcompile_cache__"  # the .npz member that holds the header
# what reading a damaged file raises: a garbled zip, a bad CRC, a truncated array, bad JSON or UTF-8
UNREADABLE = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


class CacheWarning(UserWarning):
    """A cache entry could not be used: it was deleted and is recomputed."""


def cache_dir() -> Path:
    """Where entries live: ``$QCOMPILE_CACHE`` or ``~/.cache/qcompile``."""
    return Path(os.environ.get("QCOMPILE_CACHE", Path.home() / ".cache" / "qcompile"))


def digest_arrays(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over each array's name, dtype, shape and bytes, so a reshaped or retyped array does not match."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a)
    return h.hexdigest()


def digest_json(content: object) -> str:
    """sha256 of the canonical JSON text (sorted keys; floats round-trip exactly through JSON)."""
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _header(kind: str, version: int, digest: str) -> dict[str, Any]:
    return {"format": FORMAT, "kind": kind, "version": version, "sha256": digest}


def _mismatch(header: object, kind: str, version: int, digest: str) -> str | None:
    """Why an entry's header does not vouch for its content, or None when it does."""
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        return "has no qcompile cache header (an older qcompile wrote it, or it is not a cache entry)"
    if header.get("kind") != kind:
        return f"holds {header.get('kind')!r}, expected {kind!r}"
    if header.get("version") != version:
        return f"is format version {header.get('version')}, expected {version}"
    if header.get("sha256") != digest:
        return "does not match its content hash (the file was changed or damaged)"
    return None


def discard(path: Path, reason: str) -> None:
    """Delete an entry that cannot be used and say why, so that the caller recomputes it."""
    path.unlink(missing_ok=True)
    # a warning located at line 0 has no source line, so the default formatter prints it as a single line
    warnings.warn_explicit(f"cache entry {path} {reason}: deleted, recomputing", CacheWarning, "qcompile", 0)


def first_line(exc: BaseException) -> str:
    """The exception's type and the first line of its message, for one-line warnings and errors."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _unwritable(path: Path, exc: OSError) -> None:
    warnings.warn(f"cannot write the cache entry {path} ({first_line(exc)}); continuing without it (set "
                  "QCOMPILE_CACHE to a writable folder)", CacheWarning, stacklevel=3)


def store_arrays(path: Path, kind: str, version: int, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` as an ``.npz`` entry with its header, atomically; where the cache cannot be written (a
    read-only or full disk, a file in the way), warn and carry on: the entry is only a time saver."""
    header = json.dumps(_header(kind, version, digest_arrays(arrays)))
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a file object: np.savez would append .npz to a name
            np.savez(fh, **arrays, **{HEADER: np.asarray(header)})
    except OSError as exc:
        _unwritable(path, exc)


def load_arrays(path: Path, kind: str, version: int) -> dict[str, np.ndarray] | None:
    """The arrays of an ``.npz`` entry; None when there is none, or it was unusable (then deleted, with a warning)."""
    if not path.exists():
        return None
    if not zipfile.is_zipfile(path):  # np.load would take other bytes for a pickle, and say so
        discard(path, "is not an .npz archive (truncated or overwritten)")
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
        header = json.loads(str(arrays.pop(HEADER))) if HEADER in arrays else None
    except UNREADABLE as exc:
        discard(path, f"is unreadable ({first_line(exc)})")
        return None
    problem = _mismatch(header, kind, version, digest_arrays(arrays))
    if problem is not None:
        discard(path, problem)
        return None
    return arrays


def store_json(path: Path, kind: str, version: int, content: Mapping[str, Any]) -> None:
    """Write ``content`` as a JSON entry with its header, atomically (warning and carrying on where it cannot)."""
    try:
        write_json_atomically(path, {**_header(kind, version, digest_json(content)), "content": content})
    except OSError as exc:
        _unwritable(path, exc)


def load_json(path: Path, kind: str, version: int) -> dict[str, Any] | None:
    """The content of a JSON entry; None when there is none, or it was unusable (then deleted, with a warning)."""
    if not path.exists():
        return None
    try:
        entry = json.loads(path.read_text())
    except UNREADABLE as exc:
        discard(path, f"is unreadable ({first_line(exc)})")
        return None
    content = entry.get("content") if isinstance(entry, dict) else None
    problem = _mismatch(entry, kind, version, digest_json(content))
    if problem is None and not isinstance(content, dict):
        problem = "has no content"
    if problem is not None:
        discard(path, problem)
        return None
    return content
