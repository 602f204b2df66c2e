"""Writing files so that a reader never sees half of one.

Every output luna writes (reports, CSVs, pictures, mask images, dataset files) goes
through `replacing`: the writer fills a temporary file in the same folder, which
then replaces the target in one ``os.replace``; if writing fails, the temporary
file is removed and the old target is untouched. The temporary name keeps the
target's suffixes, so writers that pick the format by extension (SimpleITK,
matplotlib) still do. (Checkpoints add fsync on top: `luna.models.checkpoint`.)
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["replacing", "write_atomic"]


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces it when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial{''.join(path.suffixes)}")
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
