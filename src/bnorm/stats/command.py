"""The ``bnorm stats`` command: its options, and the run from arguments to exit status.

``add_arguments(parser)`` adds its options (bnorm.cli registers the command);
``run(args)`` checks every argument before any work starts, computes
(:func:`bnorm.stats.compute`), writes what was asked and prints the summary.

Under ``mpiexec`` (an MPI launcher's ``PMI_SIZE`` / ``OMPI_COMM_WORLD_SIZE``
in the environment, with more than one process) the files are sharded over
``MPI.COMM_WORLD``; only rank 0 prints and writes, and every rank exits with
rank 0's status.

Exit statuses (:data:`EXIT_OK` ...):

* 0 -- statistics computed (files that could not be read are listed and counted);
* 1 -- an optional package is missing: Pillow for images, matplotlib for
  ``--figure``, mpi4py under mpiexec (the message says what to install);
* 2 -- usage: a bad option, a path that does not exist, an array whose layout
  or scale must be given, an output that cannot be written;
* 3 -- the data cannot give statistics: nothing readable, mixed channel counts,
  different sizes with ``--per-pixel``, an unreadable file with ``--strict``;
* 130 -- interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from typing import Any

from ..cli import UsageError as CliUsageError
from ..cli import _nonnegative_int, _positive_float, _positive_int
from .arrays import LAYOUTS
from .dataset import compute
from .errors import DataError, UsageError
from .figure import FIGURE_HINT, write_figure, write_pixel_images
from .report import summary, to_json, write_json

__all__ = [
    "EXIT_OK",
    "EXIT_MISSING",
    "EXIT_USAGE",
    "EXIT_DATA",
    "EXIT_INTERRUPTED",
    "DESCRIPTION",
    "EPILOG",
    "add_arguments",
    "run",
]

EXIT_OK, EXIT_MISSING, EXIT_USAGE, EXIT_DATA, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

#: Environment variables by which MPI launchers give the number of processes.
_MPI_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


#: The paragraph of ``bnorm stats --help``.
DESCRIPTION = (
    "Per-channel mean, standard deviation, min and max of a dataset -- folders of images "
    "(recursive; PNG, JPEG, BMP, GIF, TIFF, WebP through Pillow), .npy files and .npz members -- "
    "in the [0, 1] and [0, 255] scales, with the lines to paste into bnorm, torchvision and Keras. "
    "Streamed (one image or chunk in memory) and exact: float64 moments merged in a fixed "
    "order, the same for any --workers and under mpiexec."
)

#: The text after the options in ``bnorm stats --help``.
EPILOG = (
    "exit status: 0 done (unreadable files are listed and skipped); 1 an optional package is "
    "missing; 2 usage; 3 the data cannot give statistics (nothing readable, mixed channel "
    "counts, sizes differ with --per-pixel, an unreadable file with --strict); 130 interrupted"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the options of ``bnorm stats`` to its sub-parser `p` (bnorm.cli registers the command)."""
    p.description = DESCRIPTION
    p.epilog = EPILOG
    p.add_argument("paths", nargs="+", metavar="PATH", help="folders, image files, .npy or .npz files")
    p.add_argument(
        "--channels",
        choices=("rgb", "bgr", "gray"),
        default=None,
        help="convert every image on read (default: as stored; gray: BT.601 luma, Pillow's convert('L'))",
    )
    p.add_argument(
        "--layout",
        choices=LAYOUTS,
        default=None,
        help="layout of the arrays (default: guessed from the shape)",
    )
    p.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="NAME",
        help=".npz member to read (repeatable; default: the one member with 3 or 4 dimensions)",
    )
    p.add_argument(
        "--resize", type=_positive_int, metavar="N", help="shorter side to N (torchvision Resize(N))"
    )
    p.add_argument(
        "--center-crop", type=_positive_int, metavar="N", help="central NxN (torchvision CenterCrop(N))"
    )
    p.add_argument(
        "--max-value",
        type=_positive_float,
        metavar="V",
        help="stored value that is 1.0 on the [0, 1] scale (default: 255 8-bit, 65535 16-bit, 1 float)",
    )
    p.add_argument(
        "--ddof",
        type=_nonnegative_int,
        default=0,
        metavar="N",
        help="delta degrees of freedom of the std (default 0)",
    )
    p.add_argument(
        "--max-files",
        type=_positive_int,
        metavar="N",
        help="read N files, evenly spaced through the sorted list",
    )
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="files decoded at a time (same result for any N)",
    )
    p.add_argument(
        "--per-pixel", action="store_true", help="also the mean and std images (.npy and .png in --out)"
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        default="bnorm-stats",
        help="folder for the --per-pixel files (default: bnorm-stats)",
    )
    p.add_argument(
        "--figure",
        metavar="PATH",
        help="PNG: mean image, std image, histograms before and after normalization",
    )
    p.add_argument("--json", metavar="PATH", help="write everything (schema bnorm-stats/1) to PATH")
    p.add_argument("--strict", action="store_true", help="stop at the first file that cannot be read")
    p.add_argument(
        "--chunk-size",
        type=_positive_int,
        metavar="N",
        help="images per chunk of an array (default: 32 MiB)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _mpi_comm() -> Any:
    """COMM_WORLD when launched by mpiexec with several processes, else None."""
    sizes = [os.environ.get(v, "") for v in _MPI_SIZE_VARS]
    if not any(s.strip().isdigit() and int(s) > 1 for s in sizes):
        return None
    from ..distributed import world

    return world()


def _check_outputs(args: argparse.Namespace) -> None:
    """Every output can be written (folders created); bnorm.cli.UsageError otherwise, before any work."""
    from ..cli import _writable_dir, _writable_file

    for flag, path in (("--json", args.json), ("--figure", args.figure)):
        if path is not None:
            _writable_file(path, flag)
    if args.per_pixel:
        _writable_dir(args.out, "--out")


def _progress(enabled: bool) -> Any:
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm  # type: ignore[import-untyped, unused-ignore]
    except ImportError:
        return None

    def wrap(parts: Iterator[Any], total: int) -> Iterator[Any]:
        yield from tqdm(parts, total=total, desc="bnorm stats", unit="file", file=sys.stderr, leave=False)

    return wrap


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The options that change the numbers (for the JSON; --workers and ranks do not)."""
    return {
        "channels": args.channels,
        "layout": args.layout,
        "keys": list(args.key),
        "resize": args.resize,
        "center_crop": args.center_crop,
        "max_value": args.max_value,
        "ddof": args.ddof,
        "max_files": args.max_files,
        "per_pixel": bool(args.per_pixel),
        "chunk_size": args.chunk_size,
    }


def run(args: argparse.Namespace) -> int:
    """Run ``bnorm stats`` with the parsed `args`; returns the exit status."""
    try:
        comm = _mpi_comm()
    except ImportError as exc:
        print(f"bnorm stats: launched by mpiexec, but {exc}", file=sys.stderr)
        return EXIT_MISSING
    rank = 0 if comm is None else int(comm.Get_rank())

    def fail(message: str, status: int) -> int:
        if rank == 0:
            print(f"bnorm stats: {message}", file=sys.stderr)
        return status

    try:
        _check_outputs(args)
    except CliUsageError as exc:
        return fail(str(exc), EXIT_USAGE)
    if args.figure is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return fail(f"--figure needs matplotlib: {FIGURE_HINT}", EXIT_MISSING)
    try:
        stats = compute(
            args.paths,
            channels=args.channels,
            layout=args.layout,
            keys=args.key,
            resize=args.resize,
            center_crop=args.center_crop,
            max_value=args.max_value,
            ddof=args.ddof,
            max_files=args.max_files,
            workers=args.workers,
            per_pixel=True if args.per_pixel else ("try" if args.figure else False),
            histograms=args.figure is not None,
            strict=args.strict,
            chunk_size=args.chunk_size,
            comm=comm,
            progress=_progress(rank == 0 and not args.no_progress),
        )
    except ImportError as exc:
        return fail(str(exc), EXIT_MISSING)
    except UsageError as exc:
        return fail(str(exc), EXIT_USAGE)
    except DataError as exc:
        return fail(str(exc), EXIT_DATA)
    except KeyboardInterrupt:
        return fail("interrupted", EXIT_INTERRUPTED)
    if rank != 0:
        return EXIT_OK
    outputs: dict[str, str] = {}
    try:
        if args.per_pixel and stats.pixel_mean is not None:
            outputs.update(write_pixel_images(stats, args.out))
        if args.figure is not None:
            outputs["figure"] = write_figure(stats, args.figure)
        text = summary(stats)
        if args.json is not None:
            outputs_json = {**outputs}
            write_json(to_json(stats, args.paths, _options(args), outputs_json), args.json)
            outputs["json"] = args.json
    except OSError as exc:
        return fail(f"cannot write the output: {exc}", EXIT_USAGE)
    print(text)
    if outputs:
        print()
        for name, path in outputs.items():
            print(f"{name}: {path}")
    return EXIT_OK
