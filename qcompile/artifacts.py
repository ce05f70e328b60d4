"""Atomic artifact writes, one file at a time and one run at a time.

A file is written to a temporary name beside its target and renamed onto it, so a failure never leaves a
half-written artifact. A run's output folder is written the same way as a whole (:func:`output_transaction`):
every artifact goes into a staging folder beside ``--out``, and the folder is swapped in at the end, so ``--out``
always holds one complete run, never the new IR beside the old report.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from qcompile.errors import OutputDirError, QCompileError

STAGING = "qcompile-staging"  # NAME.qcompile-staging-PID-RANDOM: a run being written; never restored
BACKUP = "qcompile-backup"  # NAME.qcompile-backup-PID-RANDOM: the previous run while the new one is renamed in
FAILED = "qcompile-failed"  # NAME.qcompile-failed: the last run that failed verification, kept for inspection
STALE_AFTER_S = 24 * 3600  # a staging or backup folder this old is a dead run's, even if its pid was reused
# what only a write raises, when the storage, not the run, is at fault: the user frees space or picks another place
STORAGE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def default_mode(directory: bool = False) -> int:
    """The permissions a plain open()/mkdir() would give under the current umask (mkstemp's are 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; rename it onto ``path`` only if the block succeeds.

    The temporary name is chosen before the file is created, inside the ``try``: an interrupt at any point
    (even as the file is being created) finds the name it must remove.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # 0o666 & ~umask, as open() gives
        yield tmp
        os.replace(tmp, target)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and (exc.filename is None or Path(os.fsdecode(exc.filename)) == tmp):
            exc.filename = str(target)  # the file being written (a write names none), not its temporary name
        raise


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike[str], data: object) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def check_output_dir(out: Path, marker: str = "report.json") -> None:
    """Refuse, before any work, an ``out`` that a run could not replace: a file, a folder under a file or an
    unwritable one, or a non-empty folder without ``marker`` (not a previous run: a user's folder is never
    swapped out and deleted)."""
    target = out.resolve()
    if target.parent == target:
        raise OutputDirError(out, "is a filesystem root; name a folder to write the run into")
    if target.exists() and not target.is_dir():
        raise OutputDirError(out, "is a file, not a folder")
    if target.is_dir() and any(target.iterdir()) and not (target / marker).is_file():
        raise OutputDirError(out, f"is a folder without {marker}, not a previous run's output; qcompile replaces "
                                  f"its output folder whole, so choose an empty or new folder")
    ancestor = target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputDirError(out, f"{ancestor} is not a folder", action="create")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputDirError(out, f"{ancestor} is not writable", action="create")


@contextmanager
def output_transaction(out: Path, marker: str = "report.json") -> Iterator[Path]:
    """Yield a fresh staging folder beside ``out``; when the block succeeds, it replaces ``out`` whole.

    ``out`` holds the previous complete run until the swap (two renames in one folder) and the new one after;
    if the block fails, the staging folder is deleted and ``out`` is untouched. What dead runs left beside
    ``out`` is cleaned up first (:func:`recover`), and a kept failed run (:func:`keep_failed`) once a run
    succeeds. Everything the run writes must go under the staging folder.
    """
    check_output_dir(out, marker)
    target = out.resolve()
    staging = _sibling(target, STAGING)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        recover(target)
    except OSError as exc:
        raise OutputDirError(out, exc.strerror or str(exc), action="write") from None
    try:
        try:
            staging.mkdir()  # inside the outer try, by a name chosen before: an interrupt cannot orphan it
        except OSError as exc:
            raise OutputDirError(out, f"cannot create a folder beside it: {exc.strerror}", action="write") from None
        yield staging
        _swap_in(staging, target)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError) and _written_in(exc, staging):
            raise OutputDirError(out, _storage_reason(exc, staging), action="write") from None
        raise
    shutil.rmtree(failed_path(target), ignore_errors=True)


