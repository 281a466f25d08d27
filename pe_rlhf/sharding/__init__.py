"""Device mesh, logical-axis sharding rules (see rules.py for the choices made), per-device compiled memory."""

from pe_rlhf.sharding.memory import MemoryReport, compiled_memory, format_bytes
from pe_rlhf.sharding.mesh import MESH_AXES, MeshConfig, MeshError, make_mesh
from pe_rlhf.sharding.rules import (
    DEFAULT_RULES,
    ShardingFallbackWarning,
    ShardingRuleError,
    batch_shardings,
    cache_shardings,
    fit_spec,
    logical_to_spec,
    named_sharding,
    shard_state,
    state_shardings,
)

__all__ = [
    "MemoryReport", "compiled_memory", "format_bytes", "MESH_AXES", "MeshConfig", "MeshError", "make_mesh",
    "DEFAULT_RULES", "ShardingFallbackWarning", "ShardingRuleError", "batch_shardings", "cache_shardings",
    "fit_spec", "logical_to_spec", "named_sharding", "shard_state", "state_shardings",
]
