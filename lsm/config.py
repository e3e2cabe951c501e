"""The typed config schema of lsm's loops, and its YAML / command-line loading.

One `Config` with sections model, data, optimizer, train, checkpoint, parallel, decode and eval.
Experiment files are YAML under ``configs/``; any field can be overridden with a dotted
``key=value`` (the value is read as YAML: ``train.steps=200``, ``model.layer_pattern=[attention]``).
An unknown key, a wrong type or an impossible combination raises `ConfigError` naming the key.
Schema and validation are pydantic models (``extra="forbid"``), so every field is typed once here.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import pydantic
import yaml
from etils import epath
from pydantic import BaseModel, ConfigDict, Field, model_validator

Positive = Field(gt=0)


class ConfigError(ValueError):
  """A config that cannot run; the message names the key."""


class _Section(BaseModel):
  model_config = ConfigDict(extra="forbid", frozen=True)


class RopeConfig(_Section):
  base: float = Field(10000.0, gt=0)
  scaling: Literal["none", "linear", "ntk", "yarn"] = "none"
  factor: float = Field(1.0, ge=1.0)
  original_length: int | None = Field(None, gt=0)


class ContextParallelConfig(_Section):
  """How attention runs when ``parallel.sequence > 1`` (see `lsm.parallel.context_attention`)."""

  strategy: Literal["auto", "ring", "all_gather", "ulysses"] = "auto"
  layout: Literal["contiguous", "zigzag", "striped"] = "zigzag"


class AttentionConfig(_Section):
  window: int | None = Field(None, ge=1)
  sink_tokens: int | None = Field(None, ge=0)
  logits_soft_cap: float | None = Field(None, gt=0)
  implementation: Literal["reference", "xla", "pallas_tpu", "pallas_gpu"] | None = None
  qk_norm: bool = False
  context_parallel: ContextParallelConfig = ContextParallelConfig()


class SSMConfig(_Section):
  """State-space mixers (``s4``, ``s4d``, ``mamba``, ``mamba2`` in ``model.layer_pattern``)."""
  state_size: int = Field(16, gt=0)  # N per channel (mamba, s4, s4d) or per head (mamba2)
  expand: int = Field(2, gt=0)  # inner width = expand * d_model (mamba, mamba2)
  conv_width: int = Field(4, gt=0)  # causal depthwise conv1d (mamba, mamba2)
  head_dim: int = Field(32, gt=0)  # mamba2: P, channels per SSD head
  num_groups: int = Field(1, gt=0)  # mamba2: heads sharing one B/C group
  chunk_size: int = Field(64, gt=0)  # chunked scans / SSD
  dt_rank: int | None = Field(None, gt=0)  # mamba: None = ceil(d_model / 16)
  dt_min: float = Field(1e-3, gt=0)  # initial step sizes are log-uniform in [dt_min, dt_max]
  dt_max: float = Field(0.1, gt=0)
  discretization: Literal["zoh", "bilinear"] | None = None  # None: zoh for s4d, bilinear for s4
  implementation: str | None = None  # None: the backend's Pallas kernel, else the XLA path

  @model_validator(mode="after")
  def _steps(self):
    if self.dt_min > self.dt_max:
      raise ValueError(f"model.ssm.dt_min={self.dt_min} must be <= model.ssm.dt_max="
                       f"{self.dt_max}")
    return self


class LandmarkConfig(_Section):
  """Landmark attention (``landmark`` in ``model.layer_pattern``): a landmark token closes every
  block of ``block_size`` tokens (the data pipeline inserts them)."""
  block_size: int = Field(64, gt=0)  # tokens per block, the landmark not counted
  top_k: int | None = Field(None, gt=0)  # None: grouped softmax over every block (training)
  positions: Literal["renumbered", "stored"] = "renumbered"  # of retrieved blocks (top_k set)
  cache_memory: Literal["device", "host"] = "device"  # where decode caches keep keys/values


class SparseConfig(_Section):
  """Static sparse attention (``sparse_attention`` in ``model.layer_pattern``; docs/sparse.md).
  Each pattern reads only its own fields. ``duo_attention`` (per-head policies) reads
  ``window``, ``sink_tokens`` and ``head_types``."""
  pattern: Literal["sink_window", "lambda", "bigbird", "strided", "select",
                   "routing"] = "sink_window"
  window: int = Field(256, gt=0)  # sink_window, lambda: keys at positions p - window .. p
  sink_tokens: int = Field(4, ge=0)  # sink_window: first positions every query sees
  global_tokens: int = Field(4, ge=0)  # lambda: first positions every query sees
  distance_cap: int | None = Field(None, gt=0)  # lambda: None = window
  block: int = Field(64, gt=0)  # bigbird, strided: positions per layout block
  local_blocks: int = Field(3, gt=0)  # bigbird, strided: own block and the ones before it
  global_blocks: int = Field(1, ge=0)  # bigbird
  random_blocks: int = Field(2, ge=0)  # bigbird: per query block
  stride: int = Field(4, gt=0)  # strided: every stride-th block back
  seed: int = Field(0, ge=0)  # bigbird: of the random blocks
  max_length: int = Field(4096, gt=0)  # bigbird, strided: positions the layout covers
  top_k: int = Field(4, ge=0)  # select: best-scoring blocks per query block (block = block size)
  sink_blocks: int = Field(1, ge=0)  # select: first blocks always attended (+ local_blocks)
  num_clusters: int = Field(4, gt=0)  # routing: k-means centroids per KV head
  # duo_attention (with window and sink_tokens for its streaming heads): one per KV head, the
  # same for every duo_attention layer; None: all retrieval.
  head_types: list[Literal["retrieval", "streaming"]] | None = None


class RecurrentMemoryConfig(_Section):
  """Recurrent memory (RMT): ``slots > 0`` wraps the layer pattern; each segment of
  ``segment_length`` tokens is read as [memory | segment | memory]."""
  slots: int = Field(0, ge=0)  # 0: off
  segment_length: int = Field(128, gt=0)
  bptt_segments: int | None = Field(None, gt=0)  # gradients through the last k; None: all


class ModelConfig(_Section):
  vocab_size: int | None = Field(None, gt=0)  # None: the data's vocabulary
  d_model: int = Field(256, gt=0)
  num_layers: int = Field(4, gt=0)
  layer_pattern: list[str] = Field(default_factory=lambda: ["attention"], min_length=1)
  num_heads: int = Field(4, gt=0)
  num_kv_heads: int = Field(4, gt=0)
  head_dim: int | None = Field(None, gt=0)  # None: d_model // num_heads
  mlp_dim: int | None = Field(None, gt=0)  # None: 4 * d_model
  tie_embeddings: bool = True
  norm_eps: float = Field(1e-6, gt=0)
  rope: RopeConfig = RopeConfig()
  attention: AttentionConfig = AttentionConfig()
  ssm: SSMConfig = SSMConfig()
  landmark: LandmarkConfig = LandmarkConfig()
  sparse: SparseConfig = SparseConfig()
  recurrent_memory: RecurrentMemoryConfig = RecurrentMemoryConfig()
  dtype: Literal["float32", "bfloat16"] = "float32"  # compute
  param_dtype: Literal["float32", "bfloat16"] = "float32"
  remat: Literal["none", "full", "dots"] = "none"  # what the layer scan saves for backward

  @model_validator(mode="after")
  def _shapes(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"model.num_heads={self.num_heads} must be a multiple of "
                       f"model.num_kv_heads={self.num_kv_heads}")
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ValueError(f"model.d_model={self.d_model} must be a multiple of "
                       f"model.num_heads={self.num_heads} (or set model.head_dim)")
    if self.num_layers % len(self.layer_pattern):
      raise ValueError(f"model.num_layers={self.num_layers} must be a multiple of the length "
                       f"of model.layer_pattern={self.layer_pattern}")
    return self

  @model_validator(mode="after")
  def _duo_head_types(self):
    head_types = self.sparse.head_types
    if head_types is not None and len(head_types) != self.num_kv_heads:
      raise ValueError(f"model.sparse.head_types={head_types} must have one entry per KV head, "
                       f"model.num_kv_heads={self.num_kv_heads}")
    return self

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def resolved_mlp_dim(self) -> int:
    return self.mlp_dim or 4 * self.d_model


class DataConfig(_Section):
  task: Literal["passkey", "mqar", "kv_needle", "selective_copy", "listops", "variable_tracking",
                "text"] = "passkey"
  seq_len: int = Field(256, gt=1)
  batch_size: int = Field(16, gt=0)  # global, per optimizer update (before accumulation split)
  task_options: dict[str, int | float] = Field(default_factory=dict)
  files: list[str] = Field(default_factory=list)  # text: paths or globs of .txt / .jsonl
  jsonl_field: str = "text"
  tokenizer: Literal["byte", "sentencepiece", "tokenizers"] = "byte"
  tokenizer_path: str | None = None
  seed: int = 0

  @model_validator(mode="after")
  def _text(self):
    if self.task == "text" and not self.files:
      raise ValueError("data.files must list text files or globs when data.task is 'text'")
    if self.tokenizer != "byte" and self.tokenizer_path is None:
      raise ValueError(f"data.tokenizer_path is needed for data.tokenizer={self.tokenizer!r}")
    return self


class OptimizerConfig(_Section):
  learning_rate: float = Field(1e-3, gt=0)
  warmup_steps: int = Field(100, ge=0)
  schedule: Literal["cosine", "constant"] = "cosine"
  min_lr_ratio: float = Field(0.1, ge=0, le=1)
  weight_decay: float = Field(0.1, ge=0)
  b1: float = Field(0.9, ge=0, lt=1)
  b2: float = Field(0.95, ge=0, lt=1)
  eps: float = Field(1e-8, gt=0)
  grad_clip: float | None = Field(1.0, gt=0)


class TrainConfig(_Section):
  steps: int = Field(1000, gt=0)  # optimizer updates
  grad_accum: int = Field(1, gt=0)  # micro-batches per update
  log_every: int = Field(10, gt=0)
  eval_every: int = Field(0, ge=0)  # 0: only at the end
  eval_batches: int = Field(4, gt=0)
  seed: int = 0
  max_nonfinite: int = Field(5, gt=0)  # consecutive skipped updates that stop the run
  output_dir: str = "runs/{name}"
  profile_steps: list[int] | None = Field(None, min_length=2, max_length=2)  # [start, stop)

  @model_validator(mode="after")
  def _profile(self):
    if self.profile_steps and not 0 <= self.profile_steps[0] < self.profile_steps[1]:
      raise ValueError(f"train.profile_steps must be [start, stop) with 0 <= start < stop, got "
                       f"{self.profile_steps}")
    return self


class CheckpointConfig(_Section):
  enabled: bool = True
  every: int = Field(100, gt=0)
  keep: int = Field(3, gt=0)
  async_save: bool = True


class ParallelConfig(_Section):
  """Mesh axis sizes; ``data=-1`` takes the devices the other axes leave."""

  data: int = Field(-1, ge=-1)
  fsdp: int = Field(1, gt=0)
  sequence: int = Field(1, gt=0)
  tensor: int = Field(1, gt=0)

  @model_validator(mode="after")
  def _data(self):
    if self.data == 0:
      raise ValueError("parallel.data must be positive or -1 (the remaining devices)")
    return self

  def shape(self, device_count: int) -> dict[str, int]:
    """Axis sizes on ``device_count`` devices, or ConfigError naming the axes."""
    others = self.fsdp * self.sequence * self.tensor
    data = self.data if self.data > 0 else device_count // others
    if data < 1 or data * others != device_count:
      raise ConfigError(f"parallel: data={self.data}, fsdp={self.fsdp}, "
                        f"sequence={self.sequence}, tensor={self.tensor} do not multiply to the "
                        f"{device_count} devices available")
    return {"data": data, "fsdp": self.fsdp, "sequence": self.sequence, "tensor": self.tensor}


class BlockMemoryConfig(_Section):
  """Training-free block memory (InfLLM-style) for decoding any attention model: sink tokens, a
  local window, and the ``top_k`` stored blocks that score best against the query."""
  sink_tokens: int = Field(4, ge=0)
  window: int = Field(512, gt=0)
  block_size: int = Field(64, gt=0)
  top_k: int = Field(4, gt=0)
  representatives: int = Field(4, gt=0)  # keys per block that stand for it when scoring


class SinkWindowConfig(_Section):
  """Fixed-budget cache: the first ``sink_tokens`` and the last ``window`` tokens."""
  sink_tokens: int = Field(4, ge=0)
  window: int = Field(1024, gt=0)
  # stored: true positions; renumbered: positions within the cache, as StreamingLLM
  positions: Literal["stored", "renumbered"] = "stored"


class HeavyHitterConfig(_Section):
  """Fixed-budget cache: the ``budget`` tokens with the most accumulated attention (H2O)."""
  budget: int = Field(1024, gt=0)
  recent: int = Field(128, ge=0)  # the last tokens, always kept


class SnapKVConfig(_Section):
  """Fixed-budget cache: the prompt compressed by observation-window attention (SnapKV)."""
  budget: int = Field(1024, gt=0)
  observation_window: int = Field(32, gt=0)
  pool_kernel: int = Field(7, gt=0)


class BlockSelectConfig(_Section):
  """Decode-time block selection (Quest): each step reads the ``top_k`` best cache blocks plus
  ``sink_blocks`` and ``local_blocks``; every token is stored."""
  block_size: int = Field(16, gt=0)
  top_k: int = Field(4, ge=0)
  sink_blocks: int = Field(1, ge=0)
  local_blocks: int = Field(1, gt=0)


class DecodeConfig(_Section):
  max_new_tokens: int = Field(64, gt=0)
  temperature: float = Field(0.0, ge=0)  # 0: greedy
  top_k: int | None = Field(None, gt=0)
  top_p: float | None = Field(None, gt=0, le=1)
  stop_tokens: list[int] = Field(default_factory=list)
  prefill_chunk: int = Field(512, gt=0)
  max_length: int | None = Field(None, gt=0)  # cache length; None: prompt + new tokens
  # Of the attention mixers; each policy reads its own section below.
  cache_policy: Literal["full", "block_memory", "sink_window", "heavy_hitter", "snapkv",
                        "block_select"] = "full"
  block_memory: BlockMemoryConfig = BlockMemoryConfig()
  sink_window: SinkWindowConfig = SinkWindowConfig()
  heavy_hitter: HeavyHitterConfig = HeavyHitterConfig()
  snapkv: SnapKVConfig = SnapKVConfig()
  block_select: BlockSelectConfig = BlockSelectConfig()


class EvalConfig(_Section):
  """Long-context evaluation: the task at multiples of the training length."""

  length_multipliers: list[float] = Field(default_factory=lambda: [1.0, 2.0, 4.0])
  examples: int = Field(128, gt=0)
  batch_size: int = Field(16, gt=0)
  rope_scaling: Literal["none", "linear", "ntk", "yarn"] = "yarn"  # for longer than training


class Config(_Section):
  name: str = "run"
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  train: TrainConfig = TrainConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  parallel: ParallelConfig = ParallelConfig()
  decode: DecodeConfig = DecodeConfig()
  eval: EvalConfig = EvalConfig()

  @model_validator(mode="after")
  def _across_sections(self):
    if self.data.seq_len % self.parallel.sequence:
      raise ValueError(f"data.seq_len={self.data.seq_len} must be divisible by "
                       f"parallel.sequence={self.parallel.sequence}")
    cp = self.model.attention.context_parallel
    if self.parallel.sequence > 1:
      if cp.layout == "zigzag" and self.data.seq_len % (2 * self.parallel.sequence):
        raise ValueError(f"data.seq_len={self.data.seq_len} must be divisible by "
                         f"2 * parallel.sequence={2 * self.parallel.sequence} for "
                         f"model.attention.context_parallel.layout=zigzag")
      heads = (self.model.num_heads, self.model.num_kv_heads)
      if cp.strategy == "ulysses" and any(h % (self.parallel.sequence * self.parallel.tensor)
                                          for h in heads):
        raise ValueError(f"model.attention.context_parallel.strategy=ulysses needs "
                         f"model.num_heads={heads[0]} and model.num_kv_heads={heads[1]} "
                         f"divisible by parallel.sequence x parallel.tensor = "
                         f"{self.parallel.sequence * self.parallel.tensor}")
    sparse = self.model.sparse
    if ("sparse_attention" in self.model.layer_pattern and sparse.pattern in ("bigbird", "strided")
        and self.data.seq_len > sparse.max_length):
      raise ValueError(f"data.seq_len={self.data.seq_len} must be <= model.sparse.max_length="
                       f"{sparse.max_length}, the positions the {sparse.pattern} layout covers")
    if self.data.batch_size % self.train.grad_accum:
      raise ValueError(f"data.batch_size={self.data.batch_size} must be divisible by "
                       f"train.grad_accum={self.train.grad_accum}")
    return self

  @property
  def output_dir(self) -> epath.Path:
    """The run directory: a local path or a URI such as ``gs://bucket/runs/{name}``."""
    return epath.Path(self.train.output_dir.format(name=self.name))


