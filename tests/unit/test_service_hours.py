"""dispynode's service hours (--service_start/--service_stop/--service_end) at
given times of day: no clock is read."""

from __future__ import annotations

import datetime as dt

import pytest

from dispynode.service import ENDED, SERVING, STOPPED, ServiceHours


def at(hhmm: str, day: int = 4) -> dt.datetime:
    h, m = map(int, hhmm.split(":"))
    return dt.datetime(2026, 12, day, h, m)


def hours(start, stop=None, end=None) -> ServiceHours:
    return ServiceHours.from_options(start, stop, end)


def test_overnight_window_as_in_dispys_documentation():
    """dispy's own example: 17:00 to 6:00, running jobs stopped at 8:00."""
    sh = hours("17:00", "6:00", "8:00")
    assert [sh.state(at(t)) for t in ("16:59", "17:00", "23:59", "0:00", "5:59")] == [ENDED] + [
        SERVING
    ] * 4
    assert [sh.state(at(t)) for t in ("6:00", "7:59", "8:00", "12:00")] == [
        STOPPED,
        STOPPED,
        ENDED,
        ENDED,
    ]


def test_next_change_is_the_next_mark_across_midnight():
    sh = hours("17:00", "6:00", "8:00")
    assert sh.next_change(at("12:00")) == at("17:00")
    assert sh.next_change(at("17:00")) == at("6:00", day=5)
    assert sh.next_change(at("23:30")) == at("6:00", day=5)
    assert sh.next_change(at("6:30")) == at("8:00")
    assert sh.next_change(at("8:00")) == at("17:00")


@pytest.mark.parametrize(
    "stop,end,states",
    [
        ("12:00", None, [SERVING, STOPPED, STOPPED]),  # stop only: no job is ever stopped
        (None, "12:00", [SERVING, ENDED, ENDED]),
    ],
)
def test_stop_or_end_alone(stop, end, states):
    sh = hours("9:00", stop, end)
    assert [sh.state(at(t)) for t in ("10:00", "12:00", "8:59")] == states


@pytest.mark.parametrize(
    "args,message",
    [
        (("9:00", None, None), "--service_start needs --service_stop or --service_end"),
        ((None, "9:00", None), "need --service_start"),
        (("9:60", "10:00", None), "--service_start '9:60' is not a time of day"),
        (("nine", "10:00", None), "is not a time of day"),
        (("9:00", "9:00", None), "--service_stop is the same time as --service_start"),
        (("9:00", "12:00", "11:00"), "--service_stop must come before --service_end"),
    ],
)
def test_bad_hours_name_the_option(args, message):
    with pytest.raises(ValueError, match=message):
        hours(*args)


def test_no_options_no_hours():
    assert ServiceHours.from_options(None, None, None) is None
