"""The ``bnorm`` command line: ``bnorm demo``, ``bnorm stats``, ``bnorm --version`` (``python -m bnorm``).

``bnorm demo`` trains a network with and without batch normalization on the
same data and prints when each reaches a target accuracy -- Figure 1 of Ioffe &
Szegedy (2015); see :mod:`bnorm.demo` and docs/demo.md.  ``bnorm stats PATH``
prints the exact per-channel statistics of a dataset on disk; see
:mod:`bnorm.stats.command` and docs/stats-cli.md.

Every argument is checked before any work starts, and every failure is one
line on stderr, ``bnorm <command>: <what went wrong and how to fix it>``, with
an exit status a script can test:

====  ==========================================================================
0     success
1     the run failed: missing optional packages, or an output could not be
      written after the work was done
2     usage error: a bad flag or value, an unreadable ``--data``, an ``--out`` or
      ``--json`` that cannot be written (all detected before any work)
3     ``bnorm stats`` only: the data cannot give statistics (nothing readable,
      mixed channel counts, ...; see :mod:`bnorm.stats.command`)
130   interrupted (Ctrl-C); nothing half-written is left behind
====  ==========================================================================

Commands are registered in one place, :data:`COMMANDS`: each is a
:class:`Command` with a function that adds its arguments and one that runs it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ._version import __version__

__all__ = [
    "COMMANDS",
    "Command",
    "DEMO_INSTALL_HINT",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_USAGE",
    "UsageError",
    "main",
    "missing_demo_packages",
]

#: Exit statuses (see the module docstring).
EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130

#: What to run when the demo's optional packages are missing: the first line for
#: an installed bnorm, the second in the root of a clone of the repository.
DEMO_INSTALL_HINT = (
    'pip install "bnorm[demo]"        # bnorm installed from a package index\n'
    'pip install -e ".[demo]"         # in the root of a clone of the repository'
)

_N = TypeVar("_N", int, float)


class UsageError(Exception):
    """A command-line value that cannot work; :func:`main` prints it and exits with status 2."""


class _RunError(Exception):
    """A failure while running; :func:`main` prints it and exits with status 1."""


@dataclass(frozen=True)
class Command:
    """One ``bnorm`` subcommand.

    Attributes
    ----------
    name : str
        What the user types after ``bnorm``.
    help : str
        One line for ``bnorm --help``.
    add_arguments : callable
        ``add_arguments(parser)`` adds the command's flags to its subparser.
    run : callable
        ``run(args) -> int``, the exit status; raises :class:`UsageError` for
        a bad value found before the work starts.
    description : str
        The paragraph of ``bnorm <name> --help``.
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str = ""


def missing_demo_packages(need_sklearn: bool = True) -> list[str]:
    """Names (as pip spells them) of the demo's optional packages that cannot be imported.

    Examples
    --------
    >>> isinstance(missing_demo_packages(), list)
    True
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
_accuracy = _parsed(float, lambda v: 0 < v <= 1, "an accuracy in (0, 1], such as 0.9")


# -- output paths: checked before the work, written atomically after it ------------------------
def _writable_dir(path: str, flag: str) -> str:
    """Create `path` if needed and prove a file can be created in it; UsageError otherwise."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} must be a directory, got the file {path!r}")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".bnorm-write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UsageError(f"{flag}: cannot write to {path!r}: {err.strerror or err}") from None
    return path


