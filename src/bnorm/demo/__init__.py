r"""``bnorm demo``: Figure 1 of Ioffe & Szegedy (2015) in pure NumPy, on bnorm's own layers.

The same network is trained twice, from the same initial weights and on the
same mini-batches: once plain, once with :class:`bnorm.BatchNorm1d` (MLP) or
:class:`bnorm.BatchNorm2d` (CNN) before each nonlinearity, whose
:meth:`~bnorm.BatchNorm1d.backward` kernels supply the gradients.  The result
holds, per variant, the test accuracy and the 15th/50th/85th percentiles of
one tracked pre-activation at every checkpoint.

Submodules
----------
:mod:`bnorm.demo.nn`
    Linear, Sigmoid, ReLU, Conv2d, MaxPool2d, AvgPool2d, Flatten, Sequential,
    SGD and softmax cross-entropy, each with an explicit backward.
:mod:`bnorm.demo.data`
    scikit-learn's bundled 8x8 digits or a local ``mnist.npz``, scaled to [-1, 1].
:mod:`bnorm.demo.experiment`
    The models and :func:`run_experiment`.
:mod:`bnorm.demo.report`
    The table, steps-to-target, JSON and the three-panel PNG.

The command line is :func:`bnorm.cli.main`.  The demo needs the optional
packages of ``pip install "bnorm[demo]"`` (``pip install -e ".[demo]"`` in a
clone of the repository): scikit-learn, matplotlib, tqdm; importing this
package does not.

Examples
--------
>>> from bnorm.demo import run_experiment
>>> result = run_experiment("mlp", steps=150, checkpoints=3)
>>> bn, plain = result.histories["bn"], result.histories["plain"]
>>> bn.test_accuracy[0] == plain.test_accuracy[0]      # same initial weights
True
>>> bn.test_accuracy[-1] > plain.test_accuracy[-1]     # batch norm learns faster
True
"""

from __future__ import annotations

from .data import Dataset, load_digits, load_mnist_npz
from .experiment import (
    DEFAULTS,
    ExperimentResult,
    History,
    Settings,
    build_cnn,
    build_mlp,
    run_experiment,
)

# The examples train on scikit-learn's bundled digits (see the repository's src/conftest.py).
__doctest_requires__ = {"*": ("sklearn",)}

__all__ = [
    "DEFAULTS",
    "Dataset",
    "ExperimentResult",
    "History",
    "Settings",
    "build_cnn",
    "build_mlp",
    "load_digits",
    "load_mnist_npz",
    "run_experiment",
]
