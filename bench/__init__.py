"""The benchmarks of ecif, one module each, run from the repository root as ``python -m bench.NAME``.

    .venv/bin/python -m bench.fidelity --help

Their shared set-up (arguments, threads, work and results folders, the machine line of every
report, writing ``NAME.json`` and ``NAME.md``) is :mod:`bench.common`.  Benchmark code only:
``ecif`` never imports this package, and the wheel does not ship it.
"""
