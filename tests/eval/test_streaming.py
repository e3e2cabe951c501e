"""Streaming perplexity: with the full cache the per-token NLL is the forward pass's; a sink +
window cache and a window-only cache give the NLL of the same weights run with that attention
mask (a model whose layers have the window); one compile per policy; the same with the dense
cache sharded over 8 devices; streams, buckets, names and the CLI."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsm import layers, parallel
from lsm.config import DecodeConfig
from lsm.data import synthetic_vocab as vocab
from lsm.eval import streaming
from lsm.eval.scoring import empty_cache
from lsm.train.data import synthetic_eval_batches
from tests.eval.helpers import LENGTH, tiny_config, tiny_model

STREAM = 2 * LENGTH  # past the training length


def _forward_nll(model, tokens):
  logp = jax.nn.log_softmax(model(jnp.asarray(tokens[:, :-1])).astype(jnp.float32), axis=-1)
  return -np.take_along_axis(np.asarray(logp, np.float64), tokens[:, 1:, None], -1)[..., 0]


def _windowed(model, window: int, sink_tokens: int):
  """The same weights, its attention layers masked to ``sink_tokens`` sinks + ``window``."""
  attention = dict(window=window, sink_tokens=sink_tokens or None)
  windowed = tiny_model(tiny_config(attention=attention))
  nnx.update(windowed, nnx.state(model, nnx.Param))
  return windowed


@pytest.fixture(scope="module")
def stream(tiny):
  _, config = tiny
  return streaming.token_streams(config, length=STREAM, streams=2, seed=0)


def test_each_policy_equals_the_forward_pass_with_its_mask(tiny, stream):
  model, _ = tiny
  compiled = streaming._decode_chunk._cache_size()
  quiet = dict(chunk=32, progress=lambda _: None)
  full = streaming.stream_nll(model, stream, **quiet)
  np.testing.assert_allclose(full, _forward_nll(model, stream), rtol=1e-5, atol=1e-5)
  assert streaming._decode_chunk._cache_size() == compiled + 1  # 3 calls, one compile
  for sinks in (4, 0):
    nll = streaming.stream_nll(model, stream, policy=layers.SinkWindowPolicy(sinks, 16), **quiet)
    np.testing.assert_allclose(nll, _forward_nll(_windowed(model, 16, sinks), stream),
                               rtol=1e-5, atol=1e-5)
    assert not np.allclose(nll[:, 20:], full[:, 20:], atol=1e-3)  # the window dropped tokens
    np.testing.assert_allclose(nll[:, :16], full[:, :16], rtol=1e-5, atol=1e-5)
  assert streaming._decode_chunk._cache_size() == compiled + 3


def test_dense_cache_sharded_over_the_sequence_gives_the_same_nll(tiny, stream):
  model, _ = tiny
  mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "sequence": 8, "tensor": 1})
  with jax.set_mesh(mesh):  # what stream_nll decodes into: the dense cache split over 8
    keys = jax.tree.leaves(empty_cache(model, 2, STREAM))[0]
  assert "sequence" in keys.sharding.spec
  quiet = dict(chunk=32, progress=lambda _: None)
  np.testing.assert_allclose(streaming.stream_nll(model, stream, mesh=mesh, **quiet),
                             streaming.stream_nll(model, stream, **quiet), rtol=1e-5, atol=1e-5)


def test_synthetic_stream_is_the_tasks_examples_in_a_row(tiny):
  _, config = tiny
  tokens = streaming.token_streams(config, length=100, streams=2, seed=3)
  assert tokens.shape == (2, 101) and tokens.dtype == np.int32
  (batch,) = synthetic_eval_batches("passkey", seq_len=LENGTH, seed=3, examples=5, batch_size=5,
                                    task_options=dict(num_digits=3))
  np.testing.assert_array_equal(tokens.reshape(-1), batch["tokens"].reshape(-1)[:202])
  assert tokens[0, 0] == vocab.BOS and tokens[0, LENGTH + 1] == vocab.BOS


def test_text_stream_is_the_end_of_the_corpus(tiny, tmp_path):
  _, config = tiny
  (tmp_path / "a.txt").write_text("abcdefghij")
  (tmp_path / "b.txt").write_text("klmnop")
  text = config.model_copy(update={"data": config.data.model_copy(
      update={"task": "text", "files": [str(tmp_path / "*.txt")]})})
  tokens = streaming.token_streams(text, length=8, streams=2)
  corpus = [1, *(ord(c) + 3 for c in "abcdefghij"), 2, 1, *(ord(c) + 3 for c in "klmnop"), 2]
  np.testing.assert_array_equal(tokens.reshape(-1), corpus[-18:])
  with pytest.raises(ValueError, match=r"data.files hold 20 tokens, fewer than streams x "
                                       r"\(length \+ 1\) = 22"):
    streaming.token_streams(text, length=10, streams=2)


def test_buckets_average_by_position():
  nll = np.log(np.arange(1, 9, dtype=float))[None].repeat(2, 0)  # [2, 8]
  rows = streaming.bucket_rows(nll, 3)
  assert [(r["start"], r["stop"], r["tokens"]) for r in rows] == [(1, 4, 6), (4, 6, 4),
                                                                   (6, 9, 6)]
  assert rows[1]["nll"] == pytest.approx(np.log([4, 5]).mean())
  assert rows[1]["perplexity"] == pytest.approx(np.sqrt(20))
  with pytest.raises(ValueError, match="buckets must be <= the 8 predicted tokens, got 9"):
    streaming.bucket_rows(nll, 9)


def test_policy_names_and_errors(tiny, stream):
  decode = DecodeConfig.model_validate({"sink_window": dict(sink_tokens=2, window=30)})
  assert streaming.policies_named(["full", "window", "sink_window"], decode) == {
      "full": None, "window": layers.SinkWindowPolicy(0, 30),
      "sink_window": layers.SinkWindowPolicy(2, 30)}
  assert streaming.policies_named(["heavy_hitter"], decode)["heavy_hitter"] == (
      layers.HeavyHitterPolicy(1024, 128))
  with pytest.raises(ValueError, match=r"a policy must be one of \('full', 'window'.*got 'lru'"):
    streaming.policies_named(["lru"], decode)
  model, _ = tiny
  with pytest.raises(ValueError, match=r"stream length 96 must be a multiple of chunk=40"):
    streaming.stream_nll(model, stream, chunk=40)
  with pytest.raises(ValueError, match=r"chunk must be a positive int, got 0"):
    streaming.stream_nll(model, stream, chunk=0)


def test_cli_writes_a_line_per_policy(tmp_path, tiny, fake_runs, capsys):
  from lsm import evaluate  # noqa: PLC0415
  fake_runs({str(tmp_path): tiny})
  assert evaluate.main(["--run", str(tmp_path), "--streaming-ppl", "--lengths", str(STREAM),
                        "--chunk", "32", "--buckets", "4", "--policies", "full,window",
                        "decode.sink_window.window=16"]) == 0
  out = capsys.readouterr().out
  assert "full: 96/96 tokens" in out and "| 73-96 |" in out
  result = json.loads((tmp_path / "eval-streaming-passkey.json").read_text())
  assert [p["name"] for p in result["policies"]] == ["full", "window"]
  assert result["policies"][1]["settings"] == {"sink_tokens": 0, "window": 16,
                                                 "positions": "stored"}
  assert [len(p["buckets"]) for p in result["policies"]] == [4, 4]
  assert result["length"] == STREAM and result["train_length"] == LENGTH
  assert (tmp_path / "eval-streaming-passkey.png").stat().st_size > 0
  assert evaluate.main(["--run", str(tmp_path), "--streaming-ppl", "--policies", "lru"]) == 2
  assert "--policies: policies_named: a policy must be one of" in capsys.readouterr().err
  assert evaluate.main(["--run", str(tmp_path), "--chunk", "8"]) == 2
  assert "--chunk: only with --streaming-ppl" in capsys.readouterr().err
