"""One package per analysis: its spec, its compute, its figures and its page, and an `ANALYSES` list that
analysis/registry.py reads."""
