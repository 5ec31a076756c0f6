"""`scgjax.infer.TraceSCG_ELBO`: NumPyro models and guides under `numpyro.infer.SVI`.

The estimator's exact expectation over the guide's discrete draws (enumerated with
`tests/exact.py` through `elbo.program`, the scgjax program of one particle) must equal
the exact gradient, and the DiCE Hessian's expectation the exact Hessian, in float64. The
reference is NumPyro's own `TraceEnum_ELBO` on the guide with every site enumerated
(`config_enumerate`), which does not share any code with scgjax: a wrong cost term, a
dropped scale or mask, a misweighted plate element or a log-prob derivative that is wrong
at logit 0 changes the expectation and fails at rtol 1e-9. The models follow the shapes of
NumPyro's `test/infer/test_gradient.py` (a plate of assignments, a global site feeding a
plate, a chain inside a plate), the Gaussian mixture and the sigmoid belief net.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from exact import exact_moments
from numpyro import handlers
from numpyro.contrib.control_flow import scan
from numpyro.contrib.funsor import config_enumerate
from numpyro.distributions import constraints
from numpyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO
from numpyro.ops.indexing import Vindex

import scgjax as scg
from scgjax.infer import TraceSCG_ELBO

SIMPLEX = dist.biject_to(constraints.simplex)
KEY = jax.random.PRNGKey(3)


# -- Models and guides, written as NumPyro users write them ------------------------------


def assignments_model(data, p):
    with numpyro.plate("data", len(data)):
        z = numpyro.sample("z", dist.Categorical(jnp.array([0.35, 0.65])))
        numpyro.sample("x", dist.Normal(1.5 * z - 0.5, 1.0), obs=data)


def assignments_guide(data, p):
    probs = numpyro.param("probs", p["probs"], constraint=constraints.simplex)
    with numpyro.plate("data", len(data)):
        numpyro.sample("z", dist.Categorical(probs))


def global_model(data, p):
    a = numpyro.sample("a", dist.Categorical(jnp.array([0.25, 0.75])))
    table = jnp.array([[0.15, 0.85], [0.3, 0.7]])
    with numpyro.plate("data", len(data)):
        b = numpyro.sample("b", dist.Categorical(table[a]))
        numpyro.sample("c", dist.Normal(b + 0.5 * a, 1.0), obs=data)


def global_guide(data, p):
    probs_a = numpyro.param("probs_a", p["probs_a"], constraint=constraints.simplex)
    probs_b = numpyro.param("probs_b", p["probs_b"], constraint=constraints.simplex)
    a = numpyro.sample("a", dist.Categorical(probs_a))
    with numpyro.plate("data", len(data)) as i:
        numpyro.sample("b", dist.Categorical(Vindex(probs_b)[a, i]))


def chain_model(data, p):
    a = numpyro.sample("a", dist.Categorical(jnp.array([0.4, 0.6])))
    with numpyro.plate("data", len(data)):
        b = numpyro.sample("b", dist.Categorical(jnp.array([[0.3, 0.7], [0.45, 0.55]])[a]))
        c = numpyro.sample("c", dist.Categorical(jnp.array([[0.6, 0.4], [0.2, 0.8]])[b]))
        numpyro.sample("d", dist.Categorical(jnp.array([[0.7, 0.3], [0.25, 0.75]])[c]), obs=data)


def chain_guide(data, p):
    probs_a = numpyro.param("probs_a", p["probs_a"], constraint=constraints.simplex)
    probs_b = numpyro.param("probs_b", p["probs_b"], constraint=constraints.simplex)
    probs_c = numpyro.param("probs_c", p["probs_c"], constraint=constraints.simplex)
    a = numpyro.sample("a", dist.Categorical(probs_a))
    with numpyro.plate("data", len(data)) as i:
        b = numpyro.sample("b", dist.Categorical(probs_b[a]))
        numpyro.sample("c", dist.Categorical(Vindex(probs_c)[b, i]))


def mixture_model(data, p):
    """A two-component Gaussian mixture: the weights and locations are model parameters
    (point estimates), the assignments latent."""
    w = numpyro.param("weights", p["weights"], constraint=constraints.simplex)
    locs = numpyro.param("locs", p["locs"])
    with numpyro.plate("data", len(data)):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(locs[z], 1.0), obs=data)


def mixture_guide(data, p):
    logits = numpyro.param("assign_logits", p["assign_logits"])
    with numpyro.plate("data", len(data)):
        numpyro.sample("z", dist.Categorical(logits=logits))


def _sbn(data, p, bern):
    w_top, w_mid = numpyro.param("w_top", p["w_top"]), numpyro.param("w_mid", p["w_mid"])
    w_out = numpyro.param("w_out", p["w_out"])
    with numpyro.plate("rows", data.shape[0]):
        h1 = numpyro.sample("h1", bern(w_top))
        h2 = numpyro.sample("h2", bern(w_mid[0] + w_mid[1] * h1))
        numpyro.sample("x", bern(h2[..., None] * w_out).to_event(1), obs=data)


def _sbn_guide(data, p, bern):
    enc = numpyro.param("enc", p["enc"])
    with numpyro.plate("rows", data.shape[0]):
        h1 = numpyro.sample("h1", bern(data @ enc[:, 0]))
        numpyro.sample("h2", bern(data @ enc[:, 1] + 0.5 * h1))


def sbn_model(data, p):
    """A two-layer sigmoid belief net (h1 -> h2 -> x per data row), its logits starting
    at 0 (numpyro's Bernoulli logits derivative is wrong there)."""
    _sbn(data, p, lambda l: dist.Bernoulli(logits=l))


def sbn_guide(data, p):
    _sbn_guide(data, p, lambda l: dist.Bernoulli(logits=l))


def sbn_params():
    return {
        "w_top": jnp.zeros(()),
        "w_mid": jnp.array([0.0, 0.7]),
        "w_out": jnp.array([0.0, -0.6]),
        "enc": jnp.zeros((2, 2)),
    }


SBN_DATA = jnp.array([[1.0, 0.0], [1.0, 1.0]])


def masked_model(data, p):
    """`handlers.mask` on a latent and on the observations, `handlers.scale`, and a
    subsampled plate (its indices substituted by the caller)."""
    prior = numpyro.param("prior_logit", p["prior_logit"])
    with numpyro.plate("data", 4, subsample_size=2) as i:
        with handlers.mask(mask=jnp.array([True, False, True, True])[i]):
            z = numpyro.sample("z", dist.Bernoulli(logits=prior))
        with handlers.scale(scale=1.5), handlers.mask(mask=data[i] > -5.0):
            numpyro.sample("x", dist.Normal(2.0 * z - 1.0, 1.0), obs=data[i])


def masked_guide(data, p):
    l = numpyro.param("l", p["l"])
    with numpyro.plate("data", 4, subsample_size=2) as i:
        numpyro.sample("z", dist.Bernoulli(logits=l[i]))


MASKED_DATA = jnp.array([0.5, -9.0, 1.5, -0.3])


def scan_model(ys, p):
    """A two-state chain written with `numpyro.contrib.control_flow.scan`."""
    stay = numpyro.param("stay", p["stay"])

    def step(z_prev, y):
        z = numpyro.sample("z", dist.Bernoulli(logits=stay * (2.0 * z_prev - 1.0)))
        numpyro.sample("y", dist.Normal(2.0 * z - 1.0, 1.0), obs=y)
        return z.astype(ys.dtype), None

    scan(step, jnp.zeros((), ys.dtype), ys)


def scan_guide(ys, p):
    l = numpyro.param("l", p["l"])

    def step(z_prev, lt):
        z = numpyro.sample("z", dist.Bernoulli(logits=lt + 0.7 * z_prev))
        return z.astype(ys.dtype), None

    scan(step, jnp.zeros((), ys.dtype), l)


# -- The exact check ----------------------------------------------------------------------


def _enum_reference(model, guide, data, p, order=2):
    """(loss, gradient, Hessian) of NumPyro's TraceEnum_ELBO with the guide enumerated."""
    loss = lambda q: TraceEnum_ELBO().loss(KEY, {}, model, config_enumerate(guide), data, q)
    both = lambda q: (loss(q), jax.grad(loss)(q))
    return jax.jit(lambda q: both(q) + (jax.hessian(loss)(q),) if order == 2 else both(q))(p)


def assert_exact_vs_enum(
    model, guide, data, raw, constrain, supports, *, hessian=True, reference=None, **options
):
    """E[∇ loss] and E[∇² loss] of TraceSCG_ELBO (by enumerating the guide's draws) equal
    TraceEnum_ELBO's exact gradient and Hessian, with respect to the unconstrained
    parameters `raw`; E[loss] equals its value."""
    with jax.enable_x64(True):
        raw = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), raw)
        data = jnp.asarray(data, jnp.float64 if data.dtype.kind == "f" else data.dtype)
        program = TraceSCG_ELBO().program(model, guide)
        f = lambda r, key: program({}, key, data, constrain(r))
        m = exact_moments(f, raw, KEY, supports=supports, hessian=hessian, **options)
        ref_model, ref_guide = reference or (model, guide)
        loss = lambda r: TraceEnum_ELBO().loss(
            KEY, {}, ref_model, config_enumerate(ref_guide), data, constrain(r)
        )
        ref = jax.jit(  # funsor's eager contractions take seconds per call un-jitted
            lambda r: (loss(r), jax.grad(loss)(r)) + ((jax.hessian(loss)(r),) if hessian else ())
        )(raw)
        np.testing.assert_allclose(float(m["mass"]), 1.0, rtol=1e-12)
        np.testing.assert_allclose(float(m["value"]), float(ref[0]), rtol=1e-9)
        assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ref[1])) > 1e-3
        for (path, got), want in zip(
            jax.tree_util.tree_leaves_with_path(m["est"]), jax.tree.leaves(ref[1])
        ):
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12, err_msg=f"gradient {path}")
        if hessian:
            for got, want in zip(jax.tree.leaves(m["est_hess"]), jax.tree.leaves(ref[2])):
                np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12, err_msg="Hessian")


