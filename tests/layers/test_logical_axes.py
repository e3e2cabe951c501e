"""Every parameter carries one logical axis name per dimension, read back with
`nnx.get_partition_spec`, and the names shard a layer on a mesh through a rules table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lsm.layers import LOGICAL_AXES, Attention, Embed, RMSNorm, SwiGLU
from tests.layers.helpers import assert_close

LAYERS = {
    "rmsnorm": (lambda: RMSNorm(16), {("scale",): ("embed",)}),
    "swiglu": (lambda: SwiGLU(16, 40, rngs=nnx.Rngs(0)),
               {("gate",): ("embed", "mlp"), ("up",): ("embed", "mlp"),
                ("down",): ("mlp", "embed")}),
    "embed": (lambda: Embed(32, 16, rngs=nnx.Rngs(0)), {("embedding",): ("vocab", "embed")}),
    "attention": (lambda: Attention(16, 4, 2, 8, qk_norm=True, rngs=nnx.Rngs(0)),
                  {("query",): ("embed", "heads", "head_dim"),
                   ("key",): ("embed", "kv_heads", "head_dim"),
                   ("value",): ("embed", "kv_heads", "head_dim"),
                   ("out",): ("heads", "head_dim", "embed"),
                   ("query_norm", "scale"): ("head_dim",),
                   ("key_norm", "scale"): ("head_dim",)}),
}


def _flat_specs(layer):
  specs = nnx.get_partition_spec(nnx.state(layer, nnx.Param))
  return {path: tuple(var.get_value()) for path, var in nnx.to_flat_state(specs)}


@pytest.mark.parametrize("name", LAYERS)
def test_every_param_names_each_dimension(name):
  make, expected = LAYERS[name]
  layer = make()
  specs = _flat_specs(layer)
  assert specs == expected
  shapes = {path: var.shape for path, var in nnx.to_flat_state(nnx.state(layer, nnx.Param))}
  for path, names in specs.items():
    assert len(names) == len(shapes[path]), path
    assert set(names) <= set(LOGICAL_AXES), path


RULES = [("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"),
         ("kv_heads", None), ("head_dim", None)]


def test_rules_map_the_names_and_shard_a_layer():
  layer = Attention(16, 4, 2, 8, rngs=nnx.Rngs(1))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, 16)), jnp.float32)
  forward = nnx.jit(lambda layer, x: layer(x))
  unsharded = forward(layer, x)
  with nnx.logical_axis_rules(RULES):
    specs = nnx.get_partition_spec(nnx.state(layer, nnx.Param))
  assert specs["query"].get_value() == PartitionSpec("fsdp", "tensor", None)
  assert specs["out"].get_value() == PartitionSpec("tensor", None, "fsdp")
  mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)
  nnx.update(layer, jax.device_put(nnx.state(layer, nnx.Param), shardings))
  assert layer.query[...].sharding.spec == PartitionSpec("fsdp", "tensor", None)
  assert len(layer.query[...].sharding.device_set) == 8
  assert_close(forward(layer, x), unsharded, what="sharded vs unsharded")