def _writable_file(path: str, flag: str) -> str:
    """`path` names a file that can be written (its directory created if needed); UsageError otherwise."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} must be a file path, got the directory {path!r}")
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise UsageError(f"{flag}: cannot write {path!r}: {parent!r} is a file, not a directory")
    try:
        _writable_dir(parent, flag)
    except UsageError:
        raise UsageError(f"{flag}: cannot write {path!r}: its directory {parent!r} is not writable") from None
    return path


def _demo_arguments(demo: argparse.ArgumentParser) -> None:
    from .demo.experiment import DEFAULTS

    mlp, cnn = DEFAULTS["mlp"], DEFAULTS["cnn"]
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
        type=_accuracy,
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
        "--out",
        metavar="DIR",
        default="bnorm-demo",
        help="directory for the figure and the JSON, created if missing (default: bnorm-demo)",
    )
    demo.add_argument(
        "--json",
        metavar="PATH",
        default=None,
        help="write the JSON (configuration, version, steps to target, curves) here instead of "
        "DIR/bnorm-demo-<model>.json",
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")


def _demo(args: argparse.Namespace) -> int:
    missing = missing_demo_packages(need_sklearn=args.data is None)
    if missing:
        hint = DEMO_INSTALL_HINT.replace("\n", "\n    ")
        raise _RunError(
            f"needs {', '.join(missing)} (the demo extras); install them with one of:\n    {hint}"
        )
    from tqdm import tqdm  # type: ignore[import-untyped, unused-ignore]

    from .demo.data import load_digits, load_mnist_npz
    from .demo.experiment import DEFAULTS, run_experiment
    from .demo.report import (
        describe_run,
        figure_name,
        format_speedup,
        format_table,
        json_name,
        plot_figure,
        write_json,
    )

    # Everything is checked here, before the progress bar and the first step.
    try:
        data = load_digits(args.seed) if args.data is None else load_mnist_npz(args.data)
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    if args.batch_size > len(data.y_train):
        raise UsageError(
            f"--batch-size must be at most the {len(data.y_train)} training images, got {args.batch_size}"
        )
    if args.model == "cnn" and any(d % 4 for d in data.image_shape):
        raise UsageError(
            f"--model cnn needs images whose height and width are divisible by 4 (two 2x2 poolings), "
            f"got {data.image_shape[0]}x{data.image_shape[1]} from {args.data}; use --model mlp"
        )
    out = _writable_dir(args.out, "--out")
    json_path = _writable_file(
        os.path.join(out, json_name(args.model)) if args.json is None else args.json, "--json"
    )

    cfg = DEFAULTS[args.model]
    steps = args.steps if args.steps is not None else (cfg.quick_steps if args.quick else cfg.steps)
    with tqdm(
        total=steps,
        desc=f"demo {args.model} (with and without BN)",
        unit="step",
        file=sys.stderr,
        disable=args.no_progress,
        leave=False,
    ) as bar:
        try:
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
        except ValueError as exc:  # every value was checked above; this is a safety net
            raise UsageError(str(exc)) from None
    try:
        png = plot_figure(result, os.path.join(out, figure_name(args.model)))
        written_json = write_json(result, json_path)
    except OSError as err:
        raise _RunError(f"cannot write {err.filename or 'the results'!r}: {err.strerror or err}") from None
    print(describe_run(result))
    print(
        f"test accuracy ({len(result.histories['bn'].steps)} checkpoints; batch norm in evaluation mode):\n"
    )
    print(format_table(result))
    print()
    print(format_speedup(result))
    print(f"trained both variants in {result.seconds:.1f} s")
    print(f"figure: {png}")
    print(f"json: {written_json}")
    return 0


def _stats_arguments(parser: argparse.ArgumentParser) -> None:
    from .stats.command import add_arguments  # imported when used: bnorm.stats imports this module

    add_arguments(parser)


def _stats(args: argparse.Namespace) -> int:
    from .stats.command import run

    return run(args)


#: The subcommands, in the order ``bnorm --help`` lists them.  Add a command here.
COMMANDS: tuple[Command, ...] = (
    Command(
        "demo",
        "train with and without batch norm (Ioffe & Szegedy 2015, Figure 1)",
        _demo_arguments,
        _demo,
        description=(
            "Train the same network with and without batch normalization (bnorm's "
            "BatchNorm1d/BatchNorm2d) from the same initial weights on the same batches, "
            "and report test accuracy over training, the steps each needs to reach a target "
            "accuracy, and Figure 1 of Ioffe & Szegedy (2015) as a PNG, with a JSON record of "
            "the run. Data: scikit-learn's bundled 8x8 digits (nothing is downloaded) or "
            "--data mnist.npz. Exit status: 0 success, 1 failure, 2 usage error, 130 interrupted."
        ),
    ),
    Command(
        "stats",
        "exact per-channel mean and std of a folder of images or arrays",
        _stats_arguments,
        _stats,
    ),
)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: ``bnorm demo: error: ... (see bnorm demo --help)``."""

    def error(self, message: str) -> Any:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bnorm", description="bnorm: batch normalization in pure NumPy.")
    parser.add_argument("--version", action="version", version=f"bnorm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_arguments(
            sub.add_parser(command.name, help=command.help, description=command.description or command.help)
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``bnorm`` command line with `argv` (default ``sys.argv[1:]``); returns the exit status.

    Examples
    --------
    >>> main(["--version"])  # doctest: +ELLIPSIS
    bnorm ...
    0
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or a usage error (2)
        return int(exc.code or 0)
    commands: dict[str, Command] = {c.name: c for c in COMMANDS}
    if args.command not in commands:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    prefix = f"bnorm {args.command}"
    status: Any
    try:
        status = commands[args.command].run(args)
    except UsageError as err:
        print(f"{prefix}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except _RunError as err:
        print(f"{prefix}: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted (Ctrl-C)", file=sys.stderr)
        return EXIT_INTERRUPTED
    return int(status)