def _simplex(raw):
    return jax.tree.map(SIMPLEX, raw)


# -- Unbiased against TraceEnum_ELBO, every order -----------------------------------------


def test_plate_of_assignments_exact_gradient_and_hessian():
    raw = {"probs": SIMPLEX.inv(jnp.array([[0.4, 0.6], [0.55, 0.45], [0.2, 0.8]]))}
    assert_exact_vs_enum(
        assignments_model,
        assignments_guide,
        jnp.array([-0.5, 2.0, 0.3]),
        raw,
        _simplex,
        {"z": (0, 1)},
    )


@pytest.mark.slow
def test_global_site_feeding_a_plate_exact():
    raw = {
        "probs_a": SIMPLEX.inv(jnp.array([0.45, 0.55])),
        "probs_b": SIMPLEX.inv(jnp.array([[[0.5, 0.5], [0.6, 0.4]], [[0.4, 0.6], [0.35, 0.65]]])),
    }
    assert_exact_vs_enum(
        global_model,
        global_guide,
        jnp.array([-0.5, 2.0]),
        raw,
        _simplex,
        {"a": (0, 1), "b": (0, 1)},
    )


@pytest.mark.slow
def test_chain_inside_a_plate_exact():
    raw = {
        "probs_a": SIMPLEX.inv(jnp.array([0.5, 0.5])),
        "probs_b": SIMPLEX.inv(jnp.array([[0.4, 0.6], [0.3, 0.7]])),
        "probs_c": SIMPLEX.inv(jnp.array([[[0.3, 0.7], [0.8, 0.2]], [[0.2, 0.8], [0.5, 0.5]]])),
    }
    assert_exact_vs_enum(
        chain_model,
        chain_guide,
        jnp.array([0, 1]),
        raw,
        _simplex,
        {"a": (0, 1), "b": (0, 1), "c": (0, 1)},
        hessian=False,
    )


