"""Meshes, logical-axis rules and shardings; context-parallel attention, token layouts and
sequence-sharded decoding."""

from lsm.parallel.context import (STRATEGIES, ContextParallel, choose_strategy, context_attention,
                                  hop_table, strategy_costs, work_balance)
from lsm.parallel.decode import merge_across, shard_cache, sharded_cache_attention
from lsm.parallel.layout import (LAYOUTS, from_layout, inverse_permutation, permutation,
                                 to_layout)
from lsm.parallel.mesh import (AXES, RULES, data_sharding, host_batch_to_global, in_mesh,
                               logical_to_spec, make_mesh, replicated, state_shardings)

__all__ = ["AXES", "ContextParallel", "LAYOUTS", "RULES", "STRATEGIES", "choose_strategy",
           "context_attention", "data_sharding", "from_layout", "hop_table",
           "host_batch_to_global", "in_mesh", "inverse_permutation", "logical_to_spec",
           "make_mesh", "merge_across", "permutation", "replicated", "shard_cache",
           "sharded_cache_attention", "state_shardings", "strategy_costs", "to_layout",
           "work_balance"]
