"""Writing files so that no reader ever sees half of one: a temporary name, then a rename.

Kept free of heavy imports so that every entry point, the command line included, can use it.
"""

from __future__ import annotations

import glob
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling name to write a file or folder to, renamed onto ``path`` only when the
    block succeeds: a crash never leaves a half-written ``path`` for a resumed run to trust.

    Temporaries are named ``.NAME.tmp-PID`` so that a cleanup can find those a killed run left."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if path.exists() and path.is_dir() != tmp.is_dir():  # a mistyped path: never swap a folder for a file
            kind = "folder" if path.is_dir() else "file"
            raise ValueError(
                f"{path} is a {kind}; it is not replaced by a {'file' if kind == 'folder' else 'folder'}"
            )
        if path.is_dir() and not path.is_symlink():  # a folder cannot be replaced in one rename
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def remove_temporaries(folder: str | os.PathLike, name: str | None = None) -> None:
    """Delete what killed runs left in ``folder``: ``atomic_path`` temporaries and displaced folders,
    of the file or folder ``name`` only if given (when ``folder`` holds other work's files too)."""
    stem = "*" if name is None else glob.escape(name)
    for pattern in (f".{stem}.tmp-*", f".{stem}.old-*"):
        for path in Path(folder).glob(pattern):
            _remove(path)


def changed_settings(saved: Mapping[str, object], now: Mapping[str, object]) -> str:
    """What a resumed run would change, "key: old then, new now; ..." ("" for nothing): the
    settings of ``now`` that ``saved`` recorded otherwise (one it did not record, as an earlier
    version's record, is not compared)."""
    return "; ".join(
        f"{k}: {saved[k]!r} then, {v!r} now" for k, v in now.items() if k in saved and saved[k] != v
    )
