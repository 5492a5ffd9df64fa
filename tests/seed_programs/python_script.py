import dispy
cluster = dispy.JobCluster('/path/to/program')
for i in range(50):
    cluster.submit(i)  # (restored)
