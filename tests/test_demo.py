"""bnorm demo: the NumPy network library, the Figure 1 experiment, its report and the CLI."""

from __future__ import annotations

import builtins
import importlib.util
import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import bnorm
from bnorm._files import write_atomic
from bnorm.cli import main
from bnorm.demo.data import load_digits, load_mnist_npz
from bnorm.demo.experiment import (
    DEFAULTS,
    _batches,
    _checkpoint_steps,
    build_cnn,
    build_mlp,
    run_experiment,
)
from bnorm.demo.nn import (
    SGD,
    AvgPool2d,
    Conv2d,
    Flatten,
    Linear,
    MaxPool2d,
    ReLU,
    Sequential,
    Sigmoid,
    softmax_cross_entropy,
)
from bnorm.demo.report import format_speedup, format_table, write_json


def _installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


# The network library needs NumPy only; the experiment on the digits needs scikit-learn,
# the command line all three extras (pip install "bnorm[demo]").
needs_digits = pytest.mark.skipif(
    not _installed("sklearn"), reason='needs scikit-learn: pip install "bnorm[demo]"'
)
needs_extras = pytest.mark.skipif(
    not _installed("sklearn", "matplotlib", "tqdm"), reason='needs pip install "bnorm[demo]"'
)

SRC = str(Path(__file__).resolve().parents[1] / "src")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# -- finite-difference gradient checks (float64, random upstream gradient) ------------------


