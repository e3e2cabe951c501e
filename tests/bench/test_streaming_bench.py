"""The streaming benchmark decodes what `generate` decodes, keeps its cache at a fixed size and
records memory after every call."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsm.bench import streaming as bench
from lsm.decode import generate


def test_the_scanned_decoder_equals_generate():
  """Greedy from token 1 at position 0, past the window: the same tokens as `generate`."""
  model, init_cache = bench.build(window=8, sink_tokens=2, layer_window=True)
  params, step = bench.decoder(model, chunk=24)
  _, token, position, tokens = step(params, init_cache(), jnp.ones((1,), jnp.int32),
                                    jnp.zeros((1,), jnp.int32))
  want = generate(model, [[1]], max_new_tokens=24).tokens[0]
  assert [int(t) for t in np.asarray(tokens)] == want
  assert int(position[0]) == 24 and int(token[0]) == want[-1]


@pytest.mark.parametrize("layer_window", [True, False], ids=["layer", "policy"])
def test_quick_run_keeps_the_cache_size_and_writes_json_and_png(tmp_path, layer_window):
  argv = ["--tokens", "600", "--chunk", "200", "--window", "16", "--out", str(tmp_path)]
  assert bench.main(argv + (["--layer-window"] if layer_window else [])) == 0
  [path] = tmp_path.glob("streaming-*.json")
  assert path.with_suffix(".png").stat().st_size > 0
  result = json.loads(path.read_text())
  rows = result["rows"]
  assert [r["tokens"] for r in rows] == [200, 400, 600]
  assert [r["position"] for r in rows] == [200, 400, 600]
  assert {r["cache_bytes"] for r in rows} == {result["cache_bytes"]}
  assert result["cache_bytes"] < result["dense_cache_bytes_at_end"]
  for row in rows:
    assert row["tokens_per_s"] == 200 / row["seconds"] and row["resident_bytes"] > 0
  assert result["machine"]["jax"] == jax.__version__
