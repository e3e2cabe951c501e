"""Long-context evaluation of trained models: a task across lengths, a needle-in-a-haystack grid,
MQAR sweeps, streaming perplexity, accuracy against KV budget (docs/evaluation.md)."""

from lsm.eval.length import evaluate_lengths, rope_overrides, task_options_for
from lsm.eval.mqar import evaluate_pairs, evaluate_runs
from lsm.eval.niah import evaluate_niah
from lsm.eval.scoring import Scores, Scoring
from lsm.eval.streaming import evaluate_streaming, policies_named, stream_nll, token_streams

__all__ = ["Scores", "Scoring", "evaluate_lengths", "evaluate_niah", "evaluate_pairs",
           "evaluate_runs", "evaluate_streaming", "policies_named", "rope_overrides",
           "stream_nll", "task_options_for", "token_streams"]
