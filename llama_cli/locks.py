"""Advisory file locks (flock) that the system drops when their holder ends, however it ends (a kill, the OOM
killer, torchrun ending its workers): what keeps two runs from writing one --output_file or one converted
folder, and takes turns building our CPU kernels. Where the platform has no fcntl or the file system no locks
(some network mounts), callers go on unlocked, as they would without this module."""

from __future__ import annotations

HELD, BUSY, UNLOCKED = "held", "busy", "unlocked"


def try_lock(f) -> str:
    """Take an exclusive lock on `f` (a descriptor or an open file) without waiting: HELD; BUSY where another
    process holds it; UNLOCKED where there are no locks here."""
    try:
        import fcntl
    except ImportError:
        return UNLOCKED
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return BUSY
    except OSError:
        return UNLOCKED
    return HELD


def wait_lock(f) -> None:
    """Wait for the exclusive lock on `f` (after try_lock said BUSY)."""
    import fcntl

    fcntl.flock(f, fcntl.LOCK_EX)
