"""Evaluation: metrics and the few-shot protocols."""
