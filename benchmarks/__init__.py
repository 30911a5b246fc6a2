"""Speed benchmarks (GitHub issue 8): our vectorized code against the reference loops it replaces.

Run everything with `python -m benchmarks.run_all [--device cuda] [--quick]`; see `benchmarks/README.md`.
"""
