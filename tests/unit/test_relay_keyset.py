"""The relay's keyset floor (worker.relay.Keyset): how far one round may move it.

Which ids are settled, and which rows a poll skipped, is read from PostgreSQL
(tests/integration/test_outbox_keyset.py); here, what the floor does with it."""

from __future__ import annotations

from worker.relay import Keyset


def test_a_short_batch_reaches_what_is_settled():
    k = Keyset()
    assert k.reach(settled=40, last_of_full_batch=None) == 40
    k.advance(40, 40)
    assert k.after == 40


def test_a_full_batch_reaches_no_further_than_its_last_id():
    k = Keyset()
    assert k.reach(settled=40, last_of_full_batch=25) == 25  # rows 26..40 may still wait behind the limit
    k.advance(40, 25)
    assert k.after == 25
    assert k.reach(settled=0, last_of_full_batch=None) == 40  # what an earlier round settled still counts


def test_nothing_settled_reaches_nothing_and_the_floor_never_goes_down():
    k = Keyset()
    assert k.reach(settled=0, last_of_full_batch=500) == 0  # published up to 500, but none known settled
    k.advance(90, 90)
    k.advance(60, 60)
    assert k.after == 90 and k.settled_to == 90
