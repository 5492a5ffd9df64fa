import dispy
jobs = dispy.recover_jobs(timeout=1, terminate_pending=True)
for job in jobs:
    print('Job result: %s' % job.result)
