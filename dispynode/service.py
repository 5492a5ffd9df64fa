"""Service hours: the times of day a node takes jobs (dispy's ``--service_start``,
``--service_stop``, ``--service_end``).

Every day, from *start* the node serves; from *stop* it takes no new jobs
(running ones go on); from *end* it also stops the jobs still running.  Jobs it
does not run are handed back to their clients, which run them elsewhere or
later: none is lost.  A window may cross midnight (17:00 to 06:00).

Pure: the state at a given ``datetime`` and when it next changes.  The node
asks with its clock (tests give it a fake one).
"""

from __future__ import annotations

import datetime as dt

SERVING = "serving"
STOPPED = "stopped"  # no new jobs; running ones go on
ENDED = "ended"  # no jobs at all: running ones were stopped

_DAY = 24 * 3600


def parse_time(text: str, option: str) -> int:
    """``'HH:MM'`` (or ``'HH:MM:SS'``) as seconds after midnight; ``ValueError`` naming
    ``option`` otherwise."""
    parts = str(text).strip().split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        h, m = int(parts[0]), int(parts[1])
        s = int(parts[2]) if len(parts) == 3 else 0
        if not (0 <= h < 24 and 0 <= m < 60 and 0 <= s < 60):
            raise ValueError
    except ValueError:
        raise ValueError(
            f"{option} {text!r} is not a time of day: give it as HH:MM, e.g. 17:30"
        ) from None
    return h * 3600 + m * 60 + s


class ServiceHours:
    """A daily window: ``start``, then ``stop`` and/or ``end`` (seconds after midnight)."""

    def __init__(self, start: int, stop: int | None = None, end: int | None = None) -> None:
        if stop is None and end is None:
            raise ValueError("--service_start needs --service_stop or --service_end (or both)")
        self.start, self.stop, self.end = start, stop, end
        # offsets from start, within one day
        self._stop = (stop - start) % _DAY if stop is not None else None
        self._end = (end - start) % _DAY if end is not None else None
        for name, off in (("--service_stop", self._stop), ("--service_end", self._end)):
            if off == 0:
                raise ValueError(f"{name} is the same time as --service_start")
        if self._stop is not None and self._end is not None and self._end < self._stop:
            raise ValueError("--service_stop must come before --service_end (after the start)")

    @classmethod
    def from_options(cls, start, stop, end) -> ServiceHours | None:
        """From the command line's texts; None when no option is given."""
        if start is None and stop is None and end is None:
            return None
        if start is None:
            raise ValueError("--service_stop/--service_end need --service_start")
        return cls(
            parse_time(start, "--service_start"),
            parse_time(stop, "--service_stop") if stop is not None else None,
            parse_time(end, "--service_end") if end is not None else None,
        )

    def _offset(self, now: dt.datetime) -> float:
        secs = now.hour * 3600 + now.minute * 60 + now.second + now.microsecond / 1e6
        return (secs - self.start) % _DAY

    def state(self, now: dt.datetime) -> str:
        off = self._offset(now)
        first = min(x for x in (self._stop, self._end) if x is not None)
        if off < first:
            return SERVING
        if self._end is not None and off >= self._end:
            return ENDED
        return STOPPED

    def next_change(self, now: dt.datetime) -> dt.datetime:
        """The next time (after ``now``) the state may change."""
        off = self._offset(now)
        marks = sorted(x for x in (0, self._stop, self._end) if x is not None)
        later = [m for m in marks if m > off]
        wait = (later[0] if later else _DAY) - off
        return now + dt.timedelta(seconds=wait)

    def describe(self) -> str:
        def hm(s):
            return f"{s // 3600:02d}:{s // 60 % 60:02d}"

        text = f"from {hm(self.start)}"
        if self.stop is not None:
            text += f", no new jobs from {hm(self.stop)}"
        if self.end is not None:
            text += f", running jobs stopped at {hm(self.end)}"
        return text
