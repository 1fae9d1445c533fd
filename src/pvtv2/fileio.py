"""Writing files and folders atomically: a reader (or a run killed at any moment) sees the old file or the new one,
never half of one.

Every write goes to a hidden temporary sibling (``.NAME.tmp``) that is renamed over the target once it is complete.
When the write fails (a full disk, a read-only folder, a permission), the temporary file is removed and the error is
raised again as :class:`WriteError` (an ``OSError``), naming the target and the system's reason, not the temporary
file; the previous target is left as it was.
"""

from __future__ import annotations

import contextlib
import errno as errno_codes
import json
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "WriteError",
    "atomic_write",
    "atomic_write_text",
    "atomic_write_json",
    "write_folder_atomically",
    "recover_folder",
    "temporary_path",
    "path_kind",
    "existing_folder",
]


class WriteError(OSError):
    """A file or folder could not be written; ``filename`` is the target, ``errno`` the system's reason."""

    def __init__(self, target: os.PathLike | str, err: OSError) -> None:
        code = err.errno if err.errno is not None else errno_codes.EIO
        reason = err.strerror or str(err) or type(err).__name__
        super().__init__(code, f"cannot write {os.fspath(target)!r}: {reason} [{errno_codes.errorcode.get(code, code)}]")
        self.filename = os.fspath(target)

    def __str__(self) -> str:
        return self.strerror


def temporary_path(target: Path) -> Path:
    """The hidden sibling a write of ``target`` goes to first."""
    return target.with_name(f".{target.name}.tmp")


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


@contextlib.contextmanager
def _cleaned_up(target: Path, tmp: Path, undo: Callable[[], None] = lambda: None) -> Iterator[None]:
    """On any failure inside the block: remove ``tmp``, call ``undo``, and raise OS errors as :class:`WriteError`."""
    try:
        yield
    except OSError as err:
        _remove(tmp)
        undo()
        if isinstance(err, WriteError):
            raise
        raise WriteError(target, err) from err
    except BaseException:
        _remove(tmp)
        undo()
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file, then rename it to ``path`` (parents are created)."""
    target = Path(path)
    kind = path_kind(target)
    if kind not in ("file", "nothing", "dangling symlink", "folder"):
        # The rename would replace a device or a FIFO with the new file (`/dev/null` itself, for root): left alone.
        raise WriteError(target, OSError(errno_codes.EEXIST, f"it is a {kind}, not a regular file"))
    tmp = temporary_path(target)
    with _cleaned_up(target, tmp):
        target.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, target)
    return target


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any, **dumps: Any) -> Path:
    """Write ``data`` as JSON (two-space indent and a final newline unless ``dumps`` says otherwise) atomically."""
    options = {"indent": 2, **dumps}
    return atomic_write_text(path, json.dumps(data, **options) + "\n")


def write_folder_atomically(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Fill a temporary sibling folder with ``write(tmp)``, then swap it in with renames.

    :func:`recover_folder` repairs the one window (between the two renames) in which only the ``.old`` copy exists.
    On failure the temporary folder is removed and the previous ``target`` is left as it was.
    """
    target = Path(target)
    tmp = temporary_path(target)
    old = target.with_name(f".{target.name}.old")
    with _cleaned_up(target, tmp, undo=lambda: recover_folder(target)):
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        write(tmp)
        if old.exists():
            _delete(old)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        if old.exists():
            _delete(old)
    return target


def _delete(path: Path) -> None:
    """Remove a folder, or a symbolic link (to a folder: ``target`` was one, and rmtree refuses a link) or file."""
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def recover_folder(target: str | os.PathLike) -> None:
    """Put back ``target`` from its ``.old`` copy when a swap was interrupted between its two renames, and remove a
    ``.old`` copy left beside ``target`` (a swap killed after its second rename): ``target`` is then the newer one,
    and the stale copy, a whole checkpoint, would otherwise stay forever."""
    target = Path(target)
    old = target.with_name(f".{target.name}.old")
    if not old.exists():
        return
    if not target.exists():
        os.replace(old, target)
    else:
        _delete(old)


def path_kind(path: str | os.PathLike) -> str:
    """What is at ``path``, in words for an error message: ``"file"``, ``"folder"``, ``"FIFO (named pipe)"``,
    ``"socket"``, ``"character device"``, ``"block device"``, ``"symlink loop"``, ``"dangling symlink"`` or
    ``"nothing"``. Only ``stat`` is called: a FIFO is never opened (opening one blocks until a writer comes)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        if err.errno == errno_codes.ELOOP:
            return "symlink loop"
        if os.path.islink(path):
            return "dangling symlink"
        return "nothing"
    except ValueError:  # an embedded NUL byte
        return "nothing"
    for test, name in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO (named pipe)"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def existing_folder(path: str | os.PathLike, what: str = "dataset folder") -> Path:
    """``path`` when it is a folder (or a link to one). Otherwise ``FileNotFoundError`` when nothing is there (a
    symlink loop or a dangling symlink named as such) and ``ValueError`` naming what is there instead (a file, a
    FIFO, a device...). Only :func:`path_kind` looks: a FIFO is never opened, so the check cannot block."""
    text = os.fspath(path)
    kind = path_kind(text)
    if kind == "folder":
        return Path(text)
    if kind == "nothing":
        raise FileNotFoundError(f"{what} not found: {text!r}")
    if kind in ("symlink loop", "dangling symlink"):
        raise FileNotFoundError(f"{what} not found: {text!r} is a {kind}")
    raise ValueError(f"{what} {text!r} is a {kind}, not a folder")
