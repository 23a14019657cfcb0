"""Atomic file writes: a temporary file in the same folder, fsync, then a rename onto the target.

A reader never sees a half-written file, and a crash leaves either the old file or the new one. This is the one
implementation in the suite: text, bytes, JSON and lines go through `atomic_write_*`; writers that need a path
(`torch.save`, `np.savez`, a Lightning checkpoint) use `atomic_path`, writers that need a file object (PIL) use
`atomic_open`.

The file gets the mode `open(path, "w")` would give it, `0o666 & ~umask` (0o644 under the usual umask 0o022,
0o660 under a group umask 0o007): `tempfile.mkstemp` alone creates 0o600, which the group of a shared cluster
cannot read.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

_PROC_STATUS = "/proc/self/status"


def current_umask() -> int:
    """The process umask, read without changing it.

    The only portable way to read the umask is `os.umask(0)` followed by `os.umask(old)`; between the two calls
    the whole process has umask 0, so a file another thread (a loader thread, an async checkpoint writer) creates
    meanwhile would come out world-writable. Linux >= 4.7 shows the umask in /proc/self/status, which is a plain
    read: that is used whenever it exists. The swap is the fallback on other systems only. The umask is read on
    every write, not once at import, so a job that sets its umask after importing us is still honoured.
    """
    try:
        with open(_PROC_STATUS, encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o077)  # the strictest value while swapped, so a racing thread errs on the private side
    os.umask(old)
    return old


@contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds it is fsynced and renamed onto `path`.

    With overwrite=False an existing `path` raises FileExistsError, also when another writer creates it while
    this one writes (the commit is a create-if-absent link, not a check followed by a rename).
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} already exists; refusing to overwrite it (pass overwrite=True)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp_path = Path(tmp)
    os.close(fd)
    try:
        yield tmp_path
        # The mode is set after the writer ran: a writer given a path may replace the file rather than write into
        # it (Lightning's checkpoint save moves an fsspec temporary onto it, chmodded with a umask fsspec cached).
        os.chmod(tmp_path, 0o666 & ~current_umask())
        with open(tmp_path, "rb+") as fh:  # flush to disk before the rename makes it visible
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp_path, path)
        else:
            _move_no_clobber(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, overwrite: bool = True) -> Iterator[IO]:
    """Yield a file object (mode "w" text as UTF-8, or "wb") whose content replaces `path` when the block succeeds."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as fh:
            yield fh


def _move_no_clobber(tmp: Path, path: Path) -> None:
    """Move tmp to path, failing if path appeared meanwhile (another writer won the race)."""
    try:
        os.link(tmp, path)  # atomic create-if-absent on POSIX file systems
    except FileExistsError:
        raise FileExistsError(f"{path}: another writer created it first; refusing to overwrite it") from None
    except OSError:
        # File systems without hard links: the existence check before writing is the best we can do.
        if path.exists():
            raise FileExistsError(f"{path} already exists; refusing to overwrite it") from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> Path:
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, overwrite: bool = True) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n",
                             overwrite=overwrite)


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def atomic_write_lines(path: str | os.PathLike, lines: list[str], *, overwrite: bool = True) -> Path:
    return atomic_write_text(path, "".join(f"{line}\n" for line in lines), overwrite=overwrite)
