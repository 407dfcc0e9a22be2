"""Reproducible benchmarks that print JSON and draw PNG plots."""
