"""Accuracy, pass@k and maj@k of a model on a problem set, used during training and by the eval stage.

    evaluation.evaluate   evaluate(model, tok, problems, kind, n=, temperature=, ...) -> EvalResult
                          (strict and lenient accuracy, mean completion length, per-sample records)
    evaluation.metrics    pass_at_k (unbiased), maj_at_k with answers grouped by equivalence
"""
