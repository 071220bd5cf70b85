"""Writing outputs so that a failure never leaves a half-written file or destroys the previous one."""

from __future__ import annotations

import errno
import os
import secrets
import stat
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
    reason = unwritable_reason(path)
    if reason is not None:
        raise OSError(f"cannot write {path}: {reason}")
    target = output_target(path)
    reason = folder_reason(target)
    if reason is not None:
        raise FileNotFoundError(f"cannot write {path}: {reason}")
    # A short name of its own: the output's name with a prefix could pass the file system's limit.
    tmp = target.with_name(f".ditfastattn-{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def output_target(path: Path) -> Path:
    """The file an output at ``path`` goes to: through a link to its file (the link kept), else ``path``."""
    return path.resolve() if path.is_symlink() else path


def folder_reason(target: Path) -> str | None:
    """Why the folder an output goes into cannot take it (none there, or a file), or None."""
    if target.parent.is_dir():
        return None
    return f"the folder {target.parent} {'is not a folder' if target.parent.exists() else 'does not exist'}"


def unwritable_reason(path: Path) -> str | None:
    """Why an output cannot replace what is at ``path`` (something other than a file, such as a pipe
    or a device, which a replace would swap out; a link that loops), or None."""
    try:
        output_target(path)
        mode = path.stat().st_mode
    except RuntimeError:  # resolve() on a link loop, before Python 3.13
        return _LOOP
    except OSError as err:
        if err.errno == errno.ELOOP:
            return _LOOP
        return None  # nothing there (or no folder), which the checks of the folder name
    return None if stat.S_ISREG(mode) else "it exists and is not a regular file (a pipe, a device?); give a file name"


_LOOP = "it is a link that leads back to itself; give a file name"
