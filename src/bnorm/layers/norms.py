r"""The rest of the normalization family.

``LayerNorm``, ``RMSNorm``, ``GroupNorm``, ``InstanceNorm1d/2d/3d``.

Each layer owns its parameters (and instance norm its optional running
buffers) and calls the stateless kernels of :mod:`bnorm.functional`; the
protocol is batch norm's: ``layer(x)`` / ``layer.forward(x)`` keeps the context,
``layer.backward(grad_output)`` returns grad_input and stores
:attr:`grad_weight` and :attr:`grad_bias`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from .._conventions import check_momentum
from .._running import NonFinitePolicy, check_policy
from .._validation import as_array, check_bool, check_eps, check_float_dtype, check_positive_int
from ..functional.group_norm import (
    check_num_groups,
    group_norm_backward,
    group_norm_forward,
)
from ..functional.instance_norm import instance_norm_backward, instance_norm_forward
from ..functional.layer_norm import (
    check_normalized_shape,
    layer_norm_backward,
    layer_norm_forward,
)
from ..functional.rms_norm import rms_norm_backward, rms_norm_forward
from ._base import Module

__all__ = ["LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]


_check_flag = check_bool


class _NormLayer(Module):
    """What the family's layers share: affine parameters, their gradients, backward."""

    _parameters: tuple[str, ...] = ("weight", "bias")
    _buffers: tuple[str, ...] = ()

    weight: np.ndarray | None
    bias: np.ndarray | None
    dtype: np.dtype[Any]

    def __init__(self) -> None:
        super().__init__()
        self.grad_weight: np.ndarray | None = None
        self.grad_bias: np.ndarray | None = None
        self._ctx: Any = None
        self._backward_fn: Callable[[Any, Any], tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]

    def _init_affine(self, shape: tuple[int, ...], weight: bool, bias: bool) -> None:
        self.weight = np.ones(shape, self.dtype) if weight else None
        self.bias = np.zeros(shape, self.dtype) if bias else None

    @classmethod
    def _affine_shape(cls, args: Mapping[str, Any]) -> tuple[int, ...] | None:
        """The shape of weight and bias (and running buffers) for constructor `args`; None: unknown."""
        return None

    @classmethod
    def _state_shapes(cls, config: Mapping[str, Any]) -> dict[str, tuple[int, ...]] | None:
        args = cls._bound_config(config)
        shape = cls._affine_shape(args)
        if shape is None:
            return None
        shapes: dict[str, tuple[int, ...]] = {}
        if args.get("affine", args.get("elementwise_affine", False)):
            shapes["weight"] = shape
            if args.get("bias", True):
                shapes["bias"] = shape
        if args.get("track_running_stats", False):
            shapes.update(running_mean=shape, running_var=shape, num_batches_tracked=())
        return shapes

    def reset_parameters(self) -> None:
        """Set weight to 1 and bias to 0 (where present)."""
        if self.weight is not None:
            self.weight.fill(1)
        if self.bias is not None:
            self.bias.fill(0)

    def backward(self, grad_output: Any) -> np.ndarray:
        r"""Backpropagate through the last :meth:`forward`.

        Returns grad_input and stores :attr:`grad_weight` and :attr:`grad_bias`
        (overwritten, not accumulated; None without the parameter).  The
        formulas are in the functional ``*_backward`` kernel.
        """
        if self._ctx is None:
            raise RuntimeError("backward called before forward: run forward(x) first")
        dx, dw, db = self._backward_fn(grad_output, self._ctx)
        self.grad_weight, self.grad_bias = dw, db
        return dx

    def extra_repr(self) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


