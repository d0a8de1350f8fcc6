"""Stateless kernels: batch norm, batch renormalization, layer, group, instance and RMS norm.

``op(...)`` -> output, ``op_forward(...)`` -> (output, ctx),
``op_backward(grad_output, ctx)`` -> (grad_input, grad_weight, grad_bias)
(RMS norm, which has no bias: (grad_input, grad_weight)).
"""

from .batch_norm import (
    BatchNormContext,
    batch_norm,
    batch_norm_backward,
    batch_norm_forward,
)
from .batch_renorm import (
    BatchRenormContext,
    batch_renorm,
    batch_renorm_backward,
    batch_renorm_forward,
)
from .group_norm import (
    GroupNormContext,
    group_norm,
    group_norm_backward,
    group_norm_forward,
)
from .instance_norm import (
    InstanceNormContext,
    instance_norm,
    instance_norm_backward,
    instance_norm_forward,
)
from .layer_norm import (
    LayerNormContext,
    layer_norm,
    layer_norm_backward,
    layer_norm_forward,
)
from .rms_norm import (
    RMSNormContext,
    default_rms_eps,
    rms_norm,
    rms_norm_backward,
    rms_norm_forward,
)

__all__ = [
    "BatchNormContext",
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_forward",
    "BatchRenormContext",
    "batch_renorm",
    "batch_renorm_forward",
    "batch_renorm_backward",
    "LayerNormContext",
    "layer_norm",
    "layer_norm_forward",
    "layer_norm_backward",
    "GroupNormContext",
    "group_norm",
    "group_norm_forward",
    "group_norm_backward",
    "InstanceNormContext",
    "instance_norm",
    "instance_norm_forward",
    "instance_norm_backward",
    "RMSNormContext",
    "rms_norm",
    "rms_norm_forward",
    "rms_norm_backward",
    "default_rms_eps",
]
