"""Scoring embeddings: a data set embedded and scored by `jaxembed.metrics` (evaluate.py), and the one-page
visual report of a training run (report.py)."""
