"""Benchmark suite of issue 6 (`python -m bench.run`): paper tables, selective prediction, OOD, calibration."""
