"""Built-in problems: benchmarks with known answers, and ML configuration problems."""
