"""heba's GPU check: one command that builds, tests, sweeps and benchmarks heba on a GPU.

Run it with ``bash scripts/gpu_check.sh --out DIR`` (or ``python -m tools.gpu_check``);
:mod:`tools.gpu_check.check` drives the stages, :mod:`tools.gpu_check.sweep` is the
correctness sweep, :mod:`tools.gpu_check.report` writes the markdown report and
:mod:`tools.gpu_check.plugin` is the pytest plugin of its pytest stages.
"""
