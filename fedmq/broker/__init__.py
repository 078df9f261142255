"""Brokers fedmq can start by itself for tests, benchmarks and simulations."""