@pytest.mark.slow
def test_gaussian_mixture_exact():
    raw = {
        "weights": SIMPLEX.inv(jnp.array([0.3, 0.7])),
        "locs": jnp.array([-1.0, 1.5]),
        "assign_logits": jnp.array([[0.2, -0.4], [1.0, 0.0], [-0.3, 0.5]]),
    }

    def constrain(r):
        return {**r, "weights": SIMPLEX(r["weights"])}

    assert_exact_vs_enum(
        mixture_model, mixture_guide, jnp.array([-1.2, 0.4, 2.0]), raw, constrain, {"z": (0, 1)}
    )


def _probs_sbn_model(data, p):
    _sbn(data, p, lambda l: dist.Bernoulli(probs=jax.nn.sigmoid(l)))


def _probs_sbn_guide(data, p):
    _sbn_guide(data, p, lambda l: dist.Bernoulli(probs=jax.nn.sigmoid(l)))


@pytest.mark.parametrize("hessian", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_sigmoid_belief_net_at_zero_logits_exact(hessian):
    """Every logit starts at 0, where numpyro's Bernoulli(logits=) log-prob derivative is
    wrong (in the guide's score term, and in the pathwise terms of log q and log p). The
    reference is TraceEnum_ELBO on the same net written with probs=sigmoid(logits), whose
    derivatives are right."""
    assert_exact_vs_enum(
        sbn_model,
        sbn_guide,
        SBN_DATA,
        sbn_params(),
        lambda r: r,
        {"h1": (0, 1), "h2": (0, 1)},
        hessian=hessian,
        reference=(_probs_sbn_model, _probs_sbn_guide),
    )


def test_numpyro_elbo_is_biased_at_zero_logits():
    """The reason for the test above: TraceEnum_ELBO on the logits net is not the exact
    gradient at 0 (if numpyro fixes this, the derivative-safe log-probs can go)."""
    with jax.enable_x64(True):
        p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), sbn_params())
        data = SBN_DATA.astype(jnp.float64)
        logits_grad = _enum_reference(sbn_model, sbn_guide, data, p, order=1)[1]
        probs_grad = _enum_reference(_probs_sbn_model, _probs_sbn_guide, data, p, order=1)[1]
        assert not np.allclose(logits_grad["enc"], probs_grad["enc"], atol=1e-3)
        assert not np.allclose(logits_grad["w_top"], probs_grad["w_top"], atol=1e-3)


