"""The harness leaves no process behind: a Python process that started service processes through
``scripts.harness`` and is then ended by SIGTERM or SIGHUP (as a killed pytest is), or exits,
takes each of them with it, their children included."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.harness import wait_until

ROOT = Path(__file__).resolve().parents[2]
#: a parent that starts a process group (a shell with a child of its own) and then waits, or exits
#: (SIGHUP at its default, as from a terminal: under nohup it is inherited ignored, and the harness rightly
#: leaves an ignored SIGHUP ignored, so the parent would outlive it)
PARENT = """
import signal, sys, time
from pathlib import Path
signal.signal(signal.SIGHUP, signal.SIG_DFL)
from scripts.harness import Proc
# the child's pid is written aside and renamed into place: the file appears with its content, never empty (a
# parent that exited on seeing an empty file took the shell with it before it wrote: "last: ''" in a CI run)
p = Proc("group", ["sh", "-c", "sleep 300 & echo $! > {kid}.tmp && mv {kid}.tmp {kid}; wait"], None, Path({log!r}))
print(p.pid, flush=True)
while not Path({kid!r}).exists():  # the shell has started its child: there is a group to take along
    time.sleep(0.05)
time.sleep(0 if {exit_at_once} else 120)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.parametrize("end", ["SIGTERM", "SIGHUP", "exit"])
def test_a_parent_ended_by_a_signal_or_exiting_takes_its_process_groups_with_it(tmp_path, end):
    kid_file = tmp_path / "kid"
    code = PARENT.format(kid=str(kid_file), log=str(tmp_path / "group.log"), exit_at_once=end == "exit")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    leader = int(parent.stdout.readline())
    kid = int(wait_until(lambda: kid_file.exists() and kid_file.read_text().strip(), timeout=10, what="the child"))
    if end != "exit":
        assert alive(leader) and alive(kid)
        parent.send_signal(getattr(signal, end))
    parent.wait(20)
    if end != "exit":
        assert parent.returncode == -getattr(signal, end)  # it still dies of the signal, as it would have
    wait_until(lambda: not alive(leader) and not alive(kid), timeout=10, what="the group to be gone")
