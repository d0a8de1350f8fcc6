"""The ``bnorm`` command line: ``bnorm demo`` (also ``python -m bnorm demo``).

``bnorm demo`` trains a network with and without batch normalization on the
same data and prints when each reaches a target accuracy -- Figure 1 of Ioffe &
Szegedy (2015); see :mod:`bnorm.demo` and docs/demo.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

# The example shows an environment with every demo extra (see the repository's src/conftest.py).
__doctest_requires__ = {"missing_demo_packages": ("sklearn", "matplotlib", "tqdm")}

__all__ = ["DEMO_INSTALL_HINT", "main", "missing_demo_packages"]

#: What to run when the demo's optional packages are missing.
DEMO_INSTALL_HINT = 'pip install "bnorm[demo]"'

_N = TypeVar("_N", int, float)


def missing_demo_packages(need_sklearn: bool = True) -> list[str]:
    """Names (as pip spells them) of the demo's optional packages that cannot be imported.

    Examples
    --------
    >>> missing_demo_packages()
    []
    """
    wanted = [("matplotlib", "matplotlib"), ("tqdm", "tqdm")]
    if need_sklearn:
        wanted.insert(0, ("sklearn", "scikit-learn"))
    missing = []
    for module, package in wanted:
        try:
            __import__(module)  # the import statement's hook: a simulated absence counts too
        except ImportError:
            missing.append(package)
    return missing


def _parsed(convert: Callable[[str], _N], ok: Callable[[_N], bool], expected: str) -> Callable[[str], _N]:
    """An argparse ``type=``: `convert` the text, then accept it only if `ok`."""

    def parse(text: str) -> _N:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _parsed(int, lambda v: v > 0, "a positive integer")
_nonnegative_int = _parsed(int, lambda v: v >= 0, "a non-negative integer")
_positive_float = _parsed(float, lambda v: 0 < v < float("inf"), "a positive finite number")


def _parser() -> argparse.ArgumentParser:
    from .demo.experiment import DEFAULTS

    parser = argparse.ArgumentParser(prog="bnorm", description="bnorm: batch normalization in pure NumPy.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    mlp, cnn = DEFAULTS["mlp"], DEFAULTS["cnn"]
    demo = sub.add_parser(
        "demo",
        help="train with and without batch norm (Ioffe & Szegedy 2015, Figure 1)",
        description=(
            "Train the same network with and without batch normalization (bnorm's "
            "BatchNorm1d/BatchNorm2d) from the same initial weights on the same batches, "
            "and report test accuracy over training, the steps each needs to reach a target "
            "accuracy, and Figure 1 of Ioffe & Szegedy (2015) as a PNG. Data: scikit-learn's "
            "bundled 8x8 digits (nothing is downloaded) or --data mnist.npz."
        ),
    )
    demo.add_argument(
        "--model",
        choices=("mlp", "cnn"),
        default="mlp",
        help="mlp: 3x100 sigmoid MLP, as in the paper (default); cnn: conv-BN-ReLU-pool x2, linear",
    )
    demo.add_argument(
        "--quick",
        action="store_true",
        help=(
            f"fewer steps (mlp {mlp.quick_steps}, cnn {cnn.quick_steps}; "
            f"default mlp {mlp.steps}, cnn {cnn.steps})"
        ),
    )
    demo.add_argument("--steps", type=_positive_int, default=None, help="SGD steps (overrides --quick)")
    demo.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help=f"SGD learning rate for both variants (default mlp {mlp.lr:g}, cnn {cnn.lr:g})",
    )
    demo.add_argument(
        "--target",
        type=_positive_float,
        default=None,
        help=f"test accuracy for 'steps to reach' (default mlp {mlp.target:g}, cnn {cnn.target:g})",
    )
    demo.add_argument(
        "--batch-size", type=_positive_int, default=60, help="mini-batch size (default 60, as in the paper)"
    )
    demo.add_argument(
        "--seed",
        type=_nonnegative_int,
        default=0,
        help="seeds the split, the weights and the batch order; same seed, same numbers (default 0)",
    )
    demo.add_argument(
        "--data",
        metavar="PATH",
        default=None,
        help="a standard mnist.npz (x_train, y_train, x_test, y_test) instead of the 8x8 digits",
    )
    demo.add_argument(
        "--out", metavar="DIR", default=".", help="directory for the PNG (default: current directory)"
    )
    demo.add_argument(
        "--json",
        metavar="PATH",
        default=None,
        help='also write {"bn": {"steps", "test_accuracy", "percentiles"}, "plain": {...}} to PATH',
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _demo(args: argparse.Namespace) -> int:
    missing = missing_demo_packages(need_sklearn=args.data is None)
    if missing:
        print(
            f"bnorm demo needs {', '.join(missing)} (the demo extras); install them with:\n"
            f"    {DEMO_INSTALL_HINT}",
            file=sys.stderr,
        )
        return 1
    from tqdm import tqdm  # type: ignore[import-untyped, unused-ignore]

    from .demo.data import load_mnist_npz
    from .demo.experiment import DEFAULTS, run_experiment
    from .demo.report import (
        describe_run,
        figure_name,
        format_speedup,
        format_table,
        plot_figure,
        write_json,
    )

    try:
        data = None if args.data is None else load_mnist_npz(args.data)
    except (OSError, ValueError) as exc:
        print(f"bnorm demo: {exc}", file=sys.stderr)
        return 2
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        print(f"bnorm demo: --out must be a directory, got the file {args.out!r}", file=sys.stderr)
        return 2
    if args.json is not None and os.path.isdir(args.json):
        print(f"bnorm demo: --json must be a file path, got the directory {args.json!r}", file=sys.stderr)
        return 2
    cfg = DEFAULTS[args.model]
    steps = args.steps if args.steps is not None else (cfg.quick_steps if args.quick else cfg.steps)
    try:
        with tqdm(
            total=steps,
            desc=f"demo {args.model} (with and without BN)",
            unit="step",
            file=sys.stderr,
            disable=args.no_progress,
            leave=False,
        ) as bar:
            result = run_experiment(
                args.model,
                steps=steps,
                lr=args.lr,
                seed=args.seed,
                batch_size=args.batch_size,
                data=data,
                target=args.target,
                progress=bar.update,
            )
    except ValueError as exc:
        print(f"bnorm demo: {exc}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    png = plot_figure(result, os.path.join(args.out, figure_name(args.model)))
    print(describe_run(result))
    print(
        f"test accuracy ({len(result.histories['bn'].steps)} checkpoints; batch norm in evaluation mode):\n"
    )
    print(format_table(result))
    print()
    print(format_speedup(result))
    print(f"trained both variants in {result.seconds:.1f} s")
    print(f"figure: {png}")
    if args.json is not None:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        print(f"json: {write_json(result, args.json)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``bnorm`` command line with `argv` (default ``sys.argv[1:]``); returns the exit status.

    Examples
    --------
    >>> main(["demo", "--help"])  # doctest: +ELLIPSIS
    usage: bnorm demo ...
    0
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return int(exc.code or 0)
    if args.command == "demo":
        return _demo(args)
    parser.print_help(sys.stderr)
    return 2
