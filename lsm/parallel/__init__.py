"""Meshes, logical-axis rules and shardings (context-parallel schedules come with issue 5)."""

from lsm.parallel.mesh import (AXES, RULES, data_sharding, host_batch_to_global, logical_to_spec,
                               make_mesh, replicated, state_shardings)

__all__ = ["AXES", "RULES", "data_sharding", "host_batch_to_global", "logical_to_spec",
           "make_mesh", "replicated", "state_shardings"]