def _substituted_subsample(fn, idx):
    return handlers.substitute(fn, data={"data": idx})


@pytest.mark.parametrize(
    # [1, 2]: a masked latent and a masked observation; [0, 3]: nothing masked
    "idx",
    [jnp.array([1, 2]), pytest.param(jnp.array([0, 3]), marks=pytest.mark.slow)],
)
def test_mask_scale_and_subsample_exact(idx):
    """Masked latents (no log p, no log q, yet scored where they reach a cost), masked
    observations, handlers.scale and the subsampling scale 4/2, for a fixed subsample."""
    raw = {"prior_logit": jnp.array(0.3), "l": jnp.array([0.2, -0.5, 0.9, -1.1])}
    assert_exact_vs_enum(
        _substituted_subsample(masked_model, idx),
        _substituted_subsample(masked_guide, idx),
        MASKED_DATA,
        raw,
        lambda r: r,
        {"z": (0, 1)},
    )


@pytest.mark.slow
def test_scan_exact():
    """A chain written with numpyro's scan in the model and in the guide. TraceEnum_ELBO
    does not enumerate a guide's scan, so the reference is the hand enumeration of
    E_q[log p − log q] from numpyro's own log_density at the 8 joint draws."""
    from numpyro.infer.util import log_density

    ys = jnp.array([0.5, -1.0, 2.0])
    raw = {"stay": jnp.array(0.8), "l": jnp.array([-0.5, 0.2, 0.7])}
    with jax.enable_x64(True):
        raw = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), raw)
        ys = ys.astype(jnp.float64)
        configs = jnp.array(np.array(np.meshgrid(*[[0, 1]] * 3, indexing="ij")).reshape(3, -1).T)

        def neg_elbo(r):
            def one(z):
                z = z.astype(jnp.int32)
                lq, _ = log_density(scan_guide, (ys, r), {}, {"z": z})
                lp, _ = log_density(scan_model, (ys, r), {}, {"z": z})
                return jnp.exp(lq) * (lq - lp)

            return jnp.sum(jax.vmap(one)(configs))

        program = TraceSCG_ELBO().program(scan_model, scan_guide)
        m = exact_moments(lambda r, key: program({}, key, ys, r), raw, KEY, supports={"z": (0, 1)})
        value, grad, hess = jax.jit(
            lambda r: (neg_elbo(r), jax.grad(neg_elbo)(r), jax.hessian(neg_elbo)(r))
        )(raw)
        np.testing.assert_allclose(m["value"], value, rtol=1e-9)
        for got, want in zip(jax.tree.leaves(m["est"]), jax.tree.leaves(grad)):
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
        for got, want in zip(jax.tree.leaves(m["est_hess"]), jax.tree.leaves(hess)):
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def _baseline_guide(data, p):
    probs = numpyro.param("probs", p["probs"], constraint=constraints.simplex)
    b = numpyro.param("b", p["b"])  # computed before the draw: a valid baseline
    with numpyro.plate("data", len(data)):
        numpyro.sample("z", dist.Categorical(probs), infer={"baseline": b})


