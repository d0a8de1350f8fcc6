"""Stateful layers: parameters, running buffers, train/eval, forward/backward."""

from ._base import Module
from .batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from .norms import GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, LayerNorm, RMSNorm
from .renorm import BatchRenorm, BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from .sync import SyncBatchNorm

__all__ = ["Module", "BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm"]
__all__ += ["LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]
__all__ += ["BatchRenorm", "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d"]
