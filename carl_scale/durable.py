"""Files that survive a machine crash: fsync before a rename makes a name the whole file or absent.

Used where a rename publishes something other runs trust (a shard, a manifest, a checkpoint, the
``latest`` pointer). Without it, a power cut or a lost node can leave a renamed file of the right
size holding zeros on ext4/XFS, and readers that check sizes would take it for whole.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

# Some FUSE and network mounts refuse fsync on a directory (the rename is then as durable as the
# mount makes it): not an error of the write, which has already happened
_DIR_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.ENOSYS, errno.EBADF, errno.EACCES, errno.EISDIR}


def fsync(path: str | Path) -> None:
    """Flush a file, or a directory's entries (where the file system supports it), to disk."""
    is_dir = os.path.isdir(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exn:
        if is_dir and exn.errno in _DIR_FSYNC_UNSUPPORTED:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exn:
        if not (is_dir and exn.errno in _DIR_FSYNC_UNSUPPORTED):
            raise
    finally:
        os.close(fd)


def durable_replace(tmp: str | Path, final: str | Path) -> None:
    """Rename a finished file (or directory, whose files the caller flushed) into place once its
    bytes are on disk, then flush the rename itself."""
    fsync(tmp)
    os.replace(tmp, final)
    fsync(os.path.dirname(os.path.abspath(final)))