def is_uri(path: str | os.PathLike) -> bool:
  """Whether ``path`` is an object store location (``gs://bucket/...``), not a local path."""
  return "://" in os.fspath(path)


# ------------------------------------------------------------------------------------ loading


def _set_dotted(tree: dict, key: str, value: Any) -> None:
  parts = key.split(".")
  node = tree
  for depth, part in enumerate(parts[:-1]):
    child = node.setdefault(part, {})
    if not isinstance(child, dict):
      raise ConfigError(f"override {key!r}: {'.'.join(parts[:depth + 1])!r} is not a section")
    node = child
  node[parts[-1]] = value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
  """``key=value`` strings onto a nested dict; values are parsed as YAML scalars/lists."""
  tree = yaml.safe_load(yaml.safe_dump(tree))  # a deep copy
  for item in overrides:
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not p for p in key.split(".")):
      raise ConfigError(f"override {item!r} must look like section.key=value")
    _set_dotted(tree, key.strip(), yaml.safe_load(raw))
  return tree


def _key(location) -> str:
  return ".".join(str(p) for p in location) or "(top level)"


def from_dict(tree: dict) -> Config:
  """A validated `Config`; errors name the offending key."""
  try:
    return Config.model_validate(tree)
  except pydantic.ValidationError as error:
    lines = []
    for e in error.errors():
      if e["type"] == "value_error":  # a check across fields: its message names the keys
        lines.append(e["msg"].removeprefix("Value error, "))
      elif e["type"] == "extra_forbidden":
        lines.append(f"config key '{_key(e['loc'])}': unknown key")
      else:
        lines.append(f"config key '{_key(e['loc'])}': {e['msg']} (given: {e.get('input')!r})")
    raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
  """The config in YAML file ``path`` (None: defaults; a URI such as ``gs://`` works) with
  ``overrides`` applied."""
  tree = {}
  if path is not None:
    path = epath.Path(path)
    if not path.is_file():
      raise ConfigError(f"--config {str(path)!r}: no such file")
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
      raise ConfigError(f"--config {str(path)!r}: the file must hold a mapping of sections")
  return from_dict(apply_overrides(tree, list(overrides)))


def to_yaml(config: Config) -> str:
  return yaml.safe_dump(config.model_dump(), sort_keys=False)
