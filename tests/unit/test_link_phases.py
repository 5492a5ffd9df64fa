"""The node link's phases (``dispy.runtime.link``): one transition table, as
``jobstate`` is for jobs."""

import pytest

from dispy.runtime import link
from dispy.runtime.link import Phase, next_phase


def test_the_life_of_a_link():
    p = Phase.DOWN
    for event, want in [
        (link.CONNECTED, Phase.UP),
        (link.SET_UP, Phase.READY),
        (link.SUSPEND, Phase.SUSPECT),  # lost while ready: its jobs wait
        (link.CONNECTED, Phase.SUSPECT),  # reconnected, not yet told what it has
        (link.BACK, Phase.UP),
        (link.SET_UP, Phase.READY),
        (link.LOST, Phase.DOWN),  # lost with no window left: its jobs are lost now
        (link.CONNECTED, Phase.UP),
        (link.LOST, Phase.DOWN),  # lost while being set up
    ]:
        p = next_phase(p, event)
        assert p is want, event
    assert next_phase(Phase.SUSPECT, link.DEAD) is Phase.DOWN
    assert all(next_phase(q, link.FAIL) is Phase.FAILED for q in Phase)


@pytest.mark.parametrize(
    "phase, event",
    [
        (Phase.DOWN, link.SET_UP),  # set up without a connection
        (Phase.SUSPECT, link.SET_UP),  # jobs given before the node said what it has
        (Phase.READY, link.CONNECTED),  # a second connection while one is in use
        (Phase.UP, link.SUSPEND),  # only a ready node has jobs to wait for
        (Phase.READY, link.DEAD),
        (Phase.FAILED, link.CONNECTED),  # a failed link stays stopped
    ],
)
def test_what_cannot_happen_is_a_bug_not_a_silent_change(phase, event):
    with pytest.raises(RuntimeError, match="no transition"):
        next_phase(phase, event)