def _numeric_grad(f: Callable[[], float], a: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar f() with respect to every entry of `a` (changed in place)."""
    g = np.zeros_like(a)
    it = np.nditer(a, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = a[i]
        a[i] = old + eps
        up = f()
        a[i] = old - eps
        down = f()
        a[i] = old
        g[i] = (up - down) / (2 * eps)
    return g


def _check_layer(layer: Any, x: np.ndarray, rng: np.random.Generator, params: tuple[str, ...] = ()) -> None:
    """dx and the parameter gradients of `layer` against central differences of sum(dy * layer(x))."""
    y = layer.forward(x)
    dy = rng.normal(size=y.shape)

    def loss() -> float:
        return float(np.sum(dy * layer.forward(x)))

    layer.forward(x)
    dx = layer.backward(dy)
    grads = {name: getattr(layer, f"grad_{name}").copy() for name in params}
    np.testing.assert_allclose(dx, _numeric_grad(loss, x), rtol=1e-6, atol=1e-8)
    for name in params:
        np.testing.assert_allclose(
            grads[name], _numeric_grad(loss, getattr(layer, name)), rtol=1e-6, atol=1e-8
        )


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def test_linear_gradients(rng: np.random.Generator) -> None:
    lin = Linear(5, 4, rng=rng, dtype=np.float64)
    lin.bias[:] = rng.normal(size=4)
    _check_layer(lin, rng.normal(size=(3, 5)), rng, ("weight", "bias"))


def test_linear_without_bias(rng: np.random.Generator) -> None:
    lin = Linear(5, 4, bias=False, rng=rng, dtype=np.float64)
    assert lin.bias is None
    _check_layer(lin, rng.normal(size=(3, 5)), rng, ("weight",))
    assert lin.grad_bias is None


@pytest.mark.parametrize(("k", "padding"), [(3, 0), (3, 1), (3, 2), (2, 1), (1, 0)])
def test_conv2d_gradients(rng: np.random.Generator, k: int, padding: int) -> None:
    conv = Conv2d(2, 3, k, padding=padding, rng=rng, dtype=np.float64)
    conv.bias[:] = rng.normal(size=3)
    _check_layer(conv, rng.normal(size=(2, 2, 5, 4)), rng, ("weight", "bias"))


def test_conv2d_matches_direct_sum(rng: np.random.Generator) -> None:
    conv = Conv2d(2, 3, 3, padding=1, rng=rng, dtype=np.float64)
    conv.bias[:] = rng.normal(size=3)
    x = rng.normal(size=(2, 2, 4, 5))
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    expected = np.zeros((2, 3, 4, 5))
    for i in range(4):
        for j in range(5):
            expected[:, :, i, j] = (
                np.einsum("ncuv,ocuv->no", xp[:, :, i : i + 3, j : j + 3], conv.weight) + conv.bias
            )
    np.testing.assert_allclose(conv(x), expected, rtol=1e-12, atol=1e-12)


def test_conv2d_without_input_grad_skips_dx(rng: np.random.Generator) -> None:
    conv = Conv2d(1, 2, 3, padding=1, rng=rng, dtype=np.float64, input_grad=False)
    x = rng.normal(size=(2, 1, 4, 4))
    full = Conv2d(1, 2, 3, padding=1, rng=rng, dtype=np.float64)
    full.weight[...] = conv.weight
    dy = rng.normal(size=(2, 2, 4, 4))
    conv(x)
    full(x)
    dx = conv.backward(dy)
    full.backward(dy)
    assert dx.shape == x.shape and not dx.any()
    np.testing.assert_array_equal(conv.grad_weight, full.grad_weight)


@pytest.mark.parametrize("pool", [MaxPool2d, AvgPool2d])
def test_pool_gradients(rng: np.random.Generator, pool: type) -> None:
    _check_layer(pool(2), rng.normal(size=(2, 3, 4, 6)), rng)


def test_maxpool_routes_ties_to_one_position() -> None:
    pool = MaxPool2d(2)
    pool(np.zeros((1, 1, 2, 2)))
    dx = pool.backward(np.array([[[[3.0]]]]))
    assert dx.sum() == 3.0 and np.count_nonzero(dx) == 1


def test_sigmoid_relu_flatten_gradients(rng: np.random.Generator) -> None:
    _check_layer(Sigmoid(), rng.normal(size=(3, 4)) * 3, rng)
    x = rng.normal(size=(3, 4))
    x[np.abs(x) < 1e-3] = 0.5  # keep away from the kink
    _check_layer(ReLU(), x, rng)
    _check_layer(Flatten(), rng.normal(size=(2, 3, 2, 2)), rng)


def test_softmax_cross_entropy_gradient(rng: np.random.Generator) -> None:
    z = rng.normal(size=(5, 4)) * 3
    t = rng.integers(0, 4, 5)
    loss, d = softmax_cross_entropy(z, t)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    assert loss == pytest.approx(-np.log(p[np.arange(5), t]).mean(), rel=1e-12)
    np.testing.assert_allclose(
        d, _numeric_grad(lambda: softmax_cross_entropy(z, t)[0], z), rtol=1e-6, atol=1e-9
    )
    big, _ = softmax_cross_entropy(np.array([[1000.0, -1000.0]]), np.array([1]))
    assert big == pytest.approx(2000.0)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_network_with_bnorm_layers_gradients(rng: np.random.Generator, model: str) -> None:
    """The whole BN network (bnorm's BatchNorm1d/2d with non-trivial gamma) against finite differences."""
    if model == "mlp":
        net, _ = build_mlp(6, 3, batch_norm=True, hidden=(5, 4), dtype=np.float64)
        x = rng.normal(size=(7, 6))
    else:
        net, _ = build_cnn((4, 4), 3, batch_norm=True, channels=(2, 3), dtype=np.float64)
        x = rng.normal(size=(3, 1, 4, 4))
    bns = [layer for layer in net if isinstance(layer, bnorm.layers.batchnorm._BatchNormBase)]
    assert len(bns) == 2
    for bn in bns:
        bn.weight[:] = rng.uniform(0.5, 2.0, bn.num_features)
        bn.bias[:] = rng.normal(size=bn.num_features)
    t = rng.integers(0, 3, len(x))

    def loss() -> float:
        return softmax_cross_entropy(net.forward(x), t)[0]

    _, d = softmax_cross_entropy(net.forward(x), t)
    net.backward(d)
    first = net.layers[1] if model == "mlp" else net.layers[0]
    analytic = {
        id(a): g.copy()
        for layer in (first, bns[0])
        for a, g in ((layer.weight, layer.grad_weight), (layer.bias, layer.grad_bias))
        if a is not None
    }
    for layer in (first, bns[0]):
        for a in (layer.weight, layer.bias):
            if a is not None:
                np.testing.assert_allclose(analytic[id(a)], _numeric_grad(loss, a), rtol=1e-5, atol=1e-8)


def test_sgd_updates_every_parameter(rng: np.random.Generator) -> None:
    net, _ = build_mlp(4, 3, batch_norm=True, hidden=(5,), dtype=np.float64)
    before = [
        np.copy(p)
        for layer in net
        for p in (getattr(layer, "weight", None), getattr(layer, "bias", None))
        if p is not None
    ]
    x, t = rng.normal(size=(6, 4)), rng.integers(0, 3, 6)
    _, d = softmax_cross_entropy(net(x), t)
    net.backward(d)
    SGD(net, lr=0.5).step()
    after = [
        p
        for layer in net
        for p in (getattr(layer, "weight", None), getattr(layer, "bias", None))
        if p is not None
    ]
    grads = [
        g
        for layer in net
        for g in (getattr(layer, "grad_weight", None), getattr(layer, "grad_bias", None))
        if g is not None
    ]
    for b, a, g in zip(before, after, grads, strict=True):
        np.testing.assert_allclose(a, b - 0.5 * g)


# -- errors -------------------------------------------------------------------------------------


def test_layer_errors(rng: np.random.Generator) -> None:
    with pytest.raises(ValueError, match=r"Linear expects 3 input features, got shape \(2, 4\)"):
        Linear(3, 2, rng=rng)(np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"Linear expects a 2-D input \(N, in_features\), got shape \(2,\)"):
        Linear(3, 2, rng=rng)(np.zeros(2))
    with pytest.raises(ValueError, match=r"out_features must be a positive int, got 0"):
        Linear(3, 0)
    with pytest.raises(ValueError, match=r"padding must be an int in \[0, kernel_size\) = \[0, 3\), got 3"):
        Conv2d(1, 1, 3, padding=3)
    with pytest.raises(ValueError, match=r"Conv2d expects 2 input channels, got shape \(1, 1, 4, 4\)"):
        Conv2d(2, 1, 3)(np.zeros((1, 1, 4, 4)))
    with pytest.raises(
        ValueError, match=r"Conv2d input of shape \(1, 1, 2, 2\) is smaller than the 3x3 kernel"
    ):
        Conv2d(1, 1, 3)(np.zeros((1, 1, 2, 2)))
    with pytest.raises(
        ValueError, match=r"MaxPool2d\(2\) needs H and W divisible by 2, got shape \(1, 1, 3, 4\)"
    ):
        MaxPool2d(2)(np.zeros((1, 1, 3, 4)))
    with pytest.raises(RuntimeError, match=r"Conv2d.backward called before forward"):
        Conv2d(1, 1, 3).backward(np.zeros((1, 1, 2, 2)))
    with pytest.raises(ValueError, match=r"lr must be a positive finite number, got -1"):
        SGD(Sequential([]), -1)
    with pytest.raises(
        ValueError, match=r"expected logits \(N, K\) and labels \(N,\), got \(2, 3\) and \(3,\)"
    ):
        softmax_cross_entropy(np.zeros((2, 3)), np.zeros(3, int))
    with pytest.raises(RuntimeError, match=r"Linear.grad_weight is not set: run backward first"):
        SGD(Sequential([Linear(2, 2)]), 0.1).step()
    with pytest.raises(ValueError, match=r"build_cnn needs H and W divisible by 4"):
        build_cnn((6, 6), batch_norm=True)


@needs_digits
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": "rnn"}, r"model must be one of 'mlp', 'cnn', got 'rnn'"),
        ({"steps": 0}, r"steps must be a positive int, got 0"),
        ({"batch_size": 2.5}, r"batch_size must be a positive int, got 2.5"),
        ({"lr": float("nan")}, r"lr must be a positive finite number, got nan"),
        ({"target": 1.5}, r"target must be an accuracy in \(0, 1\], got 1.5"),
        ({"checkpoints": 0}, r"checkpoints must be a positive int, got 0"),
        ({"batch_size": 5000}, r"batch_size must be at most the 1438 training images, got 5000"),
    ],
)
def test_run_experiment_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        run_experiment(**kwargs)


