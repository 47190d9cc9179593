"""Imported before torch by the commands that score models on the CPU: OpenMP threads that sleep when idle.

By default an OpenMP worker spins between parallel regions; on a machine another job is loading (a
test suite, a second evaluation) the spinning threads and the other job's take turns on the cores:
on 2 cores next to another evaluation, 24 windows of 256 tokens took 7.1 s through a 15M-parameter
subnet with torch's default 2 threads, 1.7 s with passive waiting. Waiting passively costs a wake-up
per parallel region, microseconds against milliseconds of work. libgomp reads the setting once, when
torch loads it, so this runs first; an OMP_WAIT_POLICY already in the environment wins.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
