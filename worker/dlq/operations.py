"""Dead-letter operations: browse, replay, purge, export.

Every operation opens one :class:`worker.rabbit.dead_letters.DeadLetterSession`, which
takes the *whole* queue into hand (unacked), acks only what was moved
(replay: after the broker confirmed the republish; purge: after the export
was written) and gives the rest back in queue order.  A run killed at any
instruction loses nothing: what it had not acked goes back to the queue; a
message republished but not yet acked is then both replayed and still dead-
lettered until the next run, and the inbox makes its second apply a no-op.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path

import structlog
from sqlalchemy import Engine, text

from schema.topology import DEAD_LETTER_QUEUE, QUEUE_ACCEPTS, queue_of, wrong_queue
from worker.dlq import audit as dlq_audit
from worker.dlq import index as dlq_index
from worker.dlq.letters import DeadLetter, format_age, replay_headers
from worker.errors import BrokerError, PublishNotConfirmed
from worker.identity import Identities
from worker.rabbit.connection import Outgoing
from worker.rabbit.dead_letters import DeadLetterQueueBusy, DeadLetterSession
from worker.rabbit.topology import queue_depths
from worker.settings import Settings

log = structlog.get_logger("worker.dlq")


#: PostgreSQL advisory lock of the one process reading the queue into the index
INDEX_LOCK = 0x4F52_444C_5149  # "ORDLQI"


@dataclass(frozen=True)
class Selection:
    """Which dead letters: ids (any of), and every filter given (all of)."""

    ids: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    error_classes: tuple[str, ...] = ()
    queues: tuple[str, ...] = ()
    older_than: timedelta | None = None
    newer_than: timedelta | None = None
    everything: bool = False

    @property
    def is_empty(self) -> bool:
        return not (
            self.ids
            or self.types
            or self.error_classes
            or self.queues
            or self.older_than
            or self.newer_than
            or self.everything
        )

    @cached_property
    def _id_set(self) -> frozenset[str]:
        # a console replay of a group names thousands of ids: a set, not a scan of the tuple per message
        return frozenset(self.ids)

    @property
    def by_age(self) -> bool:
        return self.older_than is not None or self.newer_than is not None

    def matches(self, dl: DeadLetter, now: datetime, undated: bool = True) -> bool:
        """Whether ``dl`` is selected. ``undated``: what an age filter does with a letter that
        carries no time at all (:attr:`DeadLetter.landed_at` is None): its age is unknown, so
        it is kept (True: ``list``, ``export``, ``replay``) or left (False: ``purge``), and the
        caller says which with :func:`undated_note`, never silently."""
        if not self._named(dl):
            return False
        landed = dl.landed_at
        if landed is None:
            return undated or not self.by_age
        if self.older_than is not None and now - landed < self.older_than:
            return False
        if self.newer_than is not None and now - landed > self.newer_than:
            return False
        return True

    def undated(self, letters: list[DeadLetter]) -> list[DeadLetter]:
        """The letters of ``letters`` an age filter of this selection cannot date (all its other filters match)."""
        if not self.by_age:
            return []
        return [dl for dl in letters if dl.landed_at is None and self._named(dl)]

    def _named(self, dl: DeadLetter) -> bool:
        """Ids, types, error classes and queues: everything but the ages."""
        if self.ids and dl.id not in self._id_set:
            return False
        if self.types and dl.delivery.message_type not in self.types:
            return False
        if self.error_classes and dl.error_class not in self.error_classes:
            return False
        return not (self.queues and dl.original_queue not in self.queues)

    def describe(self) -> str:
        shown = ", ".join(self.ids[:5]) + (f" … ({len(self.ids)} in all)" if len(self.ids) > 5 else "")
        parts = [f"id {shown}"] if self.ids else []
        parts += [
            f"{name} {', '.join(vals)}"
            for name, vals in (("type", self.types), ("error", self.error_classes), ("queue", self.queues))
            if vals
        ]
        parts += [f"older than {format_age(self.older_than)}"] if self.older_than else []
        parts += [f"newer than {format_age(self.newer_than)}"] if self.newer_than else []
        return "; ".join(parts) or "all"


#: seconds a dlq command waits for another session (another command, the console's index) to finish
LOCK_WAIT_SECONDS = 15.0


def undated_note(selection: Selection, ids: list[str], kept: bool) -> str | None:
    """What an age filter did with letters that carry no time (None when there were none)."""
    if not ids:
        return None
    ages = " and ".join(
        f"--{name} {format_age(value)}"
        for name, value in (("older-than", selection.older_than), ("newer-than", selection.newer_than))
        if value is not None
    )
    shown = ", ".join(ids[:5]) + (f" … (+{len(ids) - 5})" if len(ids) > 5 else "")
    return (
        f"{len(ids)} dead letter(s) carry no time (no failure headers, no x-death, no timestamp property), "
        f"so {ages} cannot date them; "
        + ("included, as their age is unknown" if kept else "left in the queue: name them by id to purge them")
        + f": {shown}"
    )


@contextmanager
def session(
    settings: Settings, lock_wait_seconds: float = LOCK_WAIT_SECONDS
) -> Iterator[tuple[DeadLetterSession, list[DeadLetter]]]:
    """The dead-letter queue taken into hand: (session, every message in queue order)."""
    s = DeadLetterSession(
        settings.rabbitmq.url.get_secret_value(),
        settings.rabbitmq.heartbeat_seconds,
        lock_wait_seconds=lock_wait_seconds,
    )
    try:
        depth = s.open()
        yield s, [DeadLetter.from_delivery(d) for d in s.deliveries(depth)]
    finally:
        s.close()


def browse(settings: Settings, selection: Selection, lock_wait_seconds: float = LOCK_WAIT_SECONDS) -> list[DeadLetter]:
    """The matching dead letters (with those an age filter cannot date: ``selection.undated``);
    the queue is left exactly as it was."""
    now = datetime.now(UTC)
    with session(settings, lock_wait_seconds) as (_, letters):
        return [dl for dl in letters if selection.matches(dl, now)]


@dataclass
class Report:
    """What a replay or purge did."""

    selected: list[str] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    interrupted: str | None = None
    #: letters an age filter could not date: selected anyway (replay), or left in the queue (purge)
    undated: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "selected": len(self.selected),
            "moved": self.moved,
            "failed": [{"id": i, "reason": r} for i, r in self.failed],
            "interrupted": self.interrupted,
            "undated": self.undated,
        }


@dataclass(frozen=True)
class ReplayOptions:
    actor: str
    to_queue: str | None = None
    rate: float | None = None
    edited_body: bytes | None = None
    dry_run: bool = False


def misplaced(dl: DeadLetter, to_queue: str | None) -> str | None:
    """Why replaying ``dl`` would only dead-letter it again: its type does not belong on the queue it
    would reach (``--to``, else the queue it failed on). None for a queue that is not the service's."""
    queue = to_queue or dl.original_queue
    if queue not in QUEUE_ACCEPTS:
        return None
    reason = wrong_queue(queue, dl.delivery.message_type)
    if reason is None:
        return None
    home = queue_of(dl.delivery.message_type)
    return f"{reason}; " + (f"replay it with --to {home}" if home else "purge it")


