"""Copies that cost nothing where the file system allows: a reflink (a copy-on-write clone).

A reflink shares the source's blocks until either file is written, like a hard link, but it is a file of
its own: an in-place edit or damage to one leaves the other whole. Btrfs, XFS (with reflink=1, the default
of its recent tools), bcachefs, ZFS 2.2+ and APFS-like systems have them; ext4 and tmpfs do not.
"""

from __future__ import annotations

import os

FICLONE = 0x40049409  # Linux ioctl: make the target file a clone of the source's whole content


def reflink(source: os.PathLike | str, destination: os.PathLike | str) -> bool:
    """Make ``destination`` (which must not exist) a reflink of ``source``, keeping its permissions. False
    where the file system (or this OS) has none: then nothing is left at ``destination``. An error opening
    the files is raised as usual (OSError)."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        return False
    with open(source, "rb") as original:
        descriptor = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                             os.fstat(original.fileno()).st_mode & 0o7777)
        try:
            fcntl.ioctl(descriptor, FICLONE, original.fileno())
        except OSError:  # EOPNOTSUPP, EXDEV (another file system), EINVAL, ENOTTY: no clone here
            os.close(descriptor)
            os.unlink(destination)
            return False
        os.close(descriptor)
    stat = os.stat(source)
    os.utime(destination, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return True
