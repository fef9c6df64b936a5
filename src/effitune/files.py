"""Writing a file so that readers see the old one or the new one, never half of one.

Every file effitune writes for others to read (manifests, state, reports, exported graphs, caches)
goes through `replacing`: the content goes to a hidden temporary beside the target, which then
replaces it in one rename (atomic on POSIX and on Windows). An error on the way leaves the target
as it was and removes the temporary.
"""
from __future__ import annotations

import contextlib
import uuid
from pathlib import Path
from typing import Iterator


def temporary_beside(path: str | Path, suffix: str = ".tmp") -> Path:
    """A hidden, unique name in `path`'s folder (the same file system, so the rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{suffix}")


@contextlib.contextmanager
def replacing(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path`, on an error it is removed.

    `suffix`: the temporary's ending, for writers that insist on one (numpy adds .npy otherwise).
    """
    path = Path(path)
    temporary = temporary_beside(path, suffix)
    try:
        yield temporary
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    with replacing(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    with replacing(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)
