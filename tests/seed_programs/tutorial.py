def compute(n):
    import time, socket
    host = socket.gethostname()
    return (host, n)

if __name__ == '__main__':
    import dispy, random
    cluster = dispy.JobCluster(compute)
    jobs = []
    for n in range(20):
        job = cluster.submit(random.randint(5,20))
        job.id = n
        jobs.append(job)  # (restored)
    # cluster.wait()
    for job in jobs:
        host, n = job()
        print('%s executed job %s at %s with %s' % (host, job.id, job.start_time, n))  # (Python 3's print)
        # other fields of 'job' that may be useful:
        # print job.stdout, job.stderr, job.exception, job.ip_addr, job.start_time, job.end_time
