def compute(n):
    import time
    # assume that computation saves data in file n.dat
    dispy_send_file(str(n) + '.dat') # send file to client
    # ... continue further computations
    return n

if __name__ == '__main__':
    import dispy, random
    cluster = dispy.JobCluster(compute)
    jobs = []
    for i in range(20):
        job = cluster.submit(random.randint(5,20))
        job.id = i
        jobs.append(job)  # (restored)
    for job in jobs:
        print('job %s results in file %s' % (job.id, str(job.id) + '.dat'))
