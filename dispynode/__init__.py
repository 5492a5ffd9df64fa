"""dispynode: the daemon that runs dispy jobs on a machine (see ``dispynode.main``)."""