@needs_digits
# -- data ---------------------------------------------------------------------------------------

def test_digits_split_is_fixed_by_seed() -> None:
    a, b, c = load_digits(0), load_digits(0), load_digits(1)
    assert a.x_train.shape == (1438, 8, 8) and a.x_test.shape == (359, 8, 8)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.y_test, c.y_test)
    assert a.x_train.min() == -1.0 and a.x_train.max() == 1.0 and a.x_train.dtype == np.float32


def _fake_mnist(
    path: Path, rng: np.random.Generator, n_train: int = 120, n_test: int = 60, size: int = 28
) -> Path:
    np.savez(
        path,
        x_train=rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        y_train=rng.integers(0, 10, n_train).astype(np.uint8),
        x_test=rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        y_test=rng.integers(0, 10, n_test).astype(np.uint8),
    )
    return path


def test_load_mnist_npz(tmp_path: Path, rng: np.random.Generator) -> None:
    ds = load_mnist_npz(_fake_mnist(tmp_path / "mnist.npz", rng))
    assert ds.x_train.shape == (120, 28, 28) and ds.y_test.dtype == np.int64
    assert ds.x_train.min() >= -1 and ds.x_train.max() <= 1
    assert ds.name.startswith("mnist.npz 28x28 (120 train / 60 test)")