def _outgoing(dl: DeadLetter, opts: ReplayOptions, now: datetime, identities: Identities) -> Outgoing:
    if opts.to_queue:
        exchange, key = "", opts.to_queue  # the default exchange routes by queue name
    elif dl.destination is not None:
        exchange, key = dl.destination
    else:
        raise PublishNotConfirmed("no original exchange/routing key recorded; replay it with --to QUEUE")
    headers = replay_headers(dl.delivery, now, opts.actor)
    if opts.edited_body is not None:
        headers["x-replay-edited"] = True
    body = dl.delivery.body if opts.edited_body is None else opts.edited_body
    # republished as the service's own user: the first sender is carried, so a replay is judged as theirs
    return Outgoing(
        exchange, key, body, identities.carry(dl.delivery, {**dl.delivery.properties(), "headers": headers})
    )


def replay(
    settings: Settings,
    engine: Engine,
    selection: Selection,
    opts: ReplayOptions,
    on_start: Callable[[int], None] = lambda n: None,
    on_each: Callable[[DeadLetter], None] = lambda dl: None,
) -> Report:
    """Republish the selected dead letters with confirms; ack each only once confirmed."""
    report = Report()
    now = datetime.now(UTC)
    identities = Identities.of(settings)
    with session(settings) as (s, letters):
        chosen = [dl for dl in letters if selection.matches(dl, now)]
        report.selected = [dl.id for dl in chosen]
        report.undated = [dl.id for dl in selection.undated(chosen)]
        if opts.edited_body is not None and len(chosen) != 1:
            raise ValueError(f"--edit needs exactly one message; the selection matches {len(chosen)}")
        if opts.dry_run or not chosen:
            return report
        target = f"to queue {opts.to_queue}" if opts.to_queue else "to the original exchange"
        detail = (
            f"{len(chosen)} message(s) ({selection.describe()}) {target}"
            + (", body edited" if opts.edited_body is not None else "")
            + (f", at most {opts.rate}/s" if opts.rate else "")
        )
        audit_id = dlq_audit.start(engine, "replay", opts.actor, report.selected, detail)
        on_start(len(chosen))
        started = time.monotonic()
        try:
            for i, dl in enumerate(chosen):
                if opts.rate:
                    wait = started + i / opts.rate - time.monotonic()
                    if wait > 0:
                        s.sleep(wait)
                wrong = misplaced(dl, opts.to_queue)
                if wrong is not None:
                    report.failed.append((dl.id, wrong))  # a queue takes only its own commands
                    on_each(dl)
                    continue
                try:
                    s.republish(_outgoing(dl, opts, datetime.now(UTC), identities))
                except PublishNotConfirmed as exc:
                    report.failed.append((dl.id, str(exc)))  # stays in the dead-letter queue
                else:
                    s.remove(dl.delivery)
                    report.moved.append(dl.id)
                on_each(dl)
        except BrokerError as exc:
            report.interrupted = str(exc)
        finally:
            dlq_audit.finish(engine, audit_id, report.moved, _outcome("replayed", report, detail))
            _forget(engine, report.moved)
    return report


