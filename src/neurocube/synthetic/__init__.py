"""Synthetic data generators (deterministic, seeded) for tests, benchmarks and demos."""
