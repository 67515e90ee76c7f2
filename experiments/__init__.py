"""The command line (python -m experiments ...), configs, data, training, benchmarks, plots."""