def test_per_site_baseline_exact():
    raw = {"probs": SIMPLEX.inv(jnp.array([[0.4, 0.6], [0.55, 0.45], [0.2, 0.8]]))}
    b = jnp.array([1.0, -2.0, 0.5])

    def constrain(r):
        return {"probs": SIMPLEX(r["probs"]), "b": b.astype(r["probs"].dtype)}

    assert_exact_vs_enum(
        assignments_model,
        _baseline_guide,
        jnp.array([-0.5, 2.0, 0.3]),
        raw,
        constrain,
        {"z": (0, 1)},
        reference=(assignments_model, assignments_guide),
    )


def test_leave_one_out_over_particles_exact():
    raw = {"probs": SIMPLEX.inv(jnp.array([[0.4, 0.6], [0.55, 0.45]]))}
    assert_exact_vs_enum(
        assignments_model,
        assignments_guide,
        jnp.array([-0.5, 2.0]),
        raw,
        _simplex,
        {"z": (0, 1)},
        num_samples=2,
        baseline="leave_one_out",
    )


def test_enum_estimator_in_the_guide_is_exact_for_every_key():
    """`infer={"estimator": "enum"}` sums the guide site out: the loss and its gradient
    are TraceEnum_ELBO's, with no draws left to enumerate."""

    def guide(data, p):
        probs = numpyro.param("probs", p["probs"], constraint=constraints.simplex)
        with numpyro.plate("data", len(data)):
            numpyro.sample("z", dist.Categorical(probs), infer={"estimator": "enum"})

    with jax.enable_x64(True):
        data = jnp.array([-0.5, 2.0, 0.3])
        raw = {"probs": SIMPLEX.inv(jnp.array([[0.4, 0.6], [0.55, 0.45], [0.2, 0.8]]))}
        loss = lambda r, key: TraceSCG_ELBO().loss(
            key, {}, assignments_model, guide, data, _simplex(r)
        )
        ref = _enum_reference(assignments_model, assignments_guide, data, _simplex(raw), order=1)
        ref_grad = jax.jit(
            jax.grad(
                lambda r: TraceEnum_ELBO().loss(
                    KEY,
                    {},
                    assignments_model,
                    config_enumerate(assignments_guide),
                    data,
                    _simplex(r),
                )
            )
        )(raw)
        for key in jax.random.split(KEY, 2):
            value, grad = jax.jit(jax.value_and_grad(loss))(raw, key)
            np.testing.assert_allclose(value, ref[0], rtol=1e-9)
            np.testing.assert_allclose(grad["probs"], ref_grad["probs"], rtol=1e-9)


# -- The loss is the program's surrogate, with NumPyro's values -------------------------


