"""What the faces share (the client's engine, dispynode, dispyscheduler,
dispynetrelay): ``session`` (a daemon's session with a client), ``link`` (a
link to a node: requests, watchdog, liveness, reconnection), ``finder``
(finding nodes by discovery), ``sqlite`` (the SQLite files: checked
opening, a batching writer thread) and ``daemon`` (the daemons' command
lines and configuration files).

Nothing is imported here: each face imports the modules it uses (a node's
job processes import none of them)."""
