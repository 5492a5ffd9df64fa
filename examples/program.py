# dispy example 6.2: distribute a standalone program and run it with a
# sequence of numbers as arguments; each job's stdout holds its output.
import os
import sys

import dispy

if __name__ == '__main__':
    program = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), 'square.py')
    cluster = dispy.JobCluster(program)
    jobs = []
    for i in range(50):
        job = cluster.submit(i)
        job.id = i
        jobs.append(job)
    for job in jobs:
        job()
        print('%s: exit %s, output %s' % (job.id, job.result, job.stdout.decode().strip()))
    cluster.close()