def _npz(**arrays: Any) -> Callable[[Path], None]:
    return lambda path: np.savez(path, **arrays)


_OBJECTS = np.empty(2, dtype=object)
_IMG, _LAB = np.zeros((2, 4, 4)), np.array([0, 1])


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (None, FileNotFoundError, r"--data: no such file"),
        (
            lambda p: p.write_bytes(b"not a zip"),
            ValueError,
            r"--data must be an .npz archive with keys x_train, y_train, x_test, y_test; could not read",
        ),
        (lambda p: np.save(p, np.zeros(3), allow_pickle=False), ValueError, r"got a single array"),
        (_npz(x_train=_IMG, y_train=_LAB), ValueError, r"lacks x_test, y_test: expected keys"),
        (
            _npz(x_train=_OBJECTS, y_train=_OBJECTS, x_test=_OBJECTS, y_test=_OBJECTS),
            ValueError,
            r"cannot read without pickle",
        ),
        (
            _npz(x_train=_IMG, y_train=np.array([0, 12]), x_test=_IMG, y_test=_LAB),
            ValueError,
            r"y_train must hold integer labels 0..9",
        ),
        (
            _npz(x_train=np.zeros((2, 16)), y_train=_LAB, x_test=_IMG, y_test=_LAB),
            ValueError,
            r"x_train must have shape \(N, H, W\) and y_train shape \(N,\)",
        ),
        (
            _npz(x_train=_IMG, y_train=_LAB, x_test=np.zeros((2, 8, 8)), y_test=_LAB),
            ValueError,
            r"train and test images differ in size",
        ),
    ],
)
def test_load_mnist_npz_errors(
    tmp_path: Path, make: Callable[[Path], Any] | None, error: type, message: str
) -> None:
    path = tmp_path / "data.npz"
    if make is not None:
        make(path)
        if not path.exists():  # np.save appends .npy
            path = tmp_path / "data.npz.npy"
    with pytest.raises(error, match=message):
        load_mnist_npz(path)


# -- the experiment -----------------------------------------------------------------------------


def _assert_schema(doc: Any, steps: int) -> None:
    assert isinstance(doc, dict) and list(doc) == [
        "bnorm_version",
        "config",
        "steps_to_target",
        "bn",
        "plain",
    ]
    assert doc["bnorm_version"] == bnorm.__version__
    config = doc["config"]
    assert list(config) == [
        "model",
        "data",
        "steps",
        "lr",
        "batch_size",
        "seed",
        "target",
        "checkpoints",
        "optimizer",
    ]
    assert config["steps"] == steps and config["model"] in ("mlp", "cnn") and 0 < config["target"] <= 1
    for variant in ("bn", "plain"):  # the first checkpoint at or above the target, or null
        reached = [
            s
            for s, a in zip(doc[variant]["steps"], doc[variant]["test_accuracy"], strict=True)
            if a >= config["target"]
        ]
        assert doc["steps_to_target"][variant] == (reached[0] if reached else None)
    for variant in ("bn", "plain"):
        h = doc[variant]
        assert set(h) == {"steps", "test_accuracy", "percentiles"}
        n = len(h["steps"])
        assert n >= 2 and len(h["test_accuracy"]) == n and len(h["percentiles"]) == n
        assert h["steps"][0] == 0 and h["steps"][-1] == steps and h["steps"] == sorted(set(h["steps"]))
        assert all(isinstance(s, int) for s in h["steps"])
        assert all(isinstance(a, float) and 0.0 <= a <= 1.0 for a in h["test_accuracy"])
        for p in h["percentiles"]:
            assert len(p) == 3 and all(isinstance(v, float) for v in p) and p[0] <= p[1] <= p[2]
    assert doc["bn"]["steps"] == doc["plain"]["steps"]


