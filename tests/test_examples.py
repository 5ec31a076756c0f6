"""The examples run and say what they claim (short runs)."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

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
    assert variance["learned (scg.baselines.nvil)"] < variance["no baseline"]


@pytest.mark.slow
def test_distributed_vae_two_processes_give_the_one_process_gradient(tmp_path):
    """Two processes (`jax.distributed`, a local coordinator, four CPU devices each, the
    batch sharded over all eight) compute the gradient that this one process computes on
    its own devices for the same key."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    subprocess.run(
        [sys.executable, str(EXAMPLES / "distributed_vae.py"), "--steps", "1"]
        + ["--out", str(tmp_path / "two"), "--spawn", "2", "--local-devices", "4"],
        check=True,
        env=env,
        timeout=600,
        capture_output=True,
    )
    _load("distributed_vae").main(["--steps", "1", "--out", str(tmp_path / "one")])
    two, one = (np.load(tmp_path / f"{n}.npz") for n in ("two", "one"))
    assert sorted(two) == sorted(one) == ["dec_b", "dec_w", "enc_b", "enc_w"]
    for k in one:
        scale = np.max(np.abs(one[k]))
        assert scale > 1e-2
        np.testing.assert_allclose(two[k], one[k], rtol=0, atol=1e-5 * scale)


def test_lola_dice_cooperates_where_naive_learners_defect(tmp_path):
    """A short run from the zero init: LOLA's opponent shaping (second derivatives through
    `scg.surrogate`) gives a higher average reward per step than naive learning, which
    defects (about −2) within a few dozen updates."""
    out = tmp_path / "lola.png"
    results = _load("lola_dice").main(
        updates=30, batch=64, steps=100, out=out, progress=False, inits=("zeros",)
    )
    assert results["naive", "zeros"] < -1.8
    assert results["LOLA", "zeros"] > results["naive", "zeros"] + 0.15
    assert out.stat().st_size > 0


def test_cartpole_reward_to_go_has_lower_variance_than_whole_episode(tmp_path):
    """scgjax's automatic reward-to-go (causality in the scan) against hand-written
    whole-episode REINFORCE on gymnax's CartPole: less gradient variance, and a short
    training run does not fall behind."""
    pytest.importorskip("gymnax", reason="gymnax pins jax<0.12: not installable on newest JAX")
    out = tmp_path / "cartpole.png"
    r = _load("cartpole_reinforce").main(updates=4, batch=16, steps=60, out=out, progress=False)
    v = r["variance"]
    assert v["reward-to-go (scgjax, automatic)"] < 0.5 * v["whole-episode REINFORCE"]
    assert out.stat().st_size > 0


def test_discrete_vae_baselines_and_disarm_reduce_variance(tmp_path):
    """On binarized digits, leave-one-out baselines and DisARM give the encoder a
    gradient of far lower variance than plain score-function estimates, and every
    estimator improves the ELBO of the untrained model (about -44 nats)."""
    out = tmp_path / "vae.png"
    names = ("score", "score + leave-one-out (K=4)", "disarm")
    r = _load("discrete_vae").main(steps=40, batch=32, out=out, progress=False, names=names)
    v = r["variance"]
    assert v["score + leave-one-out (K=4)"] < 0.1 * v["score"]
    assert v["disarm"] < 0.1 * v["score"]
    assert all(e > -40.0 for e in r["test elbo"].values())
    assert out.stat().st_size > 0


def test_hard_attention_enumeration_and_baselines_reduce_variance(tmp_path):
    """The attention network's gradient: exact by enumeration (variance 0), and lower
    with leave-one-out baselines than with plain score-function estimates."""
    out = tmp_path / "attention.png"
    r = _load("hard_attention").main(steps=30, batch=32, out=out, progress=False)
    v = r["variance"]
    assert v["enum"] < 1e-9 * v["score"]  # 0 up to rounding (3e-19 on JAX 0.12)
    assert v["score + leave-one-out (K=4)"] < 0.5 * v["score"]
    assert all(a > 0.2 for a in r["accuracy"].values())  # chance is 0.1
    assert out.stat().st_size > 0


def test_gmm_svi_enum_is_exact_and_trace_scg_elbo_unbiased_under_subsampling(tmp_path):
    """A NumPyro mixture under SVI: with `"estimator": "enum"` TraceSCG_ELBO's gradient is
    TraceEnum_ELBO's exact one (and the closed-form ELBO's) at the starting point, for
    every key; its score-function estimates agree with it within standard errors, on all
    points and with the plate subsampled; training moves the ELBO toward EM's optimum."""
    import jax

    gmm = _load("gmm_svi")
    out = tmp_path / "gmm.png"
    names = ("TraceSCG_ELBO, score", "TraceSCG_ELBO, enum")
    r = gmm.main(steps=40, n=60, subsample=20, draws=300, out=out, progress=False, names=names)
    exact = r["exact gradient"]
    data = gmm.make_data(60, 0)
    closed_form = jax.grad(lambda p: -gmm.exact_elbo(p, data))(gmm.init_params(60))
    enum = r["gradient"]["TraceSCG_ELBO, enum"]
    for k in exact:
        scale = float(np.max(np.abs(exact[k])))
        assert scale > 1e-2
        np.testing.assert_allclose(exact[k], closed_form[k], rtol=0, atol=1e-5 * scale)
        np.testing.assert_allclose(enum[k], exact[k], rtol=0, atol=1e-5 * scale)
    assert r["agreement"]["TraceSCG_ELBO, enum"] is None  # exact for every key
    assert r["log10 var"]["TraceSCG_ELBO, enum"] < -6  # rounding only
    assert r["log10 var"]["TraceSCG_ELBO, score"] > -1
    assert r["agreement"]["TraceSCG_ELBO, score"] < 4.5
    assert r["agreement, subsampled"]["TraceSCG_ELBO, score"] < 4.5
    start = float(gmm.exact_elbo(gmm.init_params(60), data))
    for name in names:
        assert start < r["elbo"][name] <= r["em elbo"] + 1e-2
    assert out.stat().st_size > 0
