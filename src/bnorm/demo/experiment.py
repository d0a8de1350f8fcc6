r"""The Figure 1 experiment: one network trained with and without batch norm, side by side.

Both variants start from the same weights (the layers they share) and see the
same mini-batches in the same order: each step draws one batch and takes one
SGD step in each network.  At every checkpoint both are evaluated on the test
set (batch norm with its running statistics, i.e. in evaluation mode) and the
15th/50th/85th percentiles of one tracked pre-activation over the test set
are recorded -- the input of the first sigmoid of the last hidden layer for the
MLP (Ioffe & Szegedy 2015, Fig. 1 b, c), the input of the second ReLU's first
channel (all positions) for the CNN.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import DTypeLike

from ..layers import BatchNorm1d, BatchNorm2d
from .data import Dataset, load_digits
from .nn import (
    SGD,
    Conv2d,
    Flatten,
    Layer,
    Linear,
    MaxPool2d,
    ReLU,
    Sequential,
    Sigmoid,
    softmax_cross_entropy,
)

# The examples train on scikit-learn's bundled digits (see the repository's src/conftest.py).
__doctest_requires__ = {"*": ("sklearn",)}

__all__ = [
    "DEFAULTS",
    "PERCENTILES",
    "VARIANTS",
    "ExperimentResult",
    "History",
    "ModelName",
    "Settings",
    "build_cnn",
    "build_mlp",
    "run_experiment",
]

ModelName = Literal["mlp", "cnn"]
#: The percentiles of the tracked pre-activation recorded at every checkpoint.
PERCENTILES = (15.0, 50.0, 85.0)
#: Variant keys, in the order of the JSON output.
VARIANTS = ("bn", "plain")


@dataclass(frozen=True)
class Settings:
    """Default training settings of one model.

    Attributes
    ----------
    steps, quick_steps : int
        Training steps of the default run and of ``--quick``.
    lr : float
        SGD learning rate, the same for both variants.
    target : float
        Test accuracy whose first crossing is reported for each variant.
    checkpoints : int
        Evaluations per decade of steps after step 10, spaced geometrically
        (dense early, where the two variants differ); the grid does not depend
        on the number of steps, so a longer run extends a shorter one.
    """

    steps: int
    quick_steps: int
    lr: float
    target: float
    checkpoints: int = 20


#: Per-model defaults.  The learning rate is the plain network's best: the one at
#: which the network *without* batch norm reached 95% test accuracy soonest in a
#: sweep at seed 0 (docs/demo.md), used for both variants as in the paper.
DEFAULTS: dict[str, Settings] = {
    "mlp": Settings(steps=5000, quick_steps=1500, lr=2.0, target=0.9),
    "cnn": Settings(steps=1000, quick_steps=300, lr=0.4, target=0.95),
}


def build_mlp(
    n_inputs: int,
    n_classes: int = 10,
    *,
    batch_norm: bool,
    seed: int = 0,
    hidden: tuple[int, ...] = (100, 100, 100),
    dtype: DTypeLike = np.float32,
) -> tuple[Sequential, int]:
    r"""The paper's MLP: Flatten, then per hidden layer Linear [-> BatchNorm1d] -> Sigmoid; Linear logits.

    With ``batch_norm`` the Linear layers before batch norm have no bias (the
    normalization removes it; :math:`\beta` takes its place).  The weights are
    drawn from ``default_rng(seed)`` in the same order in both variants, so the
    two networks start from identical shared weights.

    Parameters
    ----------
    n_inputs : int
        Features per example (64 for the 8x8 digits).
    n_classes : int, default 10
    batch_norm : bool
        Insert :class:`bnorm.BatchNorm1d` before every sigmoid.
    seed : int, default 0
    hidden : tuple of int, default (100, 100, 100)
    dtype : dtype, default float32

    Returns
    -------
    net : Sequential
        Takes (N, n_inputs) or (N, H, W) and returns (N, n_classes) logits.
    probe : int
        ``net.forward_to(x, probe)`` is the input of the last hidden layer's
        sigmoids, shape (N, hidden[-1]).

    Examples
    --------
    >>> plain, _ = build_mlp(64, batch_norm=False)
    >>> bn, probe = build_mlp(64, batch_norm=True)
    >>> [type(layer).__name__ for layer in bn][:4], probe
    (['Flatten', 'Linear', 'BatchNorm1d', 'Sigmoid'], 9)
    >>> bool(np.array_equal(plain.layers[1].weight, bn.layers[1].weight))
    True
    """
    rng = np.random.default_rng(seed)
    layers: list[Layer] = [Flatten()]
    width = n_inputs
    probe = 0
    for h in hidden:
        layers.append(Linear(width, h, bias=not batch_norm, rng=rng, dtype=dtype))
        if batch_norm:
            layers.append(BatchNorm1d(h, dtype=dtype))
        probe = len(layers)
        layers.append(Sigmoid())
        width = h
    layers.append(Linear(width, n_classes, rng=rng, dtype=dtype))
    return Sequential(layers), probe


def build_cnn(
    image_shape: tuple[int, int],
    n_classes: int = 10,
    *,
    batch_norm: bool,
    seed: int = 0,
    channels: tuple[int, int] = (8, 16),
    dtype: DTypeLike = np.float32,
) -> tuple[Sequential, int]:
    """The from-scratch tutorials' MNIST CNN sized for small images: two conv 3x3 blocks and a linear layer.

    conv 3x3 (pad 1) [-> BatchNorm2d] -> ReLU -> max-pool 2 -> conv 3x3 (pad 1)
    [-> BatchNorm2d] -> ReLU -> max-pool 2 -> flatten -> linear.  (The tutorials
    use a 5x5 second conv on 28x28 MNIST; on 8x8 digits the second conv sees
    4x4 maps, so it is 3x3 here.)  H and W must be divisible by 4.

    Parameters
    ----------
    image_shape : (int, int)
        (H, W) of the images, e.g. (8, 8) or (28, 28).
    n_classes : int, default 10
    batch_norm : bool
        Insert :class:`bnorm.BatchNorm2d` after each conv (which then has no bias).
    seed : int, default 0
        Seeds the weights, drawn in the same order in both variants.
    channels : (int, int), default (8, 16)
    dtype : dtype, default float32

    Returns
    -------
    net : Sequential
        Takes (N, 1, H, W) and returns (N, n_classes) logits.
    probe : int
        ``net.forward_to(x, probe)`` is the input of the second ReLU, (N, channels[1], H/2, W/2).

    Examples
    --------
    >>> net, probe = build_cnn((8, 8), batch_norm=True)
    >>> net(np.zeros((2, 1, 8, 8), np.float32)).shape, type(net.layers[probe - 1]).__name__
    ((2, 10), 'BatchNorm2d')
    """
    h, w = image_shape
    if h % 4 or w % 4:
        raise ValueError(f"build_cnn needs H and W divisible by 4 (two 2x2 poolings), got {image_shape}")
    rng = np.random.default_rng(seed)
    layers: list[Layer] = []
    c_in = 1
    probe = 0
    for c in channels:
        layers.append(
            Conv2d(c_in, c, 3, padding=1, bias=not batch_norm, rng=rng, dtype=dtype, input_grad=bool(layers))
        )
        if batch_norm:
            layers.append(BatchNorm2d(c, dtype=dtype))
        probe = len(layers)
        layers += [ReLU(), MaxPool2d(2)]
        c_in = c
    layers += [Flatten(), Linear(c_in * (h // 4) * (w // 4), n_classes, rng=rng, dtype=dtype)]
    return Sequential(layers), probe


@dataclass
class History:
    """What one variant recorded at its checkpoints.

    Attributes
    ----------
    steps : list of int
        Training steps completed at each checkpoint (0 is the initialization).
    test_accuracy : list of float
        Test accuracy in [0, 1] at each checkpoint.
    percentiles : list of [float, float, float]
        15th, 50th and 85th percentile of the tracked pre-activation over the test set.
    """

    steps: list[int] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    percentiles: list[list[float]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """``{"steps": [...], "test_accuracy": [...], "percentiles": [[p15, p50, p85], ...]}``."""
        return {
            "steps": list(self.steps),
            "test_accuracy": list(self.test_accuracy),
            "percentiles": [list(p) for p in self.percentiles],
        }

    def steps_to(self, target: float) -> int | None:
        """First checkpoint step whose test accuracy is at least `target`, or None."""
        for step, acc in zip(self.steps, self.test_accuracy, strict=True):
            if acc >= target:
                return step
        return None


@dataclass
class ExperimentResult:
    """Both variants' histories and the settings that produced them.

    Attributes
    ----------
    model : {'mlp', 'cnn'}
    dataset : str
    steps, batch_size, seed : int
    lr, target : float
    histories : dict
        ``{"bn": History, "plain": History}``.
    seconds : float
        Wall-clock training time (not part of :meth:`to_json`: the JSON is
        deterministic for a seed).
    checkpoints : int
        Evaluations per decade of steps (see :class:`Settings`).
    """

    model: str
    dataset: str
    steps: int
    lr: float
    batch_size: int
    seed: int
    target: float
    histories: dict[str, History]
    seconds: float = 0.0
    checkpoints: int = 20

    def steps_to_target(self) -> dict[str, int | None]:
        """``{"bn": step, "plain": step}``: each variant's first checkpoint at or above the target."""
        return {v: self.histories[v].steps_to(self.target) for v in VARIANTS}

    def to_json(self) -> dict[str, Any]:
        """Everything needed to reproduce and read the run, as JSON values.

        ``{"bnorm_version", "config": {"model", "data", "steps", "lr", "batch_size",
        "seed", "target", "checkpoints", "optimizer"}, "steps_to_target": {"bn",
        "plain"}, "bn": {...}, "plain": {...}}`` with the curves as in
        :meth:`History.to_json`; a step to target that was not reached is null.
        """
        from .._version import __version__

        config = {
            "model": self.model,
            "data": self.dataset,
            "steps": self.steps,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "target": self.target,
            "checkpoints": self.checkpoints,
            "optimizer": "SGD (no momentum, no weight decay), softmax cross-entropy",
        }
        doc: dict[str, Any] = {
            "bnorm_version": __version__,
            "config": config,
            "steps_to_target": self.steps_to_target(),
        }
        doc.update((v, self.histories[v].to_json()) for v in VARIANTS)
        return doc


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Indices of consecutive mini-batches from a fresh permutation of range(n) each epoch."""
    order = rng.permutation(n)
    pos = 0
    while True:
        if pos + batch_size > n:
            order = np.concatenate([order[pos:], rng.permutation(n)])
            pos = 0
        yield order[pos : pos + batch_size]
        pos += batch_size


def _evaluate(
    net: Sequential, probe: int, x: np.ndarray, y: np.ndarray, chunk: int = 1000
) -> tuple[float, list[float]]:
    """Test accuracy and the PERCENTILES of channel/unit 0 of the probe, in evaluation mode."""
    net.eval()
    correct = 0
    tracked: list[np.ndarray] = []
    for start in range(0, len(y), chunk):
        h = net.forward_to(x[start : start + chunk], probe)
        tracked.append(h[:, 0].reshape(-1))
        logits = Sequential(net.layers[probe:]).forward(h)
        correct += int((logits.argmax(axis=1) == y[start : start + chunk]).sum())
    net.train()
    values = np.concatenate(tracked).astype(np.float64)
    return correct / len(y), [float(v) for v in np.percentile(values, PERCENTILES)]


def _one_blas_thread() -> contextlib.AbstractContextManager[Any]:
    """Limit BLAS to one thread while training, if threadpoolctl (a scikit-learn dependency) is there.

    The matrices here are tiny (60 x 100): extra BLAS threads only add
    synchronization, several times slower on a busy machine.
    """
    try:
        from threadpoolctl import threadpool_limits  # type: ignore[import-untyped, unused-ignore]
    except ImportError:
        return contextlib.nullcontext()
    limiter: contextlib.AbstractContextManager[Any] = threadpool_limits(limits=1, user_api="blas")
    return limiter


def _checkpoint_steps(steps: int, per_decade: int) -> list[int]:
    """The checkpoints of a run of `steps` steps.

    0, `steps`, the 1-2-5 steps (10, 20, 50, 100, ...) below it, and the steps
    ``10 * 10**(i / per_decade)`` below it (rounded; those within 1% of a 1-2-5 step merged).
    """
    decades = np.log10(max(steps, 10) / 10)
    grid = {round(float(10 * 10 ** (i / per_decade))) for i in range(int(np.floor(decades * per_decade)) + 1)}
    nice = {m * 10**e for e in range(1, len(str(steps)) + 1) for m in (1, 2, 5)}
    grid = {g for g in grid if all(abs(g - n) > 0.01 * n for n in nice)}  # 501 next to 500: keep 500
    return sorted({0, steps} | {s for s in grid | nice if s < steps})


def run_experiment(
    model: ModelName = "mlp",
    *,
    steps: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    batch_size: int = 60,
    data: Dataset | None = None,
    quick: bool = False,
    checkpoints: int | None = None,
    target: float | None = None,
    progress: Callable[[int], Any] | None = None,
) -> ExperimentResult:
    """Train the model with and without batch norm on the same batches; record both.

    Parameters
    ----------
    model : {'mlp', 'cnn'}, default 'mlp'
        The paper's 3x100 sigmoid MLP (:func:`build_mlp`) or the from-scratch
        tutorials' small CNN (:func:`build_cnn`).
    steps : int or None
        SGD steps; None takes ``DEFAULTS[model].steps`` (``quick_steps`` with `quick`).
    lr : float or None
        Learning rate for both variants; None takes ``DEFAULTS[model].lr``.
    seed : int, default 0
        Seeds the digits split, the weights and the batch order.  The same
        seed gives the same result, number for number.
    batch_size : int, default 60
        As in the paper.
    data : Dataset or None
        None loads :func:`~bnorm.demo.data.load_digits` split by `seed`.
    quick : bool, default False
        Use the quick step count.
    checkpoints : int or None
        Evaluations per decade of steps (see :class:`Settings`); None takes
        ``DEFAULTS[model].checkpoints``.  Steps 0, 10, 20, 50, 100, ... and the
        last step are always evaluated.
    target : float or None
        Accuracy for "steps to reach"; None takes ``DEFAULTS[model].target``.
    progress : callable or None
        Called with the number of steps just completed (e.g. ``tqdm.update``).

    Returns
    -------
    ExperimentResult

    Raises
    ------
    ValueError
        If `model` is unknown or `steps`, `batch_size`, `checkpoints`, `lr`
        or `target` is out of range.

    Examples
    --------
    >>> r = run_experiment("mlp", steps=20, checkpoints=2)
    >>> r.histories["bn"].steps, list(r.to_json())
    ([0, 10, 20], ['bnorm_version', 'config', 'steps_to_target', 'bn', 'plain'])
    """
    if model not in DEFAULTS:
        raise ValueError(f"model must be one of {', '.join(map(repr, DEFAULTS))}, got {model!r}")
    cfg = DEFAULTS[model]
    steps = (cfg.quick_steps if quick else cfg.steps) if steps is None else steps
    lr = cfg.lr if lr is None else lr
    target = cfg.target if target is None else target
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not np.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target must be an accuracy in (0, 1], got {target!r}")
    n_ckpt = cfg.checkpoints if checkpoints is None else checkpoints
    if isinstance(n_ckpt, bool) or not isinstance(n_ckpt, (int, np.integer)) or n_ckpt <= 0:
        raise ValueError(f"checkpoints must be a positive int, got {n_ckpt!r}")

    ds = load_digits(seed) if data is None else data
    if batch_size > len(ds.y_train):
        raise ValueError(
            f"batch_size must be at most the {len(ds.y_train)} training images, got {batch_size}"
        )
    if model == "mlp":

        def reshape(x: np.ndarray) -> np.ndarray:
            return x.reshape(len(x), -1)

        n_in = int(np.prod(ds.image_shape))
        nets = {v: build_mlp(n_in, ds.num_classes, batch_norm=(v == "bn"), seed=seed) for v in VARIANTS}
    else:

        def reshape(x: np.ndarray) -> np.ndarray:
            return x[:, None]

        nets = {
            v: build_cnn(ds.image_shape, ds.num_classes, batch_norm=(v == "bn"), seed=seed) for v in VARIANTS
        }
    x_train, x_test = reshape(ds.x_train), reshape(ds.x_test)
    optimizers = {v: SGD(nets[v][0], lr) for v in VARIANTS}
    histories = {v: History() for v in VARIANTS}
    marks = _checkpoint_steps(int(steps), int(n_ckpt))

    def record(step: int) -> None:
        for v in VARIANTS:
            acc, pct = _evaluate(nets[v][0], nets[v][1], x_test, ds.y_test)
            h = histories[v]
            h.steps.append(step)
            h.test_accuracy.append(acc)
            h.percentiles.append(pct)

    start = time.perf_counter()
    batches = _batches(len(ds.y_train), int(batch_size), np.random.default_rng([seed, 1]))
    with _one_blas_thread():
        record(0)
        done = 0
        for mark in marks[1:]:
            for _ in range(mark - done):
                idx = next(batches)
                xb, yb = x_train[idx], ds.y_train[idx]
                for v in VARIANTS:
                    net = nets[v][0]
                    _, dlogits = softmax_cross_entropy(net.forward(xb), yb)
                    net.backward(dlogits)
                    optimizers[v].step()
            if progress is not None:
                progress(mark - done)
            done = mark
            record(mark)
    return ExperimentResult(
        model=model,
        dataset=ds.name,
        steps=int(steps),
        lr=float(lr),
        batch_size=int(batch_size),
        seed=int(seed),
        target=float(target),
        histories=histories,
        seconds=time.perf_counter() - start,
        checkpoints=int(n_ckpt),
    )
