"""Targets: export per format, runtimes, validation (accuracy, parity, latency) and reports."""
