"""One `error:` line per failed job on each machine, whichever rank gets there first.

An error that is the same on every rank (a bad config, an unusable run.dir, ranks that
disagree, a non-finite loss) should be printed once, not once per rank. Rank 0 alone used to
print it; but a launcher stops the other workers as soon as one exits, so a rank 0 slower
than its peers could be killed before it wrote the line, and the user saw only torchrun's
failure report. Now every rank that meets such an error claims the line through a marker
file in the temp directory named after the job: the first to claim it writes it, the others
wait until it is written (briefly: the claimant is at that moment about to write) and exit
silently. No rank exits before the line is out.

A job is the launcher's run id and restart attempt, the rendezvous address and the world
size. The marker names the process that claimed it, which may claim it again for a later
error; a marker older than this process is a previous job's (the same address and port used
again) and is claimed afresh, so is one left by ranks started by hand seconds apart, in
separate terminals: each terminal then shows the line.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

WRITTEN = b"written\n"
WAIT_S = 10.0  # how long a rank that lost the claim waits for the claimant's line before writing its own


def write_line(text: str) -> None:
    # one write call: lines from several ranks sharing a pipe stay whole
    sys.stderr.write(text)
    sys.stderr.flush()


def _job_key() -> Optional[str]:
    if os.environ.get("WORLD_SIZE", "1") == "1":
        return None
    job = [os.environ.get(name, "") for name in ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "MASTER_ADDR",
                                                  "MASTER_PORT", "WORLD_SIZE")]
    return hashlib.sha256("\0".join(job).encode()).hexdigest()[:20]


def _process_start_time() -> float:
    """When this process was started, to 1/100 s (Linux: its start in clock ticks since boot), else now."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time()


def _claim(marker: Path) -> Optional[int]:
    """A descriptor of the marker if this process claimed the line, None if another rank of this job has."""
    mine = f"pid {os.getpid()}\n".encode()
    for _ in range(2):
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            os.write(fd, mine)
            return fd
        except FileExistsError:
            try:
                if marker.read_bytes().startswith(mine):  # this process claimed it for an earlier error
                    fd = os.open(marker, os.O_WRONLY | os.O_TRUNC)
                    os.write(fd, mine)
                    return fd
                if marker.stat().st_mtime >= _process_start_time() - 0.01:
                    return None  # claimed by another rank of this job
                marker.unlink()  # a previous job's, at the same address: claim it afresh
            except FileNotFoundError:
                pass
    return None


def _written(marker: Path) -> bool:
    try:
        return marker.read_bytes().endswith(WRITTEN)
    except OSError:
        return False


def write_error_once(text: str) -> None:
    """Write `text` (one line) to stderr unless another rank of this job on this machine does."""
    key = _job_key()
    if key is None:
        write_line(text)
        return
    marker = Path(tempfile.gettempdir()) / f"moe-trainer-error-{key}"
    try:
        fd = _claim(marker)
    except OSError:  # no usable temp directory: every rank writes rather than none
        write_line(text)
        return
    if fd is None:
        deadline = time.monotonic() + WAIT_S
        while not _written(marker) and time.monotonic() < deadline:
            time.sleep(0.01)
        if not _written(marker):  # the claimant died before writing: better twice than never
            write_line(text)
        return
    try:
        write_line(text)
        os.write(fd, WRITTEN)
    finally:
        os.close(fd)
