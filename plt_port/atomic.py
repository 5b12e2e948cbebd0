"""Outputs that appear whole or not at all: a folder or a text file is written beside its
target under a temporary name and renamed into place, so an interrupted write never leaves a
half-written model, report or JSON file behind.
"""

from __future__ import annotations

import contextlib
import os
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


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, inputs: tuple[str, ...] = ()) -> Iterator[str]:
    """Yield a temp dir beside `out_dir`; on success it takes `out_dir`'s place.

    An existing `out_dir` is replaced only if an earlier atomic_dir wrote it (the marker file)
    and it is not one of `inputs`. On any error (or interrupt) the temp dir is removed and
    `out_dir` is left as it was: the old folder is moved aside, the new one renamed in, and
    the old one put back if that rename fails.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    check_output_dir(out_dir, tuple(os.fspath(i) for i in inputs))
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        with open(os.path.join(tmp, OUTPUT_MARKER), "w", encoding="utf-8") as f:
            f.write("written by plt-port; the next write replaces this folder as a whole\n")
        yield tmp
        if not os.path.isdir(out_dir):
            os.rename(tmp, out_dir)
            return
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
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


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file through a uniquely named temp file beside it, renamed over `path`."""
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-",
                               dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp)
        raise
