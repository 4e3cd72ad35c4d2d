"""Writing a file so that a crash never leaves it half written: a temporary file in the same
directory, then a rename. Used for exports, checkpoints' metadata, manifests, metrics and results."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path, write: Callable[[str], None]) -> None:
    """``write(tmp_path)`` then rename onto ``path``. The file gets the umask's permissions (mkstemp's
    0600 would hide results from the rest of a team)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_directory(path, write: Callable[[Path], None], overwrite: bool = False) -> None:
    """``write(tmp_dir)`` into a hidden directory beside ``path``, then a rename onto ``path``; on any
    error the hidden directory goes and ``path`` is as it was. ``overwrite``: an existing ``path`` is
    replaced only once the new one is complete."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    old = None
    try:
        write(tmp)
        umask = _umask()  # the umask's permissions, as atomic_write: mkdtemp's 0700 would hide the result
        os.chmod(tmp, 0o777 & ~umask)
        for f in tmp.rglob("*"):
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)
        if path.exists() and overwrite:
            old = path.parent / f"{tmp.name}.old"
            os.replace(path, old)
        elif path.exists():  # an empty directory (refused otherwise before the work)
            path.rmdir()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not path.exists():
            os.replace(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
