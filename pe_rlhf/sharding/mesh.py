"""The device mesh, built from three numbers.

Every run uses one mesh with the axes ('data', 'fsdp', 'tensor'):
data parallelism replicates the parameters, FSDP shards them along `embed`,
tensor parallelism shards heads / mlp / vocab. An axis of size 1 costs nothing,
so the same rule table (`rules.DEFAULT_RULES`) serves every mesh.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from pe_rlhf.config_checks import check_fields, choice, either, integer

MESH_AXES = ("data", "fsdp", "tensor")


class MeshError(ValueError):
    """A mesh that cannot be laid over the available devices."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the ('data', 'fsdp', 'tensor') mesh axes; one of them may be -1 (the rest).

    The default is pure data parallelism over every device.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        size = either(integer(ge=1), choice(-1))  # -1: the rest of the devices
        check_fields(self, MeshError, data=size, fsdp=size, tensor=size)
        free = [k for k in MESH_AXES if getattr(self, k) == -1]
        if len(free) > 1:
            raise MeshError(f"{self}: at most one axis may be -1 (the rest), got {', '.join(free)}")

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        """The concrete axis sizes for `num_devices` devices, or a `MeshError` saying why not."""
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        free = [k for k, v in sizes.items() if v == -1]
        fixed = math.prod(v for v in sizes.values() if v != -1)
        if free:
            if num_devices % fixed:
                raise MeshError(
                    f"MeshConfig{sizes}: the fixed axes multiply to {fixed}, which does not divide the "
                    f"{num_devices} devices, so '{free[0]}=-1' has no whole size; choose sizes whose "
                    f"product divides {num_devices}"
                )
            sizes[free[0]] = num_devices // fixed
        elif fixed != num_devices:
            raise MeshError(
                f"MeshConfig{sizes}: the axes multiply to {fixed} but there are {num_devices} devices; "
                f"their product must equal the device count (or set one axis to -1)"
            )
        return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` with axes ('data', 'fsdp', 'tensor') over `devices` (default: all devices).

    The sizes are checked before anything compiles. Devices are ordered by
    `mesh_utils.create_device_mesh` (ICI-friendly on TPU); where it has no layout
    for a shape, they are taken in the order given (only speed differs).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = config.shape(len(devices))
    try:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (NotImplementedError, ValueError, AssertionError):
        grid = np.array(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES)
