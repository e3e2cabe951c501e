"""Data for lsm: synthetic long-context tasks, local text, packing into rows, grain pipelines."""

from lsm.data.landmarks import insert_landmarks, insert_landmarks_batch, landmark_length
from lsm.data.metrics import answer_accuracy
from lsm.data.packing import ROW_KEYS, PackedDocuments, single_example_row
from lsm.data.pipeline import make_dataset
from lsm.data.synthetic import SyntheticSource, synthetic_dataset, synthetic_task
from lsm.data.synthetic_tasks import (SYNTHETIC_TASKS, AssociativeRecallTask, KeyValueNeedleTask,
                                      ListOpsTask, PasskeyTask, SelectiveCopyTask, SyntheticTask,
                                      VariableTrackingTask)
from lsm.data.synthetic_vocab import SYNTHETIC_VOCAB_SIZE
from lsm.data.text import TEXT_SUFFIXES, expand_paths, read_documents, text_dataset
from lsm.data.tokenizer import (ByteTokenizer, HuggingFaceTokenizer, SentencePieceTokenizer,
                                load_tokenizer)

__all__ = ["ROW_KEYS", "SYNTHETIC_TASKS", "SYNTHETIC_VOCAB_SIZE", "TEXT_SUFFIXES",
           "AssociativeRecallTask", "ByteTokenizer", "HuggingFaceTokenizer", "KeyValueNeedleTask",
           "ListOpsTask", "PackedDocuments", "PasskeyTask", "SelectiveCopyTask",
           "SentencePieceTokenizer", "SyntheticSource", "SyntheticTask", "VariableTrackingTask",
           "answer_accuracy", "expand_paths", "insert_landmarks", "insert_landmarks_batch",
           "landmark_length", "load_tokenizer", "make_dataset", "read_documents",
           "single_example_row", "synthetic_dataset", "synthetic_task", "text_dataset"]