class LayerNorm(_NormLayer):
    r"""Layer normalization over the trailing `normalized_shape` axes.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \odot \gamma + \beta

    Mean and *biased* variance are taken per sample over the last
    ``len(normalized_shape)`` axes; gamma and beta are elementwise, of shape
    `normalized_shape`.  The same computation in training and evaluation (no
    running statistics).  PyTorch's :class:`torch.nn.LayerNorm`.

    Parameters
    ----------
    normalized_shape : int or sequence of int
        The trailing shape F; the input is ``(*, *F)``.
    eps : float, default 1e-5
        Added to the variance (>= 0).
    elementwise_affine : bool, default True
        Learnable weight (init 1) and, with `bias`, bias (init 0), shape F.
    bias : bool, default True
        Whether the affine includes beta (PyTorch >= 2.1).
    dtype : dtype, default float32, keyword-only
        dtype of the parameters.

    Attributes
    ----------
    weight, bias : ndarray of shape normalized_shape, or None
        gamma and beta.
    grad_weight, grad_bias : ndarray or None
        Set by :meth:`backward`.

    Examples
    --------
    >>> import numpy as np
    >>> import bnorm
    >>> ln = bnorm.LayerNorm(4)
    >>> y = ln(np.arange(8.0).reshape(2, 4))
    >>> y.round(3)
    array([[-1.342, -0.447,  0.447,  1.342],
           [-1.342, -0.447,  0.447,  1.342]])
    >>> dx = ln.backward(np.ones_like(y)); ln.grad_bias
    array([2., 2., 2., 2.], dtype=float32)
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        *,
        dtype: DTypeLike = np.float32,
    ) -> None:
        super().__init__()
        self.normalized_shape = check_normalized_shape(normalized_shape)
        self.eps = check_eps(eps, training=False)
        self.elementwise_affine = _check_flag(elementwise_affine, "elementwise_affine")
        use_bias = _check_flag(bias, "bias")
        self.dtype = check_float_dtype(dtype)
        self._bias_flag = use_bias
        self._init_affine(
            self.normalized_shape, self.elementwise_affine, self.elementwise_affine and use_bias
        )
        self._backward_fn = layer_norm_backward

    @classmethod
    def _affine_shape(cls, args: Mapping[str, Any]) -> tuple[int, ...] | None:
        return check_normalized_shape(args["normalized_shape"])

    def forward(self, x: Any, *, training: bool | None = None) -> np.ndarray:
        """Normalize `x` of shape ``(*, *normalized_shape)``; `training` changes nothing."""
        y, self._ctx = layer_norm_forward(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return y

    def extra_repr(self) -> str:
        """The arguments shown by ``repr``."""
        return (
            f"{self.normalized_shape}, eps={self.eps!r}, elementwise_affine={self.elementwise_affine}, "
            f"bias={self._bias_flag}"
        )


class RMSNorm(_NormLayer):
    r"""Root-mean-square normalization over the trailing `normalized_shape` axes.

    .. math::
        y = \frac{x}{\sqrt{\mathrm{E}[x^2] + \epsilon}} \odot \gamma

    The mean square is taken per sample over the last
    ``len(normalized_shape)`` axes; nothing is subtracted and there is no
    bias.  The same computation in training and evaluation.  PyTorch's
    :class:`torch.nn.RMSNorm` (state dict ``weight``; ``repr``
    ``RMSNorm((4,), eps=None, elementwise_affine=True)``).

    Parameters
    ----------
    normalized_shape : int or sequence of int
        The trailing shape F; the input is ``(*, *F)``.
    eps : float or None, default None
        Added to the mean square (>= 0).  None is PyTorch's default: the machine
        epsilon of the *input's* compute dtype at each call
        (:func:`bnorm.functional.default_rms_eps`; ``1.19e-07`` for float32
        and float16 input), not the parameters' dtype.  Keras 3's
        ``RMSNormalization`` defaults to ``eps=1e-6``, ONNX's to ``1e-5``.
    elementwise_affine : bool, default True
        A learnable weight gamma of shape F (init 1); False: none.
    dtype : dtype, default float32, keyword-only
        dtype of the weight.

    Attributes
    ----------
    weight : ndarray of shape normalized_shape, or None
        gamma (Keras calls it ``scale``).
    grad_weight : ndarray or None
        Set by :meth:`backward`; :attr:`grad_bias` is always None.

    Notes
    -----
    How to reproduce the other frameworks' forms (same formula, other
    defaults and axis conventions) is in :func:`bnorm.functional.rms_norm`;
    :func:`bnorm.interop.from_torch` and :func:`bnorm.interop.from_keras`
    convert the layers.

    Examples
    --------
    >>> import numpy as np
    >>> import bnorm
    >>> norm = bnorm.RMSNorm(2)
    >>> norm
    RMSNorm((2,), eps=None, elementwise_affine=True)
    >>> y = norm(np.array([[3.0, 4.0], [1.0, -1.0]]))
    >>> y.round(4)
    array([[ 0.8485,  1.1314],
           [ 1.    , -1.    ]])
    >>> dx = norm.backward(np.ones_like(y)); norm.grad_weight.round(4)
    array([1.8485, 0.1314], dtype=float32)
    """

    _parameters = ("weight",)

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float | None = None,
        elementwise_affine: bool = True,
        *,
        dtype: DTypeLike = np.float32,
    ) -> None:
        super().__init__()
        self.normalized_shape = check_normalized_shape(normalized_shape)
        self.eps: float | None = None if eps is None else check_eps(eps, training=False)
        self.elementwise_affine = _check_flag(elementwise_affine, "elementwise_affine")
        self.dtype = check_float_dtype(dtype)
        self._init_affine(self.normalized_shape, self.elementwise_affine, False)
        self._backward_fn = _rms_backward

    def forward(self, x: Any, *, training: bool | None = None) -> np.ndarray:
        """Normalize `x` of shape ``(*, *normalized_shape)``; `training` changes nothing."""
        y, self._ctx = rms_norm_forward(x, self.normalized_shape, self.weight, self.eps)
        return y

    def extra_repr(self) -> str:
        """The arguments shown by ``repr`` (PyTorch's)."""
        return f"{self.normalized_shape}, eps={self.eps!r}, elementwise_affine={self.elementwise_affine}"


def _rms_backward(grad_output: Any, ctx: Any) -> tuple[np.ndarray, np.ndarray | None, None]:
    """:func:`rms_norm_backward` in the layers' (dx, dw, db) protocol (no bias: db None)."""
    dx, dw = rms_norm_backward(grad_output, ctx)
    return dx, dw, None


class GroupNorm(_NormLayer):
    r"""Group normalization: per sample, over groups of consecutive channels.

    .. math::
        y_{ncs} = \gamma_c \, \frac{x_{ncs} - \mu_{ng(c)}}{\sqrt{\sigma^2_{ng(c)} + \epsilon}} + \beta_c

    :math:`\mu_{ng}`, :math:`\sigma^2_{ng}` (biased) are taken over the
    ``num_channels / num_groups`` channels of group g and all spatial positions
    of sample n; gamma and beta are per channel.  The same computation in
    training and evaluation.  PyTorch's :class:`torch.nn.GroupNorm`.

    Parameters
    ----------
    num_groups : int
        G; must divide `num_channels`.
    num_channels : int
        C; the input is ``(N, C, *S)``.
    eps : float, default 1e-5
        Added to the variance (>= 0).
    affine : bool, default True
        Learnable per-channel weight (init 1) and, with `bias`, bias (init 0).
    bias : bool, default True, keyword-only
        Whether the affine includes beta (PyTorch >= 2.1).
    dtype : dtype, default float32, keyword-only
        dtype of the parameters.

    Attributes
    ----------
    weight, bias : ndarray of shape (C,) or None
        gamma and beta.
    grad_weight, grad_bias : ndarray of shape (C,) or None
        Set by :meth:`backward`.

    Raises
    ------
    ValueError
        `num_channels` not divisible by `num_groups` (PyTorch's message).

    Examples
    --------
    >>> import numpy as np
    >>> import bnorm
    >>> gn = bnorm.GroupNorm(2, 4)
    >>> y = gn(np.random.default_rng(0).normal(size=(3, 4, 5)))
    >>> g0 = y[:, :2].reshape(3, -1)          # group 0 of each sample
    >>> bool(np.allclose(g0.mean(axis=1), 0, atol=1e-6)), bool(np.allclose(g0.var(axis=1), 1, atol=1e-3))
    (True, True)
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        *,
        bias: bool = True,
        dtype: DTypeLike = np.float32,
    ) -> None:
        super().__init__()
        groups = check_num_groups(num_groups)
        channels = check_positive_int(num_channels, "num_channels")
        if channels % groups:
            raise ValueError(f"num_channels ({channels}) must be divisible by num_groups ({groups})")
        self.num_groups = groups
        self.num_channels = channels
        self.eps = check_eps(eps, training=False)
        self.affine = _check_flag(affine, "affine")
        use_bias = _check_flag(bias, "bias")
        self.dtype = check_float_dtype(dtype)
        self._init_affine((channels,), self.affine, self.affine and use_bias)
        self._backward_fn = group_norm_backward

    @classmethod
    def _affine_shape(cls, args: Mapping[str, Any]) -> tuple[int, ...] | None:
        return (check_positive_int(args["num_channels"], "num_channels"),)

    def forward(self, x: Any, *, training: bool | None = None) -> np.ndarray:
        """Normalize `x` of shape ``(N, C, *S)``; `training` changes nothing."""
        arr = as_array(x, "input")
        if arr.ndim < 2:
            raise ValueError(f"expected at least 2D input (got {arr.ndim}D input)")
        if self.affine and arr.shape[1] != self.num_channels:
            # Without affine PyTorch accepts any channel count divisible by num_groups; so does bnorm.
            raise ValueError(
                f"expected input with {self.num_channels} channels on axis 1, got input of shape {arr.shape}"
            )
        y, self._ctx = group_norm_forward(arr, self.num_groups, self.weight, self.bias, self.eps)
        return y

    def extra_repr(self) -> str:
        """The arguments shown by ``repr``."""
        return (  # PyTorch 2.13's: bias is whether a bias array exists
            f"{self.num_groups}, {self.num_channels}, eps={self.eps!r}, affine={self.affine}, "
            f"bias={self.bias is not None}"
        )


class _InstanceNorm(_NormLayer):
    r"""Shared state and behaviour of InstanceNorm1d/2d/3d.

    Parameters
    ----------
    num_features : int
        C, the number of channels.
    eps : float, default 1e-5
        Added to the variance (>= 0).
    momentum : float in [0, 1] or None, default 0.1
        PyTorch's weight on the new statistic,
        ``running = (1 - momentum) * running + momentum * batch``.  None is
        what PyTorch makes of it for instance norm: momentum 0, so the running
        statistics never change (there is no cumulative average here).
    affine : bool, default False
        Learnable per-channel weight (init 1) and, with `bias`, bias (init 0).
    track_running_stats : bool, default False
        Keep running statistics (updated in training, used in evaluation).
        Each batch contributes the batch average of every instance's mean and
        *unbiased* variance, as PyTorch does.
    bias : bool, default True, keyword-only
        Whether the affine includes beta.
    dtype : dtype, default float32, keyword-only
        dtype of the parameters and running buffers.
    on_nonfinite : {'skip', 'raise', 'propagate'}, default 'skip', keyword-only
        What a batch whose running-statistics update would not be finite (NaN
        or inf in the input, or statistics that overflow the buffers' dtype)
        does: skipped with a RuntimeWarning, FloatingPointError, or absorbed
        as PyTorch does (batch norm's policy).

    Attributes
    ----------
    weight, bias : ndarray of shape (C,) or None
        gamma and beta.
    running_mean, running_var : ndarray of shape (C,) or None
        Running statistics (init 0 and 1) when tracking.
    num_batches_tracked : ndarray of shape (), int64, or None
        Kept for PyTorch state-dict compatibility; like PyTorch's instance
        norm, never incremented.
    grad_weight, grad_bias : ndarray of shape (C,) or None
        Set by :meth:`backward`.

    Notes
    -----
    Statistics are the input's own in training and, without running
    statistics, in evaluation too.  Input without the batch axis is
    accepted, as in PyTorch; a channel-count mismatch raises when the layer has
    per-channel state (affine or running statistics) and otherwise only warns,
    because then `num_features` is unused.
    """

    _buffers = ("running_mean", "running_var", "num_batches_tracked")
    _spatial_dims = 1

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        *,
        bias: bool = True,
        dtype: DTypeLike = np.float32,
        on_nonfinite: NonFinitePolicy = "skip",
    ) -> None:
        super().__init__()
        self.num_features = check_positive_int(num_features, "num_features")
        self.eps = check_eps(eps, training=False)
        self.momentum: float | None = check_momentum(momentum)
        self.affine = _check_flag(affine, "affine")
        self.track_running_stats = _check_flag(track_running_stats, "track_running_stats")
        use_bias = _check_flag(bias, "bias")
        self.dtype = check_float_dtype(dtype)
        self.on_nonfinite: NonFinitePolicy = check_policy(on_nonfinite)
        c = self.num_features
        self._init_affine((c,), self.affine, self.affine and use_bias)
        self.running_mean: np.ndarray | None = None
        self.running_var: np.ndarray | None = None
        self.num_batches_tracked: np.ndarray | None = None
        if self.track_running_stats:
            self.running_mean = np.zeros(c, self.dtype)
            self.running_var = np.ones(c, self.dtype)
            self.num_batches_tracked = np.array(0, dtype=np.int64)
        self._unbatched = False
        self._backward_fn = instance_norm_backward

    @classmethod
    def _affine_shape(cls, args: Mapping[str, Any]) -> tuple[int, ...] | None:
        return (check_positive_int(args["num_features"], "num_features"),)

    def reset_running_stats(self) -> None:
        """Zero the running mean and the counter, set the running variance to 1."""
        if self.running_mean is not None:
            self.running_mean.fill(0)
        if self.running_var is not None:
            self.running_var.fill(1)
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.fill(0)

    def reset_parameters(self) -> None:
        """Reset the running statistics, weight to 1 and bias to 0."""
        self.reset_running_stats()
        super().reset_parameters()

    def _check_input_dim(self, x: np.ndarray) -> None:
        dims = (self._spatial_dims + 1, self._spatial_dims + 2)
        if x.ndim not in dims:
            raise ValueError(f"expected {dims[0]}D or {dims[1]}D input (got {x.ndim}D input)")

    def forward(self, x: Any, *, training: bool | None = None) -> np.ndarray:
        r"""Normalize `x` of shape ``(N, C, *S)`` or ``(C, *S)``.

        Instance statistics are used in training and whenever the layer keeps
        no running statistics; in training the running statistics (when
        tracked) absorb the batch.  `training` overrides :attr:`training` for
        this call only.
        """
        arr = as_array(x, "input")
        self._check_input_dim(arr)
        feature_dim = arr.ndim - (self._spatial_dims + 1)
        if arr.shape[feature_dim] != self.num_features:
            if self.affine or self.track_running_stats:
                raise ValueError(
                    f"expected input's size at dim={feature_dim} to match num_features "
                    f"({self.num_features}), but got: {arr.shape[feature_dim]}."
                )
            warnings.warn(
                f"input's size at dim={feature_dim} does not match num_features. You can silence this "
                "warning by not passing in num_features, which is not used because affine=False",
                UserWarning,
                stacklevel=3,
            )
        mode = self._mode(training)
        unbatched = feature_dim == 0
        y, ctx = instance_norm_forward(
            arr[None] if unbatched else arr,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            mode or not self.track_running_stats,
            0.0 if self.momentum is None else self.momentum,
            self.eps,
            on_nonfinite=self.on_nonfinite,
        )
        self._ctx, self._unbatched = ctx, unbatched
        return y[0] if unbatched else y

    def backward(self, grad_output: Any) -> np.ndarray:
        r"""Backpropagate through the last :meth:`forward`.

        Returns grad_input (shaped like that forward's input, batched or not)
        and stores :attr:`grad_weight` and :attr:`grad_bias`.  The formulas are
        in :func:`bnorm.functional.instance_norm_backward`.
        """
        if self._ctx is None or not self._unbatched:
            return super().backward(grad_output)
        g = np.asarray(grad_output)
        want = self._ctx.input.shape[1:]
        if g.shape != want:
            raise ValueError(f"grad_output must have the input's shape {want}, got {g.shape}")
        dx: np.ndarray = super().backward(g[None])[0]
        return dx

    def extra_repr(self) -> str:
        """The arguments shown by ``repr``."""
        return (
            f"{self.num_features}, eps={self.eps!r}, momentum={self.momentum!r}, affine={self.affine}, "
            f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}"
        )


_INSTANCE_DOC = "\n" + (_InstanceNorm.__doc__ or "").split("\n", 2)[2]


class InstanceNorm1d(_InstanceNorm):  # noqa: D101 (docstring assigned below)
    __doc__ = (
        r"""Instance normalization over ``(N, C, L)`` input (or unbatched ``(C, L)``).

    .. math::
        y_{ncl} = \gamma_c \, \frac{x_{ncl} - \mu_{nc}}{\sqrt{\sigma^2_{nc} + \epsilon}} + \beta_c

    with :math:`\mu_{nc}`, :math:`\sigma^2_{nc}` (biased) over the L positions of
    sample n, channel c.  PyTorch's :class:`torch.nn.InstanceNorm1d`, including
    its rank check (``expected 2D or 3D input (got 4D input)``).
    """
        + _INSTANCE_DOC
        + r"""
    Examples
    --------
    >>> import numpy as np
    >>> import bnorm
    >>> norm = bnorm.InstanceNorm1d(2, track_running_stats=True)
    >>> y = norm(np.array([[[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]]]))
    >>> y.round(4)
    array([[[-1.2247,  0.    ,  1.2247],
            [-0.7071, -0.7071,  1.4142]]])
    >>> norm.running_mean, norm.running_var
    (array([0.2, 0.2], dtype=float32), array([1. , 2.1], dtype=float32))
    """
    )
    _spatial_dims = 1


class InstanceNorm2d(_InstanceNorm):  # noqa: D101 (docstring assigned below)
    __doc__ = (
        r"""Instance normalization over ``(N, C, H, W)`` input (or unbatched ``(C, H, W)``).

    .. math::
        y_{nchw} = \gamma_c \, \frac{x_{nchw} - \mu_{nc}}{\sqrt{\sigma^2_{nc} + \epsilon}} + \beta_c

    with :math:`\mu_{nc}`, :math:`\sigma^2_{nc}` (biased) over the H x W
    positions of sample n, channel c.  PyTorch's :class:`torch.nn.InstanceNorm2d`,
    including its rank check (``expected 3D or 4D input (got 2D input)``).
    """
        + _INSTANCE_DOC
        + r"""
    Examples
    --------
    >>> import numpy as np
    >>> import bnorm
    >>> y = bnorm.InstanceNorm2d(3)(np.random.default_rng(0).normal(size=(2, 3, 4, 4)))
    >>> bool(np.allclose(y.mean(axis=(2, 3)), 0, atol=1e-6))
    True
    """
    )
    _spatial_dims = 2


class InstanceNorm3d(_InstanceNorm):  # noqa: D101 (docstring assigned below)
    __doc__ = (
        r"""Instance normalization over ``(N, C, D, H, W)`` input (or unbatched ``(C, D, H, W)``).

    .. math::
        y_{ncdhw} = \gamma_c \, \frac{x_{ncdhw} - \mu_{nc}}{\sqrt{\sigma^2_{nc} + \epsilon}} + \beta_c

    with :math:`\mu_{nc}`, :math:`\sigma^2_{nc}` (biased) over the D x H x W
    positions of sample n, channel c.  PyTorch's :class:`torch.nn.InstanceNorm3d`,
    including its rank check (``expected 4D or 5D input (got 3D input)``).
    """
        + _INSTANCE_DOC
    )
    _spatial_dims = 3
