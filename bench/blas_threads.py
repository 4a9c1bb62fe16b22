"""Pin numpy's BLAS thread count for the latency benches; import it before numpy.

The native kernel is single-threaded; numpy gets one BLAS thread too unless EDGE_QUQ_BENCH_BLAS_THREADS says
otherwise, because on a shared or loaded machine OpenBLAS's thread hand-offs made numpy 20-40x slower and
the ratios meaningless.
"""
import os

BLAS_THREADS = os.environ.get("EDGE_QUQ_BENCH_BLAS_THREADS", "1")
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = BLAS_THREADS
