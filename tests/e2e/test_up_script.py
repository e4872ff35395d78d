"""``scripts/up.sh``: Ctrl-C stops everything whatever its output is piped to, and
the logs are readable on a terminal, JSON lines elsewhere.

Each test runs ``bash scripts/up.sh relay`` (only the outbox relay under
honcho) with a database and a RabbitMQ vhost of this module's own, so a
service running on the machine is not disturbed.  The processes of a run are
found by a variable of the test's own in their environment: honcho starts
each Procfile process in a session of its own, so a process group would not
show one left behind.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from tests.support import wait_until

ROOT = Path(__file__).resolve().parents[2]
RUN = os.getpid()
DBNAME = f"orders_e2e_up_{RUN}"
VHOST = f"orders-e2e-up-{RUN}"
#: set in each test's up.sh environment, inherited by every process of that run
MARKER = "UP_SH_TEST_RUN"
#: seconds up.sh may take to start the relay (bootstrap, migrate, topology, catalogue)
START_TIMEOUT = 120
#: seconds everything may take to stop after Ctrl-C (honcho's SIGTERM, then its SIGKILL after 5 s)
STOP_TIMEOUT = 20
ANSI = re.compile(r"\x1b\[[0-9;]*m")

pytestmark = pytest.mark.timeout(600)


def _rabbitmqctl(*args: str) -> bool:
    try:
        return subprocess.run(["rabbitmqctl", *args], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def module_env() -> Iterator[dict[str, str]]:
    """up.sh's environment: this module's database and vhost, no ORDERS_* of the caller's."""
    _rabbitmqctl("add_vhost", VHOST)
    private = _rabbitmqctl("set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*")
    vhost = VHOST if private else "%2F"  # the relay of an empty outbox publishes nothing
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERS_")}
    env.update(
        ORDERS_ENVIRONMENT="development",
        ORDERS_DATABASE__DBNAME=DBNAME,
        ORDERS_RABBITMQ__URL=f"amqp://guest:guest@127.0.0.1:5672/{vhost}",
        ORDERS_METRICS__PORT="0",  # a local stack may hold the default ports
    )
    yield env
    from worker import db
    from worker.settings import load_settings

    db.drop_database(load_settings().database.model_copy(update={"dbname": DBNAME}))
    if private:
        _rabbitmqctl("delete_vhost", VHOST)


@pytest.fixture
def env(module_env: dict[str, str]) -> Iterator[dict[str, str]]:
    """The module's environment, marked for this test; what the test left running is killed after it."""
    run = f"{MARKER}={uuid.uuid4()}"
    yield {**module_env, MARKER: run.partition("=")[2]}
    left = _ours(run)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_until(lambda: not _ours(run), timeout=STOP_TIMEOUT, what=f"leftovers {left} to die")


def _ours(run: str) -> list[int]:
    """Live processes of one run (zombies have no environment to read)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if run.encode() in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def _run(env: dict[str, str]) -> str:
    return f"{MARKER}={env[MARKER]}"


def _relay_running(run: str) -> bool:
    """The run's `orders relay` process is up (not merely `up.sh relay`)."""
    for pid in _ours(run):
        try:
            args = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args[-2:] == [b"relay", b""] and args[-3].endswith(b"/orders"):
            return True
    return False


def _read_until(stream: IO[bytes], text: bytes) -> list[bytes]:
    lines = []
    deadline = time.monotonic() + START_TIMEOUT
    for line in stream:
        lines.append(line)
        if text in line:
            return lines
        assert time.monotonic() < deadline, b"".join(lines).decode(errors="replace")
    raise AssertionError(f"up.sh ended before {text!r}: {b''.join(lines).decode(errors='replace')}")


def _ctrl_c_stops_everything(up: subprocess.Popen[bytes], run: str) -> None:
    assert _relay_running(run), "the relay should be up before Ctrl-C"
    os.killpg(up.pid, signal.SIGINT)  # what the terminal sends the foreground pipeline
    wait_until(lambda: not _ours(run), timeout=STOP_TIMEOUT, interval=0.2, what="every process of up.sh to stop")
    assert up.wait(STOP_TIMEOUT) is not None


def test_ctrl_c_stops_everything_when_the_reader_of_the_output_is_gone(env: dict[str, str]) -> None:
    """`up.sh 2>&1 | tee up.log`, Ctrl-C: tee dies first, and honcho's next line goes nowhere."""
    up = subprocess.Popen(
        ["bash", "scripts/up.sh", "relay"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    assert up.stdout is not None
    lines = _read_until(up.stdout, b"relay active")
    up.stdout.close()  # tee is gone
    # off a terminal the logs are JSON lines
    relay_line = lines[-1].decode().partition("| ")[2]
    assert json.loads(relay_line)["event"] == "relay active"
    _ctrl_c_stops_everything(up, _run(env))


def test_ctrl_c_stops_everything_when_the_output_pipe_closed_at_once(env: dict[str, str]) -> None:
    """`up.sh | head -c 1`: the reader leaves after the first byte, long before honcho starts."""
    up = subprocess.Popen(
        ["bash", "-c", "bash scripts/up.sh relay 2>&1 | head -c 1 >/dev/null"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_until(
        lambda: _relay_running(_run(env)),
        timeout=START_TIMEOUT,
        interval=0.2,
        what="the relay to start behind a closed pipe",
    )
    _ctrl_c_stops_everything(up, _run(env))


def test_logs_are_readable_on_a_terminal_and_ctrl_c_stops_everything(env: dict[str, str]) -> None:
    primary, secondary = pty.openpty()
    up = subprocess.Popen(
        ["bash", "scripts/up.sh", "relay"],
        cwd=ROOT,
        env=env,
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        start_new_session=True,
    )
    os.close(secondary)
    seen = b""
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while b"relay active" not in seen:
            assert time.monotonic() < deadline, seen.decode(errors="replace")
            if select.select([primary], [], [], 1)[0]:
                seen += os.read(primary, 65536)
        line = next(ln for ln in ANSI.sub("", seen.decode(errors="replace")).splitlines() if "relay active" in ln)
        assert '"event"' not in line, line  # not a JSON line: structlog's console renderer
        assert re.search(r"\|\s+\S+Z \[info\s*\] relay active", line), line
        _ctrl_c_stops_everything(up, _run(env))
    finally:
        os.close(primary)
