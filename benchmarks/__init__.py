"""Benchmarks of the real daemon with real backends; run each from the repository root as
``python -m benchmarks.<name>`` (see README.md, "Benchmarks")."""
