"""`shoal` that reports on stderr every file it opens for writing, with the monotonic time (run as a script): what
private mode must not do while it serves."""

import os
import sys
import time

from shoal.cli import app

WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def audit(event: str, args: tuple) -> None:
    if event == "open" and isinstance(args[0], str | bytes):
        mode, flags = args[1], args[2]
        if (isinstance(mode, str) and set(mode) & set("wax+")) or (isinstance(flags, int) and flags & WRITE):
            sys.__stderr__.write(f"OPENED FOR WRITING at {time.monotonic()}: {args[0]!r}\n")


if __name__ == "__main__":
    sys.addaudithook(audit)
    app()
