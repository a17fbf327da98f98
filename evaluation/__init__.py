"""Accuracy, pass@k and maj@k of a model on a problem set, used during training and by the eval stage.

Not built yet: the sampling/evaluation issue adds evaluate() here.
"""