def _outcome(verb: str, report: Report, extra: str) -> str:
    text = f"{verb} {len(report.moved)} of {len(report.selected)}: {extra}"
    if report.failed:
        text += f"; {len(report.failed)} left in the queue ({report.failed[0][1]})"
    if report.interrupted:
        text += f"; interrupted: {report.interrupted}"
    return text


def write_jsonl(letters: list[DeadLetter], path: Path) -> None:
    """The messages as JSON lines (everything ``show`` prints), flushed to disk."""
    with path.open("w", encoding="utf-8") as out:
        for dl in letters:
            out.write(json.dumps(dl.full(), default=str) + "\n")
        out.flush()
        os.fsync(out.fileno())


def purge(
    settings: Settings,
    engine: Engine,
    selection: Selection,
    actor: str,
    export_to: Path | None = None,
    only_ids: set[str] | None = None,
) -> Report:
    """Remove the selected dead letters (after exporting them, when asked)."""
    report = Report()
    now = datetime.now(UTC)
    with session(settings) as (s, letters):
        wanted = [dl for dl in letters if only_ids is None or dl.id in only_ids]
        chosen = [dl for dl in wanted if selection.matches(dl, now, undated=False)]
        report.selected = [dl.id for dl in chosen]
        report.undated = [dl.id for dl in selection.undated(wanted)]  # never purged by an age it cannot know
        if not chosen:
            return report
        if export_to is not None:
            write_jsonl(chosen, export_to)
        detail = f"{len(chosen)} message(s) ({selection.describe()})" + (
            f", exported to {export_to}" if export_to else ""
        )
        audit_id = dlq_audit.start(engine, "purge", actor, report.selected, detail)
        try:
            for dl in chosen:
                s.remove(dl.delivery)
                report.moved.append(dl.id)
        except BrokerError as exc:
            report.interrupted = str(exc)
        finally:
            dlq_audit.finish(engine, audit_id, report.moved, _outcome("purged", report, detail))
            _forget(engine, report.moved)
    return report


def _forget(engine: Engine, moved: list[str]) -> None:
    """What moved leaves the dead-letter index (the console's) at once; never a reason to fail the command."""
    try:
        dlq_index.forget(engine, moved)
    except Exception as exc:  # noqa: BLE001 - the index is rebuilt from the queue when it no longer matches
        log.warning("dead-letter index not updated", error=f"{type(exc).__name__}: {exc}")


def refresh_index(settings: Settings, engine: Engine, force: bool = False) -> dlq_index.IndexState:
    """Read the dead-letter queue into the index (:mod:`worker.dlq.index`) when it looks changed.

    Changed: its depth is not the index's, a dlq command marked it, or
    ``force``.  One refresher at a time across processes (an advisory lock;
    another caller gets the index as it is), and it never waits for the
    queue: while an ``orders dlq`` command holds it, the index stays as it
    was and says so.  The queue is held only while it is read; the index is
    written after it was given back.
    """
    with engine.connect() as conn:
        if not conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": INDEX_LOCK}).scalar():
            return dlq_index.state(engine)  # another process is reading the queue right now
        conn.commit()
        try:
            current = dlq_index.state(engine)
            if not force and not current.stale and current.refreshed_at is not None:
                found = queue_depths(settings.rabbitmq.url.get_secret_value(), [DEAD_LETTER_QUEUE])[DEAD_LETTER_QUEUE]
                if found is not None and found[0] == current.depth:
                    return current
            started = time.monotonic()
            try:
                letters = browse(settings, Selection(everything=True), lock_wait_seconds=0)
            except DeadLetterQueueBusy as exc:
                dlq_index.note_error(engine, str(exc))
                return dlq_index.state(engine)
            return dlq_index.store(engine, letters, int((time.monotonic() - started) * 1000))
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": INDEX_LOCK})
            conn.commit()
