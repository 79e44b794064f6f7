"""Benchmarks that print tables (run as modules); not part of the test suite."""
