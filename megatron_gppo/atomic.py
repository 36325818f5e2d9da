"""All-or-nothing writes: a reader sees the old file or directory, or the new one, never half of one.

Everything goes to a temporary name beside the target (same filesystem, so
the final `os.replace` is atomic) and is renamed into place at the end; on an
error the temporary is removed and the target is untouched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside directory `path` survive a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str, *, durable: bool = False) -> Path:
    """Write `text` to `path` via a temporary file; `durable` also fsyncs the file and its directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(text)
        if durable:
            tmp.flush()
            os.fsync(tmp.fileno())
    try:
        os.replace(tmp.name, path)
    except BaseException:
        os.unlink(tmp.name)
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def publish_directory(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Rename the finished directory `tmp` to `final`, swapping out an existing `final`."""
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        stale = final.with_name(f".{final.name}.stale-{uuid.uuid4().hex[:8]}")
        os.rename(final, stale)
        os.rename(tmp, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.rename(tmp, final)


@contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory beside `final`; it becomes `final` when the block succeeds.

    An existing `final` is swapped out at the end; on an error the temporary
    directory is deleted and `final` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        yield tmp
        publish_directory(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = ["atomic_directory", "fsync_dir", "publish_directory", "write_text_atomic"]