def test_loss_value_equals_trace_elbo_for_the_same_key():
    """Same particles, same guide draws (subsample indices included): Trace_ELBO's value."""
    p = {"prior_logit": jnp.array(0.3), "l": jnp.array([0.2, -0.5, 0.9, -1.1])}
    for k in (1, 3):
        losses = [
            jax.jit(
                jax.vmap(
                    lambda key, e=e: e.loss(key, {}, masked_model, masked_guide, MASKED_DATA, p)
                )
            )
            for e in (TraceSCG_ELBO(num_particles=k), Trace_ELBO(num_particles=k))
        ]
        keys = jax.random.split(KEY, 4)
        ours, theirs = (loss(keys) for loss in losses)
        assert len(set(np.asarray(ours).tolist())) == 4  # the subsample and draws vary
        np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_loss_gradient_is_the_program_estimator():
    """jax.grad of the loss is scg_grad of `program` with the same key (one particle, and
    K particles with leave-one-out), so the exact checks above hold for the loss."""
    p = {"prior_logit": jnp.array(0.3), "l": jnp.array([0.2, -0.5, 0.9, -1.1])}
    prog = TraceSCG_ELBO().program(masked_model, masked_guide)
    for elbo, opts in [
        (TraceSCG_ELBO(), {}),
        (
            TraceSCG_ELBO(num_particles=3, baseline="leave_one_out"),
            {"num_samples": 3, "baseline": "leave_one_out"},
        ),
    ]:
        got = jax.jit(
            jax.grad(lambda q: elbo.loss(KEY, {}, masked_model, masked_guide, MASKED_DATA, q))
        )(p)
        want = jax.jit(scg.scg_grad(prog, key_argnum=1, **opts))({}, KEY, MASKED_DATA, p)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-6)
    v = TraceSCG_ELBO(num_particles=3, vectorize_particles=False)
    w = TraceSCG_ELBO(num_particles=3)
    f = lambda e: jax.jit(
        jax.value_and_grad(lambda q: e.loss(KEY, {}, masked_model, masked_guide, MASKED_DATA, q))
    )(p)
    for a, b in zip(jax.tree.leaves(f(v)), jax.tree.leaves(f(w))):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_pathwise_guide_gives_trace_elbo_gradient():
    """A guide with reparameterized sites only: the same draws and the same cost as
    Trace_ELBO, so the same gradient (no score terms are added)."""

    def model(data):
        loc = numpyro.sample("loc", dist.Normal(0.0, 2.0))
        with numpyro.plate("data", data.shape[0]):
            numpyro.sample("x", dist.Normal(loc, 1.0), obs=data)

    def guide(data):
        m = numpyro.param("m", 0.3)
        s = numpyro.param("s", 0.8, constraint=constraints.positive)
        numpyro.sample("loc", dist.Normal(m, s))

    p = {"m": jnp.array(0.3), "s": jnp.array(0.8)}
    data = jnp.array([0.5, 1.5, 1.0])
    got = jax.jit(jax.grad(lambda q: TraceSCG_ELBO().loss(KEY, q, model, guide, data)))(p)
    want = jax.jit(jax.grad(lambda q: Trace_ELBO().loss(KEY, q, model, guide, data)))(p)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert float(jnp.abs(got["m"])) > 1e-3


# -- What describe sees: plates and causality with nothing declared -----------------------


def _weights(table: str, site: str) -> str:
    row = next(line for line in table.splitlines() if line.split()[:1] == [site])
    return row


def test_describe_sees_the_plate_and_the_scan():
    p = sbn_params()
    table = scg.describe(TraceSCG_ELBO().program(sbn_model, sbn_guide))(p, KEY, SBN_DATA, p)
    for site in ("h1", "h2"):
        assert "0: plate" in _weights(table, site), table
    ys = jnp.array([0.5, -1.0, 2.0])
    q = {"stay": jnp.array(0.8), "l": jnp.array([-0.5, 0.2, 0.7])}
    table = scg.describe(TraceSCG_ELBO().program(scan_model, scan_guide))({}, KEY, ys, q)
    assert "score" in _weights(table, "z") and "every" not in _weights(table, "z"), table


# -- SVI ----------------------------------------------------------------------------------


def test_svi_trains_the_mixture_assignments():
    """SVI with TraceSCG_ELBO moves the guide's assignment probabilities toward the exact
    posterior (the locations known): the loss's gradient is an unbiased estimate of
    TraceEnum's, and Adam over 300 steps of 4 particles with leave-one-out reaches it."""
    data = jnp.array([-2.0, -1.5, 1.8, 2.2])
    locs = jnp.array([-2.0, 2.0])

    def model(data):
        with numpyro.plate("data", len(data)):
            z = numpyro.sample("z", dist.Categorical(jnp.array([0.5, 0.5])))
            numpyro.sample("x", dist.Normal(locs[z], 1.0), obs=data)

    def guide(data):
        logits = numpyro.param("assign_logits", jnp.zeros((4, 2)))
        with numpyro.plate("data", len(data)):
            numpyro.sample("z", dist.Categorical(logits=logits))

    svi = SVI(
        model,
        guide,
        numpyro.optim.Adam(0.05),
        loss=TraceSCG_ELBO(num_particles=4, baseline="leave_one_out"),
    )
    result = svi.run(jax.random.PRNGKey(0), 300, data, progress_bar=False)
    q = jax.nn.softmax(result.params["assign_logits"])[:, 1]
    posterior = jax.nn.sigmoid(2.0 * 2.0 * data)  # p(z=1 | x) for locs ±2, unit scale
    np.testing.assert_allclose(q, posterior, atol=0.03)
    assert result.losses[-20:].mean() < result.losses[:20].mean()


