"""Fixed-budget KV caches (`lsm.layers.kv_policies`): sink + window against a windowed layer,
heavy hitters and SnapKV against float64 simulations of their policies, every policy equal to
full attention when the budget holds everything, budgets over 10k decode steps, generate."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsm.config import Config
from lsm.decode import generate
from lsm.decode.generate import cache_policy_of
from lsm.layers import (Attention, BlockSelectPolicy, HeavyHitterPolicy, ScoredKVCache,
                        SinkWindowPolicy, SnapKVPolicy)
from lsm.layers.kv_cache import EMPTY_POSITION
from lsm.models import LM
from tests.layers.helpers import assert_close, cached as _cached, forward as _forward

D_MODEL, HEADS, KV_HEADS, HEAD_DIM, T = 16, 4, 2, 8, 21


def _layer(**kwargs):
  return Attention(D_MODEL, HEADS, KV_HEADS, HEAD_DIM, rngs=nnx.Rngs(3), **kwargs)


def _x(seed, b=2, t=T):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((b, t, D_MODEL)), jnp.float32)


def _decode(layer, x, policy, prefill):
  """A prefill of ``prefill`` tokens, then one token at a time: (outputs, last cache)."""
  b, t, _ = x.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  segments = jnp.zeros((b, t), jnp.int32)
  cache = layer.init_cache(b, t, policy=policy)
  outs = []
  for start, stop in zip([0, *range(prefill, t)], range(prefill, t + 1)):
    y, cache = _cached(layer, x[:, start:stop], positions[:, start:stop],
                       segments[:, start:stop], cache)
    outs.append(y)
  return jnp.concatenate(outs, axis=1), cache


def test_sink_window_policy_on_a_full_attention_layer_equals_a_windowed_layer():
  """The policy's ring cache reads the layer with the policy's mask: decoding a plain layer
  with it equals the forward of the same weights with window and sinks built in."""
  plain, windowed = _layer(), _layer(window=5, sink_tokens=2)
  for a, b in zip(jax.tree.leaves(nnx.state(plain)), jax.tree.leaves(nnx.state(windowed))):
    np.testing.assert_array_equal(a, b)
  x = _x(0)
  positions = jnp.broadcast_to(jnp.arange(T), (2, T))
  want = _forward(windowed, x, positions, positions * 0)
  got, cache = _decode(plain, x, SinkWindowPolicy(sink_tokens=2, window=5), prefill=7)
  assert_close(got, want, what="sink + window policy vs windowed layer")
  assert cache.keys.shape[1] == 2 + 5  # the budget: the cache never grows
  full = _forward(plain, x, positions, positions * 0)
  assert float(jnp.max(jnp.abs(full - want))) > 1e-3  # the window matters here


def test_renumbered_sinks_follow_streamingllm_positions():
  """positions="renumbered": each query p attends the window at true distances and the sinks
  as if it stood at min(p, S + W) (StreamingLLM's positions within the cache) — checked against
  a float64 softmax over exactly those keys at those rotary positions."""
  from lsm.layers.rope import apply_rope  # noqa: PLC0415
  layer, (sinks, window) = _layer(), (2, 5)
  x = _x(4)
  got, cache = _decode(layer, x, SinkWindowPolicy(sink_tokens=sinks, window=window,
                                                  positions="renumbered"), prefill=3)
  assert cache.keys.shape[1] == sinks + window
  q, k, v = layer._project(x)

  def rotated(z, position):
    return np.asarray(apply_rope(z[:, None], jnp.full((z.shape[0], 1), position)), np.float64)[:, 0]

  group = HEADS // KV_HEADS
  want = np.zeros((2, T, HEADS, HEAD_DIM))
  for p in range(T):
    here = min(p, sinks + window)
    kept = [(j, j) for j in range(min(sinks, p - window))]  # sinks out of the window
    kept += [(i, here - (p - i)) for i in range(max(0, p - window), p + 1)]
    q_p = rotated(q[:, p], here)  # [B, H, K]
    keys = np.stack([rotated(k[:, i], at) for i, at in kept], 1)  # [B, n, G, K]
    values = np.asarray(v, np.float64)[:, [i for i, _ in kept]]
    keys, values = np.repeat(keys, group, axis=2), np.repeat(values, group, axis=2)
    scores = np.einsum("bhk,bnhk->bhn", q_p, keys) / np.sqrt(HEAD_DIM)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    want[:, p] = np.einsum("bhn,bnhk->bhk", weights, values)
  want = np.einsum("bthk,hkd->btd", want, np.asarray(layer.out[...], np.float64))
  assert_close(got, want, what="renumbered sink + window vs float64")
  stored, _ = _decode(layer, x, SinkWindowPolicy(sink_tokens=sinks, window=window), prefill=3)
  late = sinks + window + 1  # from here on the two numberings differ
  np.testing.assert_allclose(stored[:, :late], got[:, :late], atol=1e-5)
  assert float(jnp.max(jnp.abs(stored[:, late:] - got[:, late:]))) > 1e-3


@pytest.mark.parametrize("policy", [HeavyHitterPolicy(budget=T, recent=3),
                                    SnapKVPolicy(budget=T, observation_window=4, pool_kernel=3),
                                    BlockSelectPolicy(block_size=4, top_k=6)],
                         ids=["heavy_hitter", "snapkv", "block_select"])
def test_a_budget_that_holds_everything_is_full_attention(policy):
  layer = _layer()
  x = _x(1)
  positions = jnp.broadcast_to(jnp.arange(T), (2, T))
  got, cache = _decode(layer, x, policy, prefill=9)
  assert_close(got, _forward(layer, x, positions, positions * 0), what="policy vs full")
  if isinstance(policy, BlockSelectPolicy):
    assert int(cache.dense.length) == T  # stores every token; the budget is on what is read
  else:
    assert int(jnp.min(cache.held())) == T


def test_block_select_steps_read_only_the_chosen_blocks():
  """A single decoding step with top_k=1 equals `block_select_decode` over the stored keys,
  and differs from full attention; prefill chunks attend densely."""
  from lsm.kernels.attention import select  # noqa: PLC0415
  layer = _layer()
  x = _x(6)
  policy = BlockSelectPolicy(block_size=4, top_k=1)
  positions = jnp.broadcast_to(jnp.arange(T), (2, T))
  full = _forward(layer, x, positions, positions * 0)
  cache = layer.init_cache(2, T, policy=policy)
  y, cache = _cached(layer, x[:, :-1], positions[:, :-1], positions[:, :-1] * 0, cache)
  assert_close(y, full[:, :-1], what="dense prefill")
  step, _ = _cached(layer, x[:, -1:], positions[:, -1:], positions[:, -1:] * 0, cache)
  q, k, v = layer._project(x)
  q, k = layer._rope(q, positions), layer._rope(k, positions)
  want = layer._output(select.block_select_decode(
      q[:, -1:], k, v, q_positions=positions[:, -1:], cache_positions=positions, block_size=4,
      top_k=1))
  assert_close(step, want, what="step vs block_select_decode")
  assert float(jnp.max(jnp.abs(step - full[:, -1:]))) > 1e-4


# ------------------------------------------------------------- float64 simulations of the policies

B, G, D = 2, 2, 4  # batch, query heads per KV head; KV_HEADS KV heads


def _random_calls(seed, lengths):
  rng = np.random.default_rng(seed)
  calls, start = [], 0
  for t in lengths:
    q = rng.standard_normal((B, t, KV_HEADS * G, D))
    k, v = (rng.standard_normal((B, t, KV_HEADS, D)) for _ in range(2))
    positions = np.broadcast_to(np.arange(start, start + t, dtype=np.int32), (B, t))
    calls.append((q, k, v, positions))
    start += t
  return calls


def _simulate(calls, budget, recent, snapkv=None):
  """Per row and KV head, float64: attend over stored + new, score, keep. Returns the outputs
  per call and the positions kept after each call."""
  scale = D ** -0.5
  outs, kept = [], []
  stored = {(b, h): [] for b in range(B) for h in range(KV_HEADS)}  # dicts per token
  written = 0
  for n, (q, k, v, positions) in enumerate(calls):
    t = q.shape[1]
    out = np.zeros(q.shape)
    for (b, h), tokens in stored.items():
      new = [dict(pos=int(positions[b, i]), arrival=written + i, score=0.0, k=k[b, i, h],
                  v=v[b, i, h]) for i in range(t)]
      visible = tokens + new
      observed = np.zeros(len(visible))
      for i in range(t):
        for j in range(G):
          see = [e for e in visible if e["pos"] <= positions[b, i]]
          s = np.array([scale * q[b, i, h * G + j] @ e["k"] for e in see])
          p = np.exp(s - s.max())
          p /= p.sum()
          out[b, i, h * G + j] = p @ np.array([e["v"] for e in see])
          for e, w in zip(see, p):
            e["score"] += w if snapkv is None else 0.0
            if snapkv is not None and i >= t - snapkv[0]:
              observed[visible.index(e)] += w
      if snapkv is not None:
        if n == 0:  # the prefill: max-pooled observation scores
          half = snapkv[1] // 2
          for a, e in enumerate(visible):
            window = e["arrival"] >= written + t - snapkv[0]
            e["score"] = -1.0 if window else max(observed[max(0, a - half):a + half + 1])
        else:
          for e in new:
            e["score"] = -1.0
      total = written + t
      visible.sort(key=lambda e: (e["arrival"] >= total - recent, e["score"], e["arrival"]),
                   reverse=True)
      stored[b, h] = visible[:budget]
    written += t
    outs.append(out)
    kept.append({key: sorted(e["pos"] for e in tokens) for key, tokens in stored.items()})
  return outs, kept


@functools.partial(jax.jit, static_argnames="policy")
def _attend(cache, q, k, v, positions, policy):
  del policy  # in the cache; a static argument so each policy compiles once
  return cache.attend(q, k, v, positions, jnp.zeros_like(positions))


def _run_cache(calls, policy):
  cache = ScoredKVCache.create(B, KV_HEADS, D, jnp.float32, policy=policy)
  outs, kept = [], []
  for q, k, v, positions in calls:
    out, cache = _attend(cache, *(jnp.asarray(x, jnp.float32) for x in (q, k, v)),
                         jnp.asarray(positions), policy)
    outs.append(out)
    pos = np.asarray(cache.positions)
    kept.append({(b, h): sorted(int(p) for p in pos[b, :, h] if p != EMPTY_POSITION)
                 for b in range(B) for h in range(KV_HEADS)})
  return outs, kept


def test_heavy_hitters_follow_the_float64_policy():
  """A prefill of 6 tokens then 14 single steps with a budget of 5 (2 recent): the same outputs
  and, after every call, the same tokens kept per row and KV head as the simulation."""
  calls = _random_calls(11, [6] + [1] * 14)
  policy = HeavyHitterPolicy(budget=5, recent=2)
  got_out, got_kept = _run_cache(calls, policy)
  want_out, want_kept = _simulate(calls, 5, 2)
  for n, (got, want) in enumerate(zip(got_out, want_out)):
    assert_close(got, want, what=f"call {n}")
  assert got_kept == want_kept
  # Not just the most recent tokens: some old heavy hitter survives somewhere.
  assert any(min(p) < 20 - 5 for p in got_kept[-1].values())


def test_snapkv_keeps_the_top_pooled_prompt_keys():
  """A prompt of 16 tokens compressed to 7 (observation window 3, pooling 3), then 8 steps:
  the same kept tokens and outputs as the simulation; selected prompt keys outlive the decoded
  tokens that leave the window."""
  calls = _random_calls(12, [16] + [1] * 8)
  policy = SnapKVPolicy(budget=7, observation_window=3, pool_kernel=3)
  got_out, got_kept = _run_cache(calls, policy)
  want_out, want_kept = _simulate(calls, 7, 3, snapkv=(3, 3))
  for n, (got, want) in enumerate(zip(got_out, want_out)):
    assert_close(got, want, what=f"call {n}")
  assert got_kept == want_kept
  prompt_keys = {key: [p for p in kept if p < 13] for key, kept in got_kept[0].items()}
  for kept in got_kept[1:]:
    for key, positions in kept.items():
      assert [p for p in positions if p < 13] == prompt_keys[key]


@pytest.mark.parametrize("policy", [HeavyHitterPolicy(budget=16, recent=4),
                                    SnapKVPolicy(budget=16, observation_window=4)],
                         ids=["heavy_hitter", "snapkv"])
def test_the_budget_holds_over_10k_decode_steps(policy):
  steps = 10_000

  @jax.jit
  def run(key):
    cache = ScoredKVCache.create(1, 1, 4, jnp.float32, policy=policy)

    def step(cache, n):
      q, k, v = jax.random.normal(jax.random.fold_in(key, n), (3, 1, 1, 1, 4))
      out, cache = cache.attend(q, k, v, jnp.full((1, 1), n, jnp.int32),
                                jnp.zeros((1, 1), jnp.int32))
      return cache, (cache.held()[0, 0], jnp.max(jnp.where(
          cache.positions == EMPTY_POSITION, -1, cache.positions)), jnp.all(jnp.isfinite(out)))

    return jax.lax.scan(step, cache, jnp.arange(steps))

  cache, (held, newest, finite) = run(jax.random.key(0))
  held = np.asarray(held)
  assert held.max() <= policy.budget and held[-1] == policy.budget
  np.testing.assert_array_equal(held[:policy.budget], np.arange(1, policy.budget + 1))
  np.testing.assert_array_equal(np.asarray(newest), np.arange(steps))  # the newest is kept
  assert bool(np.all(finite))
  recent = policy.recent if isinstance(policy, HeavyHitterPolicy) else policy.observation_window
  kept = set(np.asarray(cache.positions).ravel().tolist())
  assert set(range(steps - recent, steps)) <= kept


# ------------------------------------------------------------------------------------- generate

VOCAB = 29


def _model():
  config = Config.model_validate({"model": dict(d_model=32, num_layers=2, num_heads=4,
                                                num_kv_heads=2, vocab_size=VOCAB)})
  with nnx.use_eager_sharding(False):
    return LM(config.model, vocab_size=VOCAB, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name, section", [
    ("sink_window", dict(sink_tokens=2, window=6)),
    ("heavy_hitter", dict(budget=8, recent=3)),
    ("snapkv", dict(budget=8, observation_window=3, pool_kernel=3)),
    ("block_select", dict(block_size=2, top_k=1))])
def test_generate_with_each_policy_from_the_config(name, section):
  """Policies come from the decode config; rows are independent (a batch equals each prompt
  alone); a budget that holds everything generates what the full cache does."""
  config = Config.model_validate({"decode": {"cache_policy": name, name: section}})
  policy = cache_policy_of(config.decode)
  model = _model()
  rng = np.random.default_rng(4)
  prompts = [list(rng.integers(0, VOCAB, 10)) for _ in range(2)]
  together = generate(model, prompts, max_new_tokens=6, cache_policy=policy).tokens
  assert together == [generate(model, [p], max_new_tokens=6, cache_policy=policy).tokens[0]
                      for p in prompts]
  room = {"sink_window": "window", "block_select": "top_k"}.get(name, "budget")
  roomy = type(policy)(**{**section, room: 16})
  assert (generate(model, prompts, max_new_tokens=6, cache_policy=roomy).tokens
          == generate(model, prompts, max_new_tokens=6).tokens)


@pytest.mark.parametrize("make, message", [
    (lambda: HeavyHitterPolicy(budget=4, recent=5), "recent must be <= budget=4, got 5"),
    (lambda: HeavyHitterPolicy(budget=0), "budget must be a positive int, got 0"),
    (lambda: SnapKVPolicy(pool_kernel=4), "pool_kernel must be odd"),
    (lambda: SnapKVPolicy(budget=8, observation_window=9), "observation_window must be <= "),
    (lambda: SinkWindowPolicy(sink_tokens=-1), "sink_tokens must be an int >= 0, got -1"),
    (lambda: _layer(window=4).init_cache(1, 8, policy=SinkWindowPolicy()),
     "a cache policy needs a layer without a window"),
    (lambda: _layer().init_cache(1, 8, policy="h2o"), "policy must be one of"),
    (lambda: generate(_model(), [[1]], max_new_tokens=1, cache_policy=3), "cache_policy must be "
                                                                          "one of"),
])
def test_errors_name_the_argument(make, message):
  with pytest.raises((ValueError, TypeError), match=message):
    make()
