"""bench.syscalls reads strace's summary table: calls per system call, with or without an errors column."""

from __future__ import annotations

from pathlib import Path

from bench.syscalls import strace_counts

SUMMARY = """strace: Process 3389 attached with 9 threads
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 59.21    0.945686         184      5128       774 futex
 21.75    0.347423         141      2461           epoll_wait
  0.35    0.005649           2      2168           recvfrom
------ ----------- ----------- --------- --------- ----------------
100.00    1.597272          64      9757       774 total
"""


def test_strace_counts_reads_calls_per_system_call(tmp_path: Path) -> None:
    path = tmp_path / "router.txt"
    path.write_text(SUMMARY)
    assert strace_counts(path) == {"futex": 5128, "epoll_wait": 2461, "recvfrom": 2168}
