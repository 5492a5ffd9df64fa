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


class _Link:
    def __init__(self, host, port, address=None, phase=Phase.READY, closing=False):
        self.host, self.port, self.key = host, port, (host, port)
        self.address = address or host
        self.phase, self._closing = phase, closing


def test_one_link_per_node_by_its_run_id():
    links = {}
    ids = link.NodeIds(links)
    a = links[("n1", 51348)] = _Link("n1", 51348, address="10.0.0.1")
    assert ids.claim("run-1", a)
    # found again by discovery, by address or by run id: known already
    assert ids.known("10.0.0.1", 51348, "other") and ids.known("n1", 51348, None)
    assert ids.known("10.9.9.9", 51348, "run-1")
    assert not ids.known("10.0.0.1", 4000, "run-2")
    # the same node named another way: refused while the first link is in use
    b = links[("10.0.0.1", 51348)] = _Link("10.0.0.1", 51348)
    assert not ids.claim("run-1", b)
    assert ids.claim(None, b)  # a node that gives no run id (an old one): allowed
    for phase, closing in ((Phase.FAILED, False), (Phase.READY, True)):
        a.phase, a._closing = phase, closing  # failed for good, or closing: b may take it
        assert ids.claim("run-1", b)
        ids.nids["run-1"] = a.key