def test_mutable_state_reaches_svi():
    def model(data):
        with numpyro.plate("data", len(data)):
            numpyro.sample("x", dist.Normal(numpyro.param("loc", 0.0), 1.0), obs=data)

    def guide(data):
        count = numpyro.primitives.mutable("count", {"n": jnp.array(0.0)})
        count["n"] = count["n"] + 1.0

    def run(elbo):  # init runs the guide once, then three steps
        svi = SVI(model, guide, numpyro.optim.Adam(0.1), loss=elbo)
        state = svi.init(jax.random.PRNGKey(0), jnp.array([1.0, 2.0]))
        for _ in range(3):
            state, _ = svi.update(state, jnp.array([1.0, 2.0]))
        return state, svi.get_params(state)

    (ours, ours_p), (theirs, theirs_p) = run(TraceSCG_ELBO()), run(Trace_ELBO())
    assert float(ours.mutable_state["count"]["n"]) == float(theirs.mutable_state["count"]["n"]) > 1
    np.testing.assert_allclose(ours_p["loc"], theirs_p["loc"], rtol=1e-6)
    assert float(ours_p["loc"]) != 0.0


# -- Refusals, at trace time, naming the site and the fix ---------------------------------


def _loss(model, guide, elbo=None):
    return (elbo or TraceSCG_ELBO()).loss(KEY, {}, model, guide, jnp.array([0.5, 1.0]))


def _obs_model(data):
    with numpyro.plate("data", 2):
        z = numpyro.sample("z", dist.Bernoulli(0.4))
        numpyro.sample("x", dist.Normal(z, 1.0), obs=data)


def test_refuses_an_impossible_estimator():
    def guide(data):
        with numpyro.plate("data", 2):
            numpyro.sample("z", dist.Bernoulli(0.3), infer={"estimator": "pathwise"})

    with pytest.raises(
        ValueError, match=r"guide site 'z' \(ExpandedDistribution\).*pathwise.*no rsample"
    ):
        _loss(_obs_model, guide)


def test_refuses_enumerated_guide_sites():
    def guide(data):
        with numpyro.plate("data", 2):
            numpyro.sample("z", dist.Bernoulli(0.3), infer={"enumerate": "parallel"})

    with pytest.raises(ValueError, match=r"guide site 'z'.*'estimator': 'enum'"):
        _loss(_obs_model, guide)


def test_refuses_a_latent_missing_from_the_guide():
    with pytest.raises(ValueError, match=r"model site 'z' is neither observed nor drawn"):
        _loss(_obs_model, lambda data: None)


def test_refuses_model_enumeration():
    with pytest.raises(ValueError, match=r"model site 'z' is enumerated.*TraceEnum_ELBO"):
        _loss(config_enumerate(_obs_model), lambda data: None)


def test_refuses_pyro_style_baseline_dicts_and_bad_options():
    def guide(data):
        with numpyro.plate("data", 2):
            numpyro.sample(
                "z", dist.Bernoulli(0.3), infer={"baseline": {"use_decaying_avg_baseline": True}}
            )

    with pytest.raises(TypeError, match=r"guide site 'z'.*infer\['baseline'\]"):
        _loss(_obs_model, guide)
    with pytest.raises(ValueError, match="num_particles >= 2"):
        TraceSCG_ELBO(baseline="leave_one_out")
    with pytest.raises(ValueError, match="vectorize_particles=True"):
        TraceSCG_ELBO(num_particles=2, vectorize_particles=False, baseline="leave_one_out")
    with pytest.raises(ValueError, match="unknown baseline"):
        TraceSCG_ELBO(baseline="vimco")
