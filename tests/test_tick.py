"""The end of a scheduler tick (``_tickcore.Ticker``) and the send counters
the manager totals, without the kernel."""

from __future__ import annotations

import gc
import sys
from typing import Any

import pytest

from trio_uring._manager import SendCounters
from trio_uring._tickcore import Ticker


class Stream:
    def __init__(self, hold_tick: int) -> None:
        self.hold_tick = hold_tick


def recording_ticker() -> tuple[Ticker, list[tuple[int, float, list[Any]]]]:
    calls: list[tuple[int, float, list[Any]]] = []
    ticker: Ticker

    def flush(tick: int, timeout: float) -> None:
        calls.append((tick, timeout, list(ticker.pending)))

    ticker = Ticker(flush)
    return ticker, calls


def test_every_tick_is_counted_and_an_empty_one_flushes_nothing() -> None:
    ticker, calls = recording_ticker()
    for _ in range(5):
        ticker.before_io_wait(0.0)
    ticker.before_io_wait(1.5)
    assert ticker.tick == 6 and calls == []


def test_a_tick_whose_streams_are_all_held_is_skipped() -> None:
    ticker, calls = recording_ticker()
    ticker.tick = 7
    held = [Stream(7), Stream(7)]
    ticker.pending.extend(held)
    ticker.before_io_wait(0.0)
    assert calls == [] and ticker.tick == 8 and ticker.pending == held


def test_one_stream_not_held_flushes_the_tick_with_its_number() -> None:
    ticker, calls = recording_ticker()
    ticker.tick = 7
    streams = [Stream(7), Stream(-2), Stream(7)]
    ticker.pending.extend(streams)
    ticker.before_io_wait(0)
    assert calls == [(7, 0, streams)]
    # A stream held for an earlier tick is not held at this one.
    ticker.pending[:] = [Stream(7)]
    ticker.before_io_wait(0.0)
    assert [tick for tick, _, _ in calls] == [7, 8]


def test_nothing_is_held_when_trio_is_about_to_sleep() -> None:
    ticker, calls = recording_ticker()
    ticker.pending.append(Stream(0))
    ticker.before_io_wait(0.25)
    assert calls == [(0, 0.25, ticker.pending)]


def test_what_the_ticker_cannot_read_is_left_to_the_flush_not_raised() -> None:
    """trio drops an instrument whose hook raises: the tick must go on."""
    ticker, calls = recording_ticker()
    ticker.pending.append(object())  # no hold_tick
    ticker.before_io_wait(0.0)
    ticker.pending[:] = [Stream(1)]
    ticker.before_io_wait("soon")  # type: ignore[arg-type]
    assert [tick for tick, _, _ in calls] == [0, 1]


def test_a_stream_that_changes_the_list_while_it_is_read_is_safe() -> None:
    """Reading ``hold_tick`` may run Python code: the list being walked, or
    the stream read, must not be freed under the check (the ASan tier runs
    this file)."""
    ticker, calls = recording_ticker()

    class Replacing:
        @property
        def hold_tick(self) -> int:
            replacement: list[Any] = []
            # Fill CPython's free list of list objects, so that the list
            # dropped next is really freed (and seen by ASan) rather than
            # kept for reuse.
            spare: list[list[int]] = [[] for _ in range(200)]
            del spare
            ticker.pending = replacement  # drops the list the check walks, and this stream
            return 0  # held: the check goes on to the next item of the dropped list

    class Emptying:
        @property
        def hold_tick(self) -> int:
            del ticker.pending[:]
            return 1

    ticker.pending.append(Replacing())
    ticker.before_io_wait(0.0)  # held, and the list it was on is gone
    ticker.pending.extend([Emptying(), Stream(-2)])
    ticker.before_io_wait(0.0)  # held (1 is this tick), and nothing left to read
    assert calls == [] and ticker.pending == []
    ticker.pending.append(Stream(-2))
    ticker.before_io_wait(0.0)
    assert [tick for tick, _, _ in calls] == [2]


def test_keyboard_interrupt_while_reading_is_not_swallowed() -> None:
    ticker, calls = recording_ticker()

    class Interrupted:
        @property
        def hold_tick(self) -> int:
            raise KeyboardInterrupt

    ticker.pending.append(Interrupted())
    with pytest.raises(KeyboardInterrupt):
        ticker.before_io_wait(0.0)
    assert calls == []


def test_a_ticker_without_init_raises_instead_of_crashing() -> None:
    ticker = Ticker.__new__(Ticker)
    with pytest.raises(RuntimeError, match="__init__"):
        ticker.before_io_wait(0.0)
    with pytest.raises(RuntimeError, match="__init__"):
        ticker.pending  # noqa: B018
    ticker.pending = []
    assert ticker.pending == []


def test_the_flush_can_replace_the_pending_list() -> None:
    held: list[Any] = []

    def flush(tick: int, timeout: float) -> None:
        ticker.pending = held

    ticker = Ticker(flush)
    ticker.pending.append(Stream(-2))
    ticker.before_io_wait(0.0)
    assert ticker.pending is held
    with pytest.raises(TypeError, match="list"):
        ticker.pending = ()  # type: ignore[assignment]
    with pytest.raises(TypeError, match="callable"):
        Ticker(None)  # type: ignore[arg-type]


def test_an_error_in_the_flush_reaches_the_caller() -> None:
    def flush(tick: int, timeout: float) -> None:
        raise RuntimeError("flush failed")

    ticker = Ticker(flush)
    ticker.pending.append(Stream(-2))
    with pytest.raises(RuntimeError, match="flush failed"):
        ticker.before_io_wait(0.0)


def test_the_tick_is_an_int_object_and_anything_else_is_refused_clearly() -> None:
    ticker, calls = recording_ticker()
    ticker.tick = 2**62  # an int object, not a C integer: large ticks count on
    ticker.before_io_wait(0.0)
    assert ticker.tick == 2**62 + 1
    ticker.tick = "7"  # type: ignore[assignment]
    with pytest.raises(TypeError, match="tick must be an int"):
        ticker.before_io_wait(0.0)
    del ticker.tick
    with pytest.raises(RuntimeError, match="__init__ was not called"):
        ticker.before_io_wait(0.0)
    assert calls == []


def test_the_last_tick_a_c_integer_holds_is_not_wrapped_around() -> None:
    """tick + 1 past sys.maxsize is a signed overflow in C: it came out as
    -sys.maxsize - 1, a count gone backwards.  It is refused, as a tick too
    large for a C integer already was."""
    ticker, calls = recording_ticker()
    ticker.tick = sys.maxsize
    with pytest.raises(OverflowError):
        ticker.before_io_wait(0.0)
    assert ticker.tick == sys.maxsize and calls == []


def test_a_streams_counts_reach_the_totals_when_its_counters_die() -> None:
    totals = SendCounters()
    counters = SendCounters(totals)
    counters.sent(100)
    counters.sent(20)
    counters.notified(True)
    counters.notified(False)
    assert (totals.sends, totals.bytes) == (0, 0)  # one object updated per send
    del counters
    gc.collect()
    assert (totals.sends, totals.bytes, totals.notifications, totals.copied) == (2, 120, 2, 1)
