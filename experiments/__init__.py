"""The experiment binaries (train, evaluate, reproduce, unlearn, benchmark) and their configs."""

import os

# XLA:CPU calls LAPACK (OpenBLAS) for the SVDs of the collapse and the regularizer. OpenBLAS's own
# thread pool spins against XLA's on a few busy cores: a 64x64 SVD took 9 ms threaded against
# 3.6 ms single-threaded on 2 loaded cores (185-280 ms at worst). The matrices are small, so one
# thread loses nothing. Set before any binary imports JAX; an explicit setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
