r"""Reporting the experiment: the checkpoint table, steps to a target, the JSON and the figure.

Files are written atomically (a temporary file in the same directory, then
:func:`os.replace`): an interrupted run never leaves a half-written file where
an earlier one was.
"""

from __future__ import annotations

import json
import os
from typing import IO, Any

from .._files import write_atomic
from .experiment import PERCENTILES, ExperimentResult, History

# The example runs an experiment on scikit-learn's digits (see the repository's src/conftest.py).
__doctest_requires__ = {"format_table": ("sklearn",)}

__all__ = [
    "MODEL_TITLES",
    "PROBE_NAMES",
    "describe_run",
    "figure_name",
    "json_name",
    "format_speedup",
    "format_table",
    "plot_figure",
    "write_json",
]

#: Model descriptions in the report.
MODEL_TITLES = {"mlp": "MLP 3x100 sigmoid", "cnn": "CNN conv3x3-pool-conv3x3-pool-linear, ReLU"}
#: What the percentile panels track.
PROBE_NAMES = {"mlp": "input of one last-hidden-layer sigmoid", "cnn": "input of the 2nd ReLU, channel 0"}


def describe_run(result: ExperimentResult) -> str:
    """One line naming the model, data and settings, e.g. for the table's caption."""
    return (
        f"{MODEL_TITLES[result.model]} on {result.dataset}: {result.steps} steps, batch "
        f"{result.batch_size}, SGD lr {result.lr:g} (both variants), seed {result.seed}"
    )


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def format_table(result: ExperimentResult) -> str:
    """Markdown table of test accuracy at the 1-2-5 checkpoints and the last, for both variants.

    Examples
    --------
    >>> from bnorm.demo.experiment import run_experiment
    >>> print(format_table(run_experiment("mlp", steps=20, checkpoints=2)))  # doctest: +ELLIPSIS
    | step | without BN | with BN |
    |-----:|-----------:|--------:|
    |    0 |      ...% |   ...% |
    |   10 |      ...% |   ...% |
    |   20 |      ...% |   ...% |
    """
    plain, bn = result.histories["plain"], result.histories["bn"]
    rows = ["| step | without BN | with BN |", "|-----:|-----------:|--------:|"]
    last = plain.steps[-1]
    for i, step in enumerate(plain.steps):
        if step in (0, last) or _is_125(step):
            rows.append(
                f"| {step:>4} | {_pct(plain.test_accuracy[i]):>10} | {_pct(bn.test_accuracy[i]):>7} |"
            )
    return "\n".join(rows)


def _is_125(step: int) -> bool:
    """True for 10, 20, 50, 100, 200, 500, ... (the table's rows)."""
    if step < 10:
        return False
    while step % 10 == 0 and step >= 100:
        step //= 10
    return step in (10, 20, 50)


def format_speedup(result: ExperimentResult) -> str:
    """Steps each variant needed to reach ``result.target`` test accuracy and their ratio.

    Examples
    --------
    >>> from bnorm.demo.experiment import ExperimentResult, History
    >>> h = {"bn": History([0, 50], [0.1, 0.96], [[0, 0, 0]] * 2),
    ...      "plain": History([0, 50, 800], [0.1, 0.5, 0.95], [[0, 0, 0]] * 3)}
    >>> print(format_speedup(ExperimentResult("mlp", "digits", 800, 2.0, 60, 0, 0.95, h)))
    steps to 95% test accuracy: without BN 800, with BN 50 -> 16.0x fewer with BN
    """
    target = f"steps to {result.target * 100:g}% test accuracy"
    plain = result.histories["plain"].steps_to(result.target)
    bn = result.histories["bn"].steps_to(result.target)
    p_txt = f"not reached in {result.steps}" if plain is None else str(plain)
    b_txt = f"not reached in {result.steps}" if bn is None else str(bn)
    if bn is None:
        ratio = "batch norm did not reach the target"
    elif plain is None:
        ratio = f"more than {result.steps / max(bn, 1):.1f}x fewer with BN"
    else:
        ratio = f"{plain / max(bn, 1):.1f}x fewer with BN"
    return f"{target}: without BN {p_txt}, with BN {b_txt} -> {ratio}"


