# dispy example 6.7: jobs send files they make back to the client with
# dispy_send_file; they appear in the client's working directory
def compute(n):
    import time
    # assume that computation saves data in file n.dat
    with open(str(n) + '.dat', 'w') as fd:
        fd.write('%s squared is %s\n' % (n, n * n))
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
        jobs.append(job)
    for job in jobs:
        n = job()
        print('job %s results in file %s' % (job.id, str(n) + '.dat'))
    cluster.close()
