"""bnorm: batch normalization in pure NumPy, exact in the PyTorch, Keras and ONNX conventions.

>>> import numpy as np, bnorm
>>> bn = bnorm.BatchNorm2d(3)
>>> y = bn(np.random.default_rng(0).normal(size=(8, 3, 4, 4)))
>>> y.shape, int(bn.num_batches_tracked)
((8, 3, 4, 4), 1)
"""

from . import (
    _requirements,  # noqa: F401  (first: an ImportError on NumPy < 2.0, before anything fails)
    distributed,
    fold,
    functional,
    interop,
    preprocessing,
    testing,
)
from ._conventions import CONVENTIONS, Convention, MomentumConventionWarning
from ._version import __version__
from .functional._kernels.pool import num_threads, set_num_threads
from .io import load, save
from .layers import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchRenorm,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    GroupNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LayerNorm,
    Module,
    RMSNorm,
    SyncBatchNorm,
)

__all__ = [
    "__version__",
    "functional",
    "CONVENTIONS",
    "Convention",
    "MomentumConventionWarning",
    "Module",
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "SyncBatchNorm",
    "BatchRenorm",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "LayerNorm",
    "RMSNorm",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "preprocessing",
    "save",
    "load",
    "interop",
    "fold",
    "distributed",
    "testing",
    "num_threads",
    "set_num_threads",
]
