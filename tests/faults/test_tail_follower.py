"""The two Follower behaviours the churn test found missing, on real files, one step at a time."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from weightwatch.analysis.tail import MAX_LINE, Follower

pytestmark = pytest.mark.faults


def test_copytruncate_reads_the_lines_written_since_the_last_poll_from_the_copy(tmp_path: Path) -> None:
    log = tmp_path / "job.log"
    log.write_text("")
    f = Follower(str(log))
    with log.open("a") as fh:
        fh.write("one\n")
    assert f.poll() == [b"one"]
    with log.open("a") as fh:
        fh.write("two\nthree\n")  # written after our last read...
    shutil.copyfile(log, tmp_path / "job.log.1")  # ...then copied and truncated by logrotate
    log.write_text("")
    with log.open("a") as fh:
        fh.write("four\n")
    assert f.poll() == [b"two", b"three", b"four"]
    assert f.truncations == 1 and f.recovered_from_copy == 2
    f.close()


def test_an_overlong_line_is_dropped_whole_and_counted(tmp_path: Path) -> None:
    log = tmp_path / "job.log"
    log.write_text("")
    f = Follower(str(log))
    with log.open("ab") as fh:
        fh.write(b"x" * (2 * MAX_LINE) + b" [ckpt] write.done step=1 write_ms=1\nafter\n")
    assert f.poll() == [b"after"]
    assert f.overlong == 1
    f.close()
