"""Long-context evaluation of trained models."""

from lsm.eval.length import evaluate_lengths

__all__ = ["evaluate_lengths"]