@needs_digits
@pytest.mark.parametrize(("model", "steps"), [("mlp", 150), ("cnn", 40)])
def test_reduced_run_bn_wins(model: str, steps: int) -> None:
    result = run_experiment(model, steps=steps, checkpoints=6)
    doc = json.loads(json.dumps(result.to_json()))
    _assert_schema(doc, steps)
    bn, plain = doc["bn"]["test_accuracy"], doc["plain"]["test_accuracy"]
    assert bn[0] == plain[0]  # same initial weights for the shared layers: same predictions
    assert bn[-1] >= plain[-1]
    assert bn[-1] > 0.8  # and batch norm has actually learned


def test_identical_initialization() -> None:
    plain, _ = build_mlp(64, batch_norm=False, seed=3)
    bn, _ = build_mlp(64, batch_norm=True, seed=3)
    lin_p = [layer for layer in plain if isinstance(layer, Linear)]
    lin_b = [layer for layer in bn if isinstance(layer, Linear)]
    assert len(lin_p) == len(lin_b) == 4
    for p, b in zip(lin_p, lin_b, strict=True):
        np.testing.assert_array_equal(p.weight, b.weight)
    assert all(p.bias is not None and not p.bias.any() for p in lin_p)
    assert [b.bias is None for b in lin_b] == [True, True, True, False]
    cp, _ = build_cnn((8, 8), batch_norm=False, seed=3)
    cb, _ = build_cnn((8, 8), batch_norm=True, seed=3)
    for p, b in zip(
        [la for la in cp if isinstance(la, (Conv2d, Linear))],
        [la for la in cb if isinstance(la, (Conv2d, Linear))],
        strict=True,
    ):
        np.testing.assert_array_equal(p.weight, b.weight)


def test_batches_cover_every_example_each_epoch() -> None:
    gen = _batches(10, 4, np.random.default_rng(0))
    first = np.concatenate([next(gen) for _ in range(5)])  # 20 indices = 2 epochs
    assert sorted(first[:8]) == sorted(set(first[:8]))
    assert np.bincount(first, minlength=10).tolist() == [2] * 10


def test_checkpoints_include_the_table_rows() -> None:
    marks = _checkpoint_steps(1500, 20)
    assert marks == [m for m in _checkpoint_steps(5000, 20) if m < 1500] + [
        1500
    ]  # a longer run extends a shorter one
    assert marks[0] == 0 and marks[-1] == 1500
    assert {10, 20, 50, 100, 200, 500, 1000} <= set(marks)


@needs_digits
def test_deterministic_for_a_seed() -> None:
    a = run_experiment("mlp", steps=30, seed=5, checkpoints=3).to_json()
    b = run_experiment("mlp", steps=30, seed=5, checkpoints=3).to_json()
    c = run_experiment("mlp", steps=30, seed=6, checkpoints=3).to_json()
    assert json.dumps(a) == json.dumps(b)
    assert json.dumps(a) != json.dumps(c)


@needs_digits
def test_cnn_deterministic_for_a_seed() -> None:
    a = run_experiment("cnn", steps=8, seed=2, checkpoints=2).to_json()
    b = run_experiment("cnn", steps=8, seed=2, checkpoints=2).to_json()
    assert json.dumps(a) == json.dumps(b)


def test_defaults_are_quick_enough_to_document() -> None:
    for cfg in DEFAULTS.values():
        assert cfg.quick_steps < cfg.steps and 0 < cfg.target <= 1


@needs_digits
# -- report -------------------------------------------------------------------------------------

def test_table_and_speedup() -> None:
    result = run_experiment("mlp", steps=100, checkpoints=5, target=0.5)
    table = format_table(result).splitlines()
    assert table[0] == "| step | without BN | with BN |"
    assert [row.split("|")[1].strip() for row in table[2:]] == ["0", "10", "20", "50", "100"]
    line = format_speedup(result)
    assert line.startswith("steps to 50% test accuracy: without BN ")
    assert "fewer with BN" in line


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "result.json"
    target.write_text("old")

    def fail(fh: Any) -> None:
        fh.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, fail)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["result.json"]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR" and data[-8:-4] == b"IEND"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@needs_extras
