"""Reading the files of a model directory or export: regular files only, JSON with one error.

A FIFO or device in a model directory would block `open` forever, and JSON nested deep
enough makes the parser raise RecursionError; both become a `FileError` naming the file.
"""

from __future__ import annotations

import json
import os
import stat

from .errors import PLTError


class FileError(PLTError, ValueError):
    """A file of a model directory that is missing, not a regular file, or not readable JSON."""


def check_regular_file(path: str | os.PathLike, error: type[PLTError] = FileError) -> int:
    """The size of `path`, which must be a regular file (symlinks to one are followed).

    `error`: the PLTError subclass to raise (the caller's domain: config, checkpoint, ...)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise error(f"{os.fspath(path)}: no such file") from None
    except OSError as exc:
        raise error(f"{os.fspath(path)}: cannot read ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{os.fspath(path)}: not a regular file")
    return info.st_size


def parse_json(text: str | bytes, what: str, error: type[PLTError] = FileError,
               pairs_hook=None):
    """`json.loads` with every failure (syntax, bad UTF-8, nesting too deep) an `error`."""
    try:
        return json.loads(text, object_pairs_hook=pairs_hook)
    except RecursionError:
        raise error(f"{what}: unreadable JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise error(f"{what}: unreadable JSON ({exc})") from None


def read_json_object(path: str | os.PathLike, error: type[PLTError] = FileError) -> dict:
    """The JSON object stored in the regular file `path`."""
    check_regular_file(path, error)
    with open(path, "rb") as f:
        data = parse_json(f.read(), os.fspath(path), error)
    if not isinstance(data, dict):
        raise error(f"{os.fspath(path)}: expected a JSON object")
    return data