def write_json(result: ExperimentResult, path: str | os.PathLike[str]) -> str:
    """Write :meth:`ExperimentResult.to_json` to `path`, atomically; returns the path.

    The configuration, bnorm's version, the steps to the target and, per
    variant, ``{"steps", "test_accuracy", "percentiles"}`` with one ``[p15,
    p50, p85]`` per checkpoint.
    """
    text = json.dumps(result.to_json(), indent=1) + "\n"

    def write(fh: IO[bytes]) -> None:
        fh.write(text.encode())

    return write_atomic(path, write)


def figure_name(model: str) -> str:
    """File name of the figure, ``bnorm-demo-<model>.png``."""
    return f"bnorm-demo-{model}.png"


def json_name(model: str) -> str:
    """File name of the JSON record, ``bnorm-demo-<model>.json``."""
    return f"bnorm-demo-{model}.json"


#: Resolution of the PNG: 150 dpi reads on a laptop screen (90 dpi, the old value,
#: blurred the axis labels once the docs page scaled the figure to its column).
FIGURE_DPI = 150


def plot_figure(result: ExperimentResult, path: str | os.PathLike[str]) -> str:
    """Draw Figure 1 (a, b, c) as a PNG at `path` (matplotlib, Agg canvas; pyplot is not used).

    (a) test accuracy against training steps for both variants, with the
    target accuracy as a labelled line; (b) without and (c) with batch norm,
    the 15th/50th/85th percentiles of the tracked pre-activation over the test
    set, each line labelled.  The step axis is logarithmic: the variants
    differ in the first few hundred steps.  :data:`FIGURE_DPI` dots per inch.
    Returns the path.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with matplotlib.rc_context({"font.size": 11}):
        fig = _draw(result, Figure(figsize=(13, 4.2), dpi=FIGURE_DPI, layout="constrained"))
        FigureCanvasAgg(fig)
        return write_atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=FIGURE_DPI))


def _draw(result: ExperimentResult, fig: Any) -> Any:
    """The three panels of :func:`plot_figure` on `fig`."""
    ax_a, ax_b, ax_c = fig.subplots(1, 3)
    styles = {"plain": ("without BN", "tab:gray", "--"), "bn": ("with BN", "tab:blue", "-")}

    def nonzero(h: History) -> tuple[list[int], list[int]]:
        idx = [i for i, s in enumerate(h.steps) if s > 0]
        return idx, [h.steps[i] for i in idx]

    for v in ("plain", "bn"):
        h = result.histories[v]
        idx, xs = nonzero(h)
        label, color, ls = styles[v]
        ax_a.plot(xs, [h.test_accuracy[i] for i in idx], ls, color=color, label=label)
    ax_a.axhline(
        result.target, color="tab:red", ls=":", lw=1.2, zorder=0, label=f"target {100 * result.target:g}%"
    )
    ax_a.set(
        xscale="log",
        xlabel="training steps",
        ylabel="test accuracy",
        title="(a) test accuracy",
        ylim=(0, 1.0),
    )
    ax_a.legend(loc="lower right")
    lo = min(p[0] for v in ("plain", "bn") for p in result.histories[v].percentiles)
    hi = max(p[2] for v in ("plain", "bn") for p in result.histories[v].percentiles)
    pad = 0.05 * (hi - lo or 1.0)
    for ax, v, letter in ((ax_b, "plain", "b"), (ax_c, "bn", "c")):
        h = result.histories[v]
        idx, xs = nonzero(h)
        label, color, _ = styles[v]
        for j, q in reversed(list(enumerate(PERCENTILES))):  # legend top to bottom: 85th first
            ax.plot(
                xs,
                [h.percentiles[i][j] for i in idx],
                color=color,
                ls=("--", "-", ":")[j],
                lw=1.8 if q == 50 else 1.2,
                label="median" if q == 50 else f"{q:g}th",
            )
        ax.legend(loc="upper left", fontsize=9, ncol=3)  # ncol: matplotlib < 3.6 too
        ax.set(
            xscale="log",
            xlabel="training steps",
            ylim=(lo - pad, hi + 5 * pad),  # headroom for the legend above the curves
            title=f"({letter}) {label}: 15/50/85th percentiles",
        )
    ax_b.set_ylabel(PROBE_NAMES[result.model])
    fig.suptitle(describe_run(result), fontsize=10)
    return fig
