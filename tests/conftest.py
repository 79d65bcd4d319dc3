import os

# keep each test process to one thread: the suite runs several processes on 2 cores
os.environ.setdefault("OMP_NUM_THREADS", "1")
