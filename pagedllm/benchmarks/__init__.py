"""Benchmarks behind `pagedllm bench …`: the standard workloads of shared/BENCHMARKS.md."""
