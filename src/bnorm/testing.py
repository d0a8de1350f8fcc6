r"""Testing helpers for hand-written layers: :func:`check_grad`, a gradient check that tests something.

A gradient check compares a backward pass with finite differences of the
forward.  Done naively it proves little: with an all-ones upstream gradient
the input gradient of batch norm is identically zero, so a backward that
forgets the mean and variance terms passes; with gamma = 1 a backward that
ignores gamma passes.  :func:`check_grad` is the vector-Jacobian check of
HIPS autograd's ``check_grads``: for a random upstream gradient u and a random
direction v of one input at a time it compares

.. math::
    \frac{d}{dt} \langle u, f(x + t v) \rangle \Big|_{t=0}
    \quad\text{(central differences)}
    \qquad\text{with}\qquad
    \langle J^T u, v \rangle \quad\text{(the backward pass)},

which costs four forward passes per input and direction, on any shape.
Everything runs in float64: the inputs must be float64 arrays (no silent
cast -- the forward under test must see the dtype it will be checked in).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["check_grad", "GradientCheckError"]


class GradientCheckError(AssertionError):
    """A backward pass disagrees with the finite differences of its forward (an AssertionError)."""


def _input_names(forward: Callable[..., Any], n: int, names: Sequence[str] | None) -> list[str]:
    if names is not None:
        if len(names) != n:
            raise ValueError(f"names must give one name per input ({n}), got {len(names)}")
        return [str(s) for s in names]
    try:
        params = [
            p.name
            for p in inspect.signature(forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = []
    return [params[i] if i < len(params) else f"input {i}" for i in range(n)]


def _output(result: Any) -> np.ndarray:
    if not (isinstance(result, tuple) and len(result) == 2):
        raise TypeError(f"forward must return (output, ctx), got {type(result).__name__}")
    y = result[0]
    if not isinstance(y, np.ndarray) or y.dtype != np.float64:
        what = f"dtype {y.dtype}" if isinstance(y, np.ndarray) else type(y).__name__
        raise TypeError(f"forward must return a float64 ndarray output for float64 inputs, got {what}")
    return y


def check_grad(
    forward: Callable[..., Any],
    backward: Callable[[np.ndarray, Any], Any],
    *inputs: np.ndarray | None,
    eps: float = 1e-4,
    rtol: float = 1e-6,
    atol: float = 1e-10,
    seed: int | None = 0,
    n_directions: int = 2,
    names: Sequence[str] | None = None,
) -> float:
    r"""Check `backward` against central differences of `forward`; return the worst relative error.

    For ``n_directions`` random upstream gradients u (standard normal, the
    output's shape) and, for each input, a random direction v (standard
    normal, scaled by the input's root-mean-square so the step is relative),
    the derivative of :math:`\langle u, f(x + t v)\rangle` at t = 0 from the
    five-point stencil

    .. math::
        \frac{8\,(\phi(h) - \phi(-h)) - (\phi(2h) - \phi(-2h))}{12 h}

    (truncation error of order :math:`h^4`) is compared with
    :math:`\langle g, v\rangle`, g the input's gradient from `backward`.

    Parameters
    ----------
    forward : callable
        ``forward(*inputs) -> (output, ctx)``; must not modify its inputs.
    backward : callable
        ``backward(grad_output, ctx)`` -> one gradient per input (a tuple or
        list; a single array when there is one input).  None means "zero
        gradient": it is checked like any other, so a forward that does depend
        on that input fails.  Keep inputs you do not differentiate in a
        closure instead.
    *inputs : ndarray of float64, or None
        The point to check at.  None inputs are passed through and need a None
        gradient.  Inputs whose values are all equal (gamma = 1, beta = 0)
        trigger a warning: a backward that ignores them would pass.
    eps : float, default 1e-4
        Step h along v.  The stencil's truncation error is of order
        :math:`(h / \ell)^4` for a function that bends on a scale
        :math:`\ell`, its rounding error of order :math:`10^{-16} / h`: the
        default gives about 1e-12 on inputs of order 1 (batch norm of data
        with a standard deviation of 1e-3 wants ``eps=1e-6``).
    rtol, atol : float
        Fail when ``|numeric - analytic| > atol + rtol * scale``, with
        ``scale = max(|numeric|, |analytic|, ||g||)``: ``<g, v>`` has the
        typical size ``||g||`` for a random v, so a projection that happens to
        come out near zero is not held to a tighter standard.
    seed : int or None, default 0
        Seed of the random u and v (None: fresh randomness).
    n_directions : int, default 2
        Random (u, v) pairs per input.
    names : sequence of str, optional
        Names of the inputs for messages; by default `forward`'s parameter
        names (``lambda x, gamma, beta: ...`` gives "x", "gamma", "beta").

    Returns
    -------
    float
        The largest relative error ``|numeric - analytic| / scale`` seen (0
        where everything is 0).

    Raises
    ------
    GradientCheckError
        (an AssertionError) naming the input whose gradient is wrong, with both
        directional derivatives; also if `backward` returns the wrong number
        of gradients or a gradient of the wrong shape, modifies its
        grad_output, or `forward` modifies its inputs.
    TypeError
        If an input is not a float64 ndarray (or None), or `forward` does not
        return ``(float64 ndarray, ctx)``.
    ValueError
        If `eps`, `rtol`, `atol` or `n_directions` are out of range.

    Examples
    --------
    A hand-written layer -- here y = tanh(x * w) -- checked like bnorm's own:

    >>> import numpy as np
    >>> from bnorm.testing import check_grad
    >>> def forward(x, w):
    ...     t = np.tanh(x * w)
    ...     return t, (x, w, t)
    >>> def backward(g, ctx):
    ...     x, w, t = ctx
    ...     dz = g * (1 - t**2)
    ...     return dz * w, (dz * x).sum(axis=0)
    >>> rng = np.random.default_rng(0)
    >>> err = check_grad(forward, backward, rng.normal(size=(5, 3)), rng.normal(size=3))
    >>> err < 1e-8
    True

    bnorm's kernels have this shape already; wrap the arguments that are not
    differentiated:

    >>> from bnorm.functional import batch_norm_forward, batch_norm_backward
    >>> fwd = lambda x, gamma, beta: batch_norm_forward(x, None, None, gamma, beta, training=True)
    >>> x, gamma, beta = rng.normal(size=(8, 3)), rng.uniform(0.5, 2, 3), rng.normal(size=3)
    >>> check_grad(fwd, batch_norm_backward, x, gamma, beta) < 1e-8
    True

    The classic mistakes are caught.  A backward that drops the mean and
    variance terms of dx is invisible to an all-ones upstream gradient (the
    true dx is then 0, and so is ``g - mean(g)``), but not to a random one:

    >>> def wrong_backward(g, ctx):
    ...     dx, dgamma, dbeta = batch_norm_backward(g, ctx)
    ...     gamma = ctx.weight
    ...     return gamma * ctx.invstd * (g - g.mean(axis=0)), dgamma, dbeta
    >>> check_grad(fwd, wrong_backward, x, gamma, beta)
    Traceback (most recent call last):
    ...
    bnorm.testing.GradientCheckError: gradient of input 'x' (shape (8, 3)) is wrong: ...

    A backward that ignores gamma passes at gamma = 1 -- which is why
    :func:`check_grad` warns about constant inputs -- and fails at a random one:

    >>> def no_gamma(g, ctx):
    ...     m = g.shape[0]
    ...     x_hat = (ctx.input - ctx.mean) * ctx.invstd
    ...     dx = ctx.invstd / m * (m * g - g.sum(0) - x_hat * (g * x_hat).sum(0))
    ...     return dx, (g * x_hat).sum(0), g.sum(0)
    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")      # "input 'gamma' is constant (all 1.0)"
    ...     check_grad(fwd, no_gamma, x, np.ones(3), beta) < 1e-8
    True
    >>> check_grad(fwd, no_gamma, x, gamma, beta)
    Traceback (most recent call last):
    ...
    bnorm.testing.GradientCheckError: gradient of input 'x' (shape (8, 3)) is wrong: ...
    """
    for name, value, low in (("eps", eps, 0.0), ("rtol", rtol, 0.0), ("atol", atol, -1.0)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
        if not (np.isfinite(value) and value > low) and not (name == "atol" and value == 0):
            raise ValueError(f"{name} must be a finite number > {max(low, 0.0):g}, got {value!r}")
    if isinstance(n_directions, bool) or not isinstance(n_directions, (int, np.integer)) or n_directions < 1:
        raise ValueError(f"n_directions must be a positive int, got {n_directions!r}")
    labels = _input_names(forward, len(inputs), names)
    for i, (label, a) in enumerate(zip(labels, inputs, strict=True)):
        if a is None:
            continue
        if not isinstance(a, np.ndarray) or a.dtype != np.float64:
            what = f"an array of dtype {a.dtype}" if isinstance(a, np.ndarray) else type(a).__name__
            raise TypeError(
                f"input {i} ({label!r}) must be a float64 ndarray (finite differences need float64), "
                f"got {what}; pass np.asarray(value, dtype=np.float64)"
            )
        if a.size > 1 and np.all(a == a.flat[0]):
            warnings.warn(
                f"check_grad: input {label!r} is constant (all {float(a.flat[0])!r}); "
                "a backward that ignores or mishandles it can pass unnoticed -- check at random values",
                UserWarning,
                stacklevel=2,
            )
    # Seeded with (seed, a tag), not seed alone: u and v never coincide with the
    # caller's own default_rng(seed) draws (an upstream gradient equal to the
    # input makes batch norm's dx vanish, and the check would prove little).
    rng = np.random.default_rng(None if seed is None else [int(seed), 0x62_6E_6F_72])
    saved = [None if a is None else a.copy() for a in inputs]

    def phi(u: np.ndarray, i: int, v: np.ndarray, t: float) -> float:
        args = list(inputs)
        base = inputs[i]
        assert base is not None
        args[i] = base + t * v
        return float(np.vdot(u, _output(forward(*args))))

    y = _output(forward(*inputs))
    for i, (a, s) in enumerate(zip(inputs, saved, strict=True)):
        if a is not None and s is not None and not np.array_equal(a, s, equal_nan=True):
            raise GradientCheckError(f"forward modified input {i} ({labels[i]!r}) in place")
    worst = 0.0
    for _ in range(n_directions):
        u = rng.standard_normal(y.shape)
        u_copy = u.copy()
        ctx = forward(*inputs)[1]
        grads = backward(u, ctx)
        if not np.array_equal(u, u_copy):
            raise GradientCheckError("backward modified its grad_output in place")
        if isinstance(grads, np.ndarray) or grads is None:
            grads = (grads,)
        grads = tuple(grads)
        if len(grads) != len(inputs):
            raise GradientCheckError(
                f"backward must return one gradient per input ({len(inputs)}), got {len(grads)}"
            )
        for i, (label, a, g) in enumerate(zip(labels, inputs, grads, strict=True)):
            if a is None:
                if g is not None:
                    raise GradientCheckError(
                        f"input {i} ({label!r}) is None but backward returned a gradient"
                    )
                continue
            if g is not None:
                g = np.asarray(g, dtype=np.float64)
                if g.shape != a.shape:
                    raise GradientCheckError(
                        f"gradient of input {label!r} must have the input's shape {a.shape}, got {g.shape}"
                    )
            v = rng.standard_normal(a.shape)
            h = eps
            numeric = (
                8 * (phi(u, i, v, h) - phi(u, i, v, -h)) - (phi(u, i, v, 2 * h) - phi(u, i, v, -2 * h))
            ) / (12 * h)
            analytic = 0.0 if g is None else float(np.vdot(g, v))
            diff = abs(numeric - analytic)
            # <g, v> is N(0, |g|^2) for v ~ N(0, I): |g| is its typical size, so a projection
            # that comes out near 0 by chance is judged at that size, not at its own.
            size = max(abs(numeric), abs(analytic), 0.0 if g is None else float(np.linalg.norm(g)))
            rel = diff / size if size > 0 else 0.0
            worst = max(worst, rel)
            if not diff <= atol + rtol * size:  # also catches NaN
                raise GradientCheckError(
                    f"gradient of input {label!r} (shape {a.shape}) is wrong: along a random direction "
                    f"the backward gives {analytic:.10g}, central differences give {numeric:.10g} "
                    f"(relative error {rel:.3g} > rtol {rtol:g})"
                    + (" -- backward returned None for it" if g is None else "")
                )
    return worst
