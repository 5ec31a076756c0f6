"""The examples run and say what they claim (short runs)."""

import importlib.util
import pathlib

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_estimate_matches_exact_gradient(capsys):
    _load("quickstart").main()
    out = capsys.readouterr().out
    assert "within 5 standard errors: True" in out
    assert "score" in out and "pathwise" in out


def test_baselines_example_reduces_variance():
    variance = _load("baselines").main(steps=60)
    assert variance["moving average"] < variance["no baseline"]
    assert variance["learned (Optax)"] < variance["no baseline"]
