"""dispyscheduler: shares dispynode nodes between many client programs (SharedJobCluster)."""
