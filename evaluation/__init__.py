"""Accuracy, pass@k and maj@k of a model on a problem set, used during training and by the eval stage.

Built so far: evaluation.metrics (pass@1, unbiased pass@k, maj@k with answers grouped by an
equivalence callback). The sampling/evaluation issue adds evaluate() here.
"""
