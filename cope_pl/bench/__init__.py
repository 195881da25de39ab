"""Benchmarks of attention implementations and full training steps (`python -m cope_pl.bench`, `make bench`)."""
