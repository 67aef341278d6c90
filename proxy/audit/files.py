"""Files where audit rows wait on disk: private to the proxy's user, claimed by one process at once.

Rows hold who called what and from where, so their folder is 0700 and each file 0600, whatever
the umask or an older version left behind. A writer holds an exclusive `flock` on a file while it
may still append to it; any process may replay a file it can lock: the kernel drops a dead
process's locks, whatever its pid is later reused for.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO


def private_folder(folder: Path) -> Path:
    """`folder`, made if missing, readable by its owner only."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    # mkdir's mode is masked by the umask, and a folder made before keeps whatever it had.
    os.chmod(folder, 0o700)
    return folder


def open_private(path: Path, *, new: bool = False) -> int:
    """A descriptor appending to `path` (0600); `new` insists that the file did not exist."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | (os.O_EXCL if new else 0)
    fd = os.open(path, flags, 0o600)
    if not new:
        os.fchmod(fd, 0o600)  # a file made by an older version may be readable by others
    return fd


def lock(fd: int) -> None:
    """Hold `fd`'s file for as long as it is open: no other writer replays it meanwhile."""
    fcntl.flock(fd, fcntl.LOCK_EX)


def claim(path: Path) -> IO[str] | None:
    """`path` open for reading and locked by us, or None: a live writer holds it, or it is gone."""
    try:
        handle = path.open("r", encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()  # a live writer still appends to it
        return None
    if os.fstat(handle.fileno()).st_nlink == 0:
        handle.close()  # replayed and deleted by someone else meanwhile
        return None
    return handle