def _written_in(exc: OSError, staging: Path) -> bool:
    """Whether the error is the storage's, writing the run's folder: full, read-only or not ours to write (a file
    under ``staging``), or full where the error names no file (a zip member being closed)."""
    if exc.filename is None:
        return exc.errno in STORAGE_ERRORS
    return (exc.errno in (*STORAGE_ERRORS, errno.EACCES, errno.EPERM)
            and Path(os.fsdecode(exc.filename)).resolve().is_relative_to(staging))


def _storage_reason(exc: OSError, staging: Path) -> str:
    """The error's message, with the artifact it was writing relative to the run's folder."""
    reason = exc.strerror or os.strerror(exc.errno or 0)
    if exc.filename is None:
        return reason
    name = Path(os.fsdecode(exc.filename)).resolve().relative_to(staging).as_posix()
    return f"{reason} (writing {name})" if name != "." else reason


def recover(out: Path) -> None:
    """Undo what dead runs left beside ``out``: a backup is renamed back if ``out`` is missing (its run died
    between the two renames of the swap), otherwise deleted; staging folders are deleted."""
    backups = _stale(out, BACKUP)
    if backups and not os.path.lexists(out):
        os.rename(backups.pop(), out)
    for path in backups + _stale(out, STAGING):
        shutil.rmtree(path, ignore_errors=True)


def _sibling(out: Path, kind: str) -> Path:
    """A name beside ``out`` for this process, ``NAME.KIND-PID-RANDOM``: the pid tells a later run whether its
    owner is still alive."""
    return out.with_name(f"{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _stale(out: Path, kind: str) -> list[Path]:
    """``out``'s ``kind`` siblings whose run is over: its pid is gone, or the folder is older than
    :data:`STALE_AFTER_S` (the pid may since belong to another process). Oldest first."""
    pattern = re.compile(rf"{re.escape(out.name)}\.{kind}-(\d+)-[0-9a-f]+")
    found = []
    for entry in out.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match is None:
            continue
        try:
            mtime = entry.lstat().st_mtime
        except FileNotFoundError:  # removed by its owner or another run meanwhile
            continue
        if not _alive(int(match.group(1))) or time.time() - mtime > STALE_AFTER_S:
            found.append((mtime, entry))
    return [entry for _, entry in sorted(found)]


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _swap_in(staging: Path, out: Path) -> None:
    """Rename ``staging`` onto ``out``: the previous run is renamed aside first and deleted once the new one is in
    place. An interrupt puts the previous run back if the new one is not in place; a process that dies between
    the two renames leaves ``out`` missing and the backup for :func:`recover` to restore."""
    backup = _sibling(out, BACKUP)
    try:
        with suppress(FileNotFoundError):
            os.rename(out, backup)
        os.rename(staging, out)
    except BaseException as exc:
        if os.path.lexists(backup) and not os.path.lexists(out):
            os.rename(backup, out)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise QCompileError(f"another run wrote {out} while this one ran; its output was kept") from None
        raise
    finally:
        shutil.rmtree(backup, ignore_errors=True)


def failed_path(out: Path) -> Path:
    """Where :func:`keep_failed` puts a failed run: beside ``out``, never in it."""
    return out.with_name(f"{out.name}.{FAILED}")


def keep_failed(staging: Path, out: Path) -> Path:
    """Move a failed run's staging folder to ``NAME.qcompile-failed`` beside ``out`` (replacing an older one),
    for its report and artifacts to be inspected; ``out`` keeps the last complete run."""
    kept = failed_path(out.resolve())
    shutil.rmtree(kept, ignore_errors=True)
    os.rename(staging, kept)
    return kept


def file_digests(folder: Path, skip: str = "report.json") -> dict[str, dict[str, int | str]]:
    """``{relative path: {"bytes": size, "sha256": hex}}`` of every file under ``folder`` but ``skip``: what a
    report records so that a folder can be checked to hold exactly the run the report describes."""
    digests: dict[str, dict[str, int | str]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel != skip:
            digests[rel] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    return digests


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