# -- CLI ----------------------------------------------------------------------------------------

def test_cli_subprocess_quick(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out, js = tmp_path / "out", tmp_path / "res" / "demo.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bnorm",
            "demo",
            "--quick",
            "--steps",
            "40",
            "--out",
            str(out),
            "--json",
            str(js),
        ],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| step | without BN | with BN |" in proc.stdout
    assert "steps to 90% test accuracy" in proc.stdout
    png = out / "bnorm-demo-mlp.png"
    assert f"figure: {png}" in proc.stdout and f"json: {js}" in proc.stdout
    width, height = _png_size(png)
    assert (width, height) == (13 * 150, round(4.2 * 150))  # 150 dpi
    _assert_schema(json.loads(js.read_text()), 40)


@needs_extras
def test_cli_cnn_with_mnist_npz(
    tmp_path: Path, rng: np.random.Generator, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _fake_mnist(tmp_path / "mnist.npz", rng, n_train=60, n_test=20)
    rc = main(
        [
            "demo",
            "--model",
            "cnn",
            "--steps",
            "3",
            "--data",
            str(data),
            "--out",
            str(tmp_path),
            "--json",
            str(tmp_path / "r.json"),
            "--no-progress",
        ]
    )
    assert rc == 0
    assert "on mnist.npz 28x28 (60 train / 20 test)" in capsys.readouterr().out
    _png_size(tmp_path / "bnorm-demo-cnn.png")
    _assert_schema(json.loads((tmp_path / "r.json").read_text()), 3)


@pytest.mark.parametrize("module", ["tqdm", "matplotlib", "sklearn"])
def test_cli_names_missing_extras(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], module: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    assert main(["demo", "--quick"]) == 1
    err = capsys.readouterr().err
    assert 'pip install "bnorm[demo]"' in err  # an installed bnorm
    assert 'pip install -e ".[demo]"' in err  # a clone, where "bnorm[demo]" would fetch another copy
    assert {"sklearn": "scikit-learn"}.get(module, module) in err


def test_cli_missing_extras_via_import_hook(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_import = builtins.__import__

    def fake_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.split(".")[0] in ("matplotlib", "tqdm", "sklearn"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    for name in [m for m in sys.modules if m.split(".")[0] in ("matplotlib", "tqdm", "sklearn")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    assert main(["demo"]) == 1
    err = capsys.readouterr().err
    assert "needs scikit-learn, matplotlib, tqdm" in err and 'pip install "bnorm[demo]"' in err


@needs_extras
def test_cli_does_not_need_sklearn_with_data(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, rng: np.random.Generator
) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)
    data = _fake_mnist(tmp_path / "m.npz", rng, n_train=60, n_test=10)
    assert main(["demo", "--steps", "2", "--data", str(data), "--out", str(tmp_path), "--no-progress"]) == 0


@needs_extras
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--steps", "0"], "expected a positive integer, got '0'"),
        (["demo", "--lr", "-1"], "expected a positive finite number, got '-1'"),
        (["demo", "--seed", "x"], "expected a non-negative integer, got 'x'"),
        (["demo", "--model", "rnn"], "invalid choice: 'rnn'"),
        (
            ["demo", "--target", "1.5"],
            "argument --target: expected an accuracy in (0, 1], such as 0.9, got '1.5'",
        ),
        (
            ["demo", "--target", "90"],
            "argument --target: expected an accuracy in (0, 1], such as 0.9, got '90'",
        ),
        (
            ["demo", "--batch-size", "5000"],
            "bnorm demo: --batch-size must be at most the 1438 training images, got 5000",
        ),
    ],
)
def test_cli_bad_flags(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert "step/s" not in captured.err and "Traceback" not in captured.err  # before the progress bar
    assert captured.err.count("\n") == 1  # one line, usage errors from argparse included


@needs_extras
def test_cli_bad_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--data", str(tmp_path / "nope.npz")]) == 2
    assert "--data: no such file" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["demo", "--out", str(tmp_path / "file")]) == 2
    assert "--out must be a directory" in capsys.readouterr().err
    assert main(["demo", "--json", str(tmp_path)]) == 2
    assert "--json must be a file path" in capsys.readouterr().err


@needs_extras
def test_cli_unwritable_paths_fail_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A path below a regular file cannot be created, even by root (tests may run as root,
    # for whom permission bits do not stop a write).
    (tmp_path / "file").write_text("x")
    blocked = tmp_path / "file" / "sub"
    assert main(["demo", "--out", str(blocked)]) == 2
    err = capsys.readouterr().err
    assert err == f"bnorm demo: --out: cannot write to {str(blocked)!r}: Not a directory\n"
    assert main(["demo", "--json", str(blocked / "r.json"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"bnorm demo: --json: cannot write {str(blocked / 'r.json')!r}: its directory "
        f"{str(blocked)!r} is not writable\n"
    )
    assert main(["demo", "--json", str(tmp_path / "file" / "r.json"), "--out", str(tmp_path / "o")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert list((tmp_path / "o").iterdir()) == []  # the probe file is gone; nothing else was written


@needs_extras
def test_cli_write_failure_after_training_is_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import bnorm.demo.report as report

    def full_disk(result: Any, path: Any) -> str:
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(report, "write_json", full_disk)
    assert main(["demo", "--steps", "2", "--no-progress", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    path = str(tmp_path / "bnorm-demo-mlp.json")
    assert err == f"bnorm demo: cannot write {path!r}: No space left on device\n"


def test_cli_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"bnorm {bnorm.__version__}\n"


@needs_extras
def test_cli_ctrl_c_is_one_line_and_130(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import bnorm.demo.experiment as experiment

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "run_experiment", interrupted)
    assert main(["demo", "--no-progress", "--out", str(tmp_path)]) == 130
    assert capsys.readouterr().err == "bnorm demo: interrupted (Ctrl-C)\n"


@needs_extras
@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process")
def test_cli_ctrl_c_in_a_real_process(tmp_path: Path) -> None:
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bnorm", "demo", "--steps", "100000", "--out", str(tmp_path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        assert proc.stderr is not None
        seen = ""
        while "step" not in seen and time.monotonic() < deadline:  # training has started
            seen += proc.stderr.read(1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in err and err.rstrip().endswith("bnorm demo: interrupted (Ctrl-C)")
    assert out == "" and sorted(p.name for p in tmp_path.iterdir()) == []


def test_cli_without_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "demo" in capsys.readouterr().err


@needs_extras
def test_demo_default_out_is_bnorm_demo_and_ignored_by_git(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--steps", "2", "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "bnorm-demo").iterdir()) == [
        "bnorm-demo-mlp.json",
        "bnorm-demo-mlp.png",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bnorm-demo"]
    gitignore = (Path(SRC).parent / ".gitignore").read_text(encoding="utf-8").splitlines()
    assert "bnorm-demo/" in gitignore


@needs_digits
def test_write_json_round_trip(tmp_path: Path) -> None:
    result = run_experiment("mlp", steps=5, checkpoints=1)
    path = write_json(result, tmp_path / "r.json")
    assert json.loads(Path(path).read_text()) == result.to_json()


@needs_extras
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_cli_json_is_deterministic(tmp_path: Path, model: str) -> None:
    texts = []
    for run in ("a", "b"):
        path = tmp_path / f"{run}.json"
        assert (
            main(
                [
                    "demo",
                    "--model",
                    model,
                    "--steps",
                    "12",
                    "--seed",
                    "3",
                    "--out",
                    str(tmp_path),
                    "--json",
                    str(path),
                    "--no-progress",
                ]
            )
            == 0
        )
        texts.append(path.read_text())
    assert texts[0] == texts[1]
    _assert_schema(json.loads(texts[0]), 12)


@needs_extras
def test_cli_cnn_image_size_is_checked_before_training(
    tmp_path: Path, rng: np.random.Generator, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _fake_mnist(tmp_path / "m.npz", rng, n_train=60, n_test=10, size=10)
    assert main(["demo", "--model", "cnn", "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err == (
        "bnorm demo: --model cnn needs images whose height and width are divisible by 4 (two 2x2 "
        f"poolings), got 10x10 from {data}; use --model mlp\n"
    )
