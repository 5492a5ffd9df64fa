"""The scheduling core: job states, nodes, the job queue and allocation.

One implementation, used by the scheduler embedded in ``JobCluster`` (and by
``dispyscheduler`` when it exists).  No sockets and no event loop here.
"""
