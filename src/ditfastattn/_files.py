"""Writing outputs so that a failure never leaves a half-written file or destroys the previous one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def write_atomically(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(temporary)`` on a file beside ``path``, then move it onto ``path`` in one step.

    The temporary file's name does not end in ``path``'s extension: writers that infer a format
    from the name must be told it.
    """
    path = Path(path)
    # Errors name the user's path, not the temporary file's.
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a folder; give a file name")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: the folder {path.parent} does not exist")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
