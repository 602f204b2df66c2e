"""Writing files so that a reader never sees half of one.

Every output luna writes (reports, CSVs, pictures, mask images, dataset files) goes
through `replacing`: the writer fills a temporary file in the same folder, which
then replaces the target in one ``os.replace``; if writing fails, the temporary
file is removed and the old target is untouched. The temporary name keeps the
target's suffixes, so writers that pick the format by extension (SimpleITK,
matplotlib) still do. (Checkpoints add fsync on top: `luna.models.checkpoint`.)

A writer killed outright (SIGKILL, power cut) cannot remove its temporary file.
Every temporary name has one form, ``.<target name>.<pid>.<random>.partial<suffixes>``
(`temporary_path`), so the next run finds such leftovers by name and removes them
(`remove_stale_temporaries`) when the process that wrote them is gone; the names
that earlier versions used (no random part; ``.tmp`` for checkpoints) are found too.

`writable_directory` checks an output directory before a long run rather than
failing after it.
"""

from __future__ import annotations

import os
import re
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from luna.errors import LunaError

__all__ = ["remove_stale_temporaries", "replacing", "temporary_path", "writable_directory", "write_atomic"]

_TEMPORARY = re.compile(r"^\..+\.(?P<pid>\d+)(\.[0-9a-f]+)?\.(partial(\..*)?|tmp)$")


def temporary_path(path: str | os.PathLike) -> Path:
    """A fresh temporary name beside ``path`` for writing it; see the module docstring.

    The pid lets a later run tell a dead writer's leftover from a live writer's file;
    the random part keeps two writers of one target (threads, ranks) apart.
    """
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.partial{''.join(path.suffixes)}")


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces it when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(path)
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8, newlines as given) to ``path`` atomically."""
    with replacing(path) as temporary:
        temporary.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporary files (`temporary_path`) in ``directory`` whose writer is gone.

    A temporary file whose pid is a running process (this one included) may still
    be being written and is kept. Returns the removed paths; a missing directory
    has none.
    """
    removed = []
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        found = _TEMPORARY.match(entry.name)
        if found and entry.is_file(follow_symlinks=False) and not _running(int(found["pid"])):
            Path(entry.path).unlink(missing_ok=True)
            removed.append(Path(entry.path))
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def writable_directory(path: str | os.PathLike, what: str, *, keep: bool = True) -> Path:
    """``path`` as a directory that files can be written to, created (with parents) if missing.

    Raises `LunaError` naming ``what`` (e.g. ``"--out"``) when ``path`` is an existing
    file or a file cannot be created there (read-only, no permission, no space for
    a directory entry), so that a command fails before its work, not after it.
    ``keep=False``: only check; the directories the check created are removed again, so
    a command that fails later (a missing model, a bad input) leaves no empty folder
    behind, and the writer creates the folder when it has something to put there.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LunaError(f"{what} {path} is an existing file, not a directory: give a directory "
                        f"(it is created when missing)")
    created = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = temporary_path(path / "write-test")
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as err:
        raise LunaError(f"{what} {path}: cannot write there ({err.strerror or err}); "
                        f"choose a directory you can write to") from None
    finally:
        if not keep:
            for directory in created:  # deepest first
                try:
                    directory.rmdir()
                except FileNotFoundError:
                    continue  # the check failed before making it
                except OSError:
                    break  # not empty any more: something else writes there now
    return path
