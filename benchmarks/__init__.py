"""rlad_ds's benchmarks, run from the repo root as modules: python -m benchmarks.run, python -m benchmarks.study."""
