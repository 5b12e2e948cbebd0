"""Outputs that appear whole or not at all: a folder or a text file is written beside its
target under a temporary name and renamed into place, so an interrupted write never leaves a
half-written model, report or JSON file behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator

from .errors import PLTError

OUTPUT_MARKER = ".plt-port-output"  # in every folder atomic_dir writes: it may be replaced


def check_output_dir(out_dir: str, inputs: tuple[str, ...] = ()) -> None:
    """Refuse to replace a folder plt-port did not write, or one this command reads from."""
    real = os.path.realpath(out_dir)
    for source in inputs:
        source = os.path.realpath(source)
        if real == source or source.startswith(real + os.sep):
            raise PLTError(f"output {out_dir} would replace the input {source}; choose another "
                           f"output directory")
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise PLTError(f"output {out_dir} exists and is not a directory")
        if os.listdir(out_dir) and not os.path.exists(os.path.join(out_dir, OUTPUT_MARKER)):
            raise PLTError(f"output {out_dir} already holds files that plt-port did not write; "
                           f"remove it or choose another output directory")


TEMP_NAME = re.compile(r"^\..+\.(?:tmp|old)-(\d+)-\w+(?:\.plt-port)?$")  # see temp_prefix


def temp_prefix(target: str, kind: str) -> str:
    """Prefix of a temp entry beside `target`: the writer's PID in it tells a later writer
    whether the entry is stale (its process is gone)."""
    return f".{os.path.basename(target)}.{kind}-{os.getpid()}-"


def remove_stale_temps(parent: str) -> None:
    """Remove temp folders and files of atomic writes in `parent` whose writer process is gone
    (killed mid-write): folders only when they hold OUTPUT_MARKER, files only when named
    `*.plt-port`, so nothing another program wrote is touched."""
    for name in os.listdir(parent):
        match = TEMP_NAME.match(name)
        if not match or _process_alive(int(match.group(1))):
            continue
        path = os.path.join(parent, name)
        if os.path.isdir(path) and not os.path.islink(path):
            if os.path.exists(os.path.join(path, OUTPUT_MARKER)):
                shutil.rmtree(path, ignore_errors=True)
        elif name.endswith(".plt-port"):
            with contextlib.suppress(OSError):
                os.remove(path)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process / not a real PID
        return True
    return True


def _write_marker(folder: str) -> None:
    with open(os.path.join(folder, OUTPUT_MARKER), "w", encoding="utf-8") as f:
        f.write("written by plt-port; the next write replaces this folder as a whole\n")


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, inputs: tuple[str, ...] = ()) -> Iterator[str]:
    """Yield a temp dir beside `out_dir`; on success it takes `out_dir`'s place.

    An existing `out_dir` is replaced only if an earlier atomic_dir wrote it (the marker file)
    and it is not one of `inputs`. On any error (or interrupt) the temp dir is removed and
    `out_dir` is left as it was: the old folder is moved aside, the new one renamed in, and
    the old one put back if that rename fails. Temp folders left by killed writers are
    removed first.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    check_output_dir(out_dir, tuple(os.fspath(i) for i in inputs))
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    remove_stale_temps(parent)
    tmp = tempfile.mkdtemp(prefix=temp_prefix(out_dir, "tmp"), dir=parent)
    try:
        _write_marker(tmp)
        yield tmp
        if not os.path.isdir(out_dir):
            os.rename(tmp, out_dir)
            return
        old = tempfile.mkdtemp(prefix=temp_prefix(out_dir, "old"), dir=parent)
        try:
            _write_marker(old)
            os.rename(out_dir, os.path.join(old, "d"))
            try:
                os.rename(tmp, out_dir)
            except BaseException:
                os.rename(os.path.join(old, "d"), out_dir)
                raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_file(path: str | os.PathLike, write) -> None:
    """`write(tmp_path)` fills a uniquely named temp file beside `path`, then it is renamed
    over `path`: a reader sees the old file or the whole new one, never part of it."""
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    remove_stale_temps(os.path.dirname(path))
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path, "tmp"), suffix=".plt-port",
                               dir=os.path.dirname(path))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file through a uniquely named temp file beside it, renamed over `path`."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write_file(path, write)
