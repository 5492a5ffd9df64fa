"""``SharedJobCluster``: a JobCluster whose jobs go through a ``dispyscheduler``
(which shares its nodes between many client programs) instead of straight to
nodes.  To the client the scheduler is one node (the same protocol); the job
API is JobCluster's."""

from __future__ import annotations

from . import config
from ._client import JobCluster, _either
from ._job import ClusterStatus

#: Jobs a client keeps at the scheduler per CPU of the scheduler's nodes, so the
#: scheduler sees enough of every client's queue to apply its policy.
SHARED_PREFETCH = 8


class SharedJobCluster(JobCluster):
    """Run ``computation`` on the nodes of the ``dispyscheduler`` at
    ``scheduler_node`` (default: this host) and ``scheduler_port`` (51349).

    ``nodes``: names or wildcards of the scheduler's nodes this cluster may
    use (default all).  ``exclusive=True``: the cluster gets nodes no other
    cluster uses while it runs.  ``secret``: the cluster secret the scheduler
    was started with (its ``--cluster_secret``).  Everything else is
    JobCluster's.
    """

    def __init__(
        self,
        computation,
        nodes=None,
        depends=(),
        callback=None,
        cluster_status=None,
        ip_addr=None,
        port=None,
        scheduler_node=None,
        scheduler_port=None,
        ext_ip_addr=None,
        loglevel=None,
        setup=None,
        cleanup=True,
        dest_path=None,
        poll_interval=None,
        reentrant=False,
        exclusive=False,
        secret="",
        keyfile=None,
        certfile=None,
        recover_file=None,
        job_status=None,
        job_timeout=None,
        pulse_interval=None,
        cafile=None,
        insecure=False,
        host=None,
        client_port=None,
        scheduler_host=None,
        ext_host=None,
        dispy_port=None,
    ) -> None:
        # dispy 4.15's names for the same options (dispy_port: its base port; the
        # scheduler's is two above)
        ip_addr = _either("ip_addr", ip_addr, "host", host)
        port = _either("port", port, "client_port", client_port)
        scheduler_node = _either("scheduler_node", scheduler_node, "scheduler_host", scheduler_host)
        ext_ip_addr = _either("ext_ip_addr", ext_ip_addr, "ext_host", ext_host)
        if dispy_port is not None and scheduler_port is None:
            scheduler_port = int(dispy_port) + 2
        if nodes is None:
            patterns = ["*"]
        else:
            items = [nodes] if isinstance(nodes, str) else list(nodes)
            patterns = [getattr(n, "ip_addr", None) or getattr(n, "host", None) or n for n in items]
            if not all(isinstance(p, str) for p in patterns):
                raise TypeError("nodes of a SharedJobCluster are names, addresses or wildcards")
        host = scheduler_node or "127.0.0.1"
        sport = int(scheduler_port or config.SCHEDULER_PORT)
        self._compute_opts = {"x": bool(exclusive), "r": bool(reentrant), "np": patterns}
        super().__init__(
            computation,
            nodes=[f"{host}:{sport}"],
            depends=depends,
            callback=callback,
            job_status=job_status,
            cluster_status=cluster_status,
            ip_addr=ip_addr,
            port=port,
            ext_ip_addr=ext_ip_addr,
            loglevel=loglevel,
            setup=setup,
            cleanup=cleanup,
            dest_path=dest_path,
            poll_interval=poll_interval,
            reentrant=reentrant,
            secret=secret,
            keyfile=keyfile,
            certfile=certfile,
            recover_file=recover_file,
            job_timeout=job_timeout,
            pulse_interval=pulse_interval,
            cafile=cafile,
            insecure=insecure,
        )

    def submit_node(self, node, *args, **kwargs):
        """Like ``submit``, but the scheduler runs the job on ``node``, one of its nodes
        (a DispyNode, an address, ``'host:port'`` or a node name).  If the scheduler has
        no such node the job ends ``Abandoned`` with the reason."""
        name = getattr(node, "ip_addr", None) or str(node)
        links = list(self._engine.links)
        return self._submit(links[0] if links else None, args, kwargs, more_opts={"n": name})

    def status(self) -> ClusterStatus:
        """``ClusterStatus(nodes, jobs_pending)``: the scheduler's nodes (as its
        last pulse told them: CPUs, jobs running and done, all clients' alike)."""
        nodes = list(self._engine.behind.values())
        if not nodes:  # an older scheduler: itself, as one node
            return super().status()
        return ClusterStatus(nodes, self._ends.unfinished)

    def _engine_created(self, engine) -> None:
        engine.compute_opts = self._compute_opts
        engine.sched.prefetch = SHARED_PREFETCH
