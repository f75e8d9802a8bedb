"""Benchmarks: ``python -m dsinfra bench [component ...]``.

:mod:`dsinfra.bench.harness` holds what every component benchmark uses;
:mod:`dsinfra.bench.runner` finds them (one module per component, each with a
``benchmark(ctx)``), runs them and reports.
"""

from dsinfra.bench.harness import BenchContext, Ceilings, Result, Timing, measure_ceilings, time_callable
from dsinfra.bench.runner import format_table, registered, run_benchmarks, write_json

__all__ = [
    "BenchContext",
    "Ceilings",
    "Result",
    "Timing",
    "format_table",
    "measure_ceilings",
    "registered",
    "run_benchmarks",
    "time_callable",
    "write_json",
]
