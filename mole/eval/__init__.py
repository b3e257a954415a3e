"""Evaluation through lm-evaluation-harness (see harness.py); imported lazily, lm-eval is heavy."""
