"""`scg.baselines.nvil`: learned input-dependent baselines, centring and variance
normalisation (Mnih & Gregor 2014), proved by exact enumeration.

Each exact test sums the helper's output over every joint draw of the program's
Bernoulli sites (`draws=`), weighted by their probabilities, in float64, and compares it
with a reference computed without scgjax's downstream machinery: the gradient of the
exact expectation (`E[grads] = ∇E[f]`), its parts through each node's density (with
`normalize=True`), and the gradient of the expected regression loss onto downstream
costs written out by hand (per row for a plate, reward-to-go for a scan).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from jax import lax

import scgjax as scg

try:
    from .exact import enumerate_draws
except ImportError:  # tests/ is not a package
    from exact import enumerate_draws

RTOL, ATOL = 1e-9, 1e-12


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def f64(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)


def assert_close(got, want, rtol=RTOL, atol=ATOL, what=""):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(
            np.asarray(g), np.asarray(w), rtol=rtol, atol=atol,
            err_msg=f"{what} {jax.tree_util.keystr(path)}",
        )  # fmt: skip


def log_bern(z, logits):
    """log Bernoulli(z; logits), written out (independent of numpyro's log_prob)."""
    return z * jax.nn.log_sigmoid(logits) + (1 - z) * jax.nn.log_sigmoid(-logits)


# ---------------------------------------------------------------------------------------
# The exact machinery: expectations over every joint draw.
# ---------------------------------------------------------------------------------------


def weight(f, args, z):
    """p(z) of the joint draw `z`, from the traced log-densities (checked to sum to 1)."""
    return jnp.exp(scg.trace(f, draws=z)(*args).score_log_joint)


def exact_expectation(f, args, estimate, check_mass=True):
    """Σ_z p(z)·estimate(z) over the score draws of `f` (checking that Σ_z p(z) = 1)."""
    _, draws, _ = enumerate_draws(f, args)

    def one(z):
        w = weight(f, args, z)
        return w, jax.tree.map(lambda x: w * x, estimate(z))

    w, est = jax.jit(jax.vmap(one))(draws)
    if check_mass:
        np.testing.assert_allclose(float(jnp.sum(w)), 1.0, rtol=1e-12)
    return jax.tree.map(lambda x: jnp.sum(x, 0), est)


def exact_gradient(f, args, argnum=0):
    """∇ of E[f] = Σ_z p_θ(z)·f(θ, z), differentiating p and f alike."""
    _, draws, _ = enumerate_draws(f, args)

    def expected(a):
        full = list(args)
        full[argnum] = a

        def one(z):
            t = scg.trace(f, draws=z)(*full)
            return jnp.exp(t.score_log_joint) * t.cost

        return jnp.sum(jax.vmap(one)(draws))

    return jax.jit(jax.grad(expected))(args[argnum])


def nvil_expectation(f, baseline_fn, phi, state, args, check_mass=True, **options):
    """E[(grads, baseline_grads)] of `nvil` over the draws."""

    def at(z):
        nv = scg.baselines.nvil(f, baseline_fn, draws=z, **options)
        g, g_phi, _, _ = nv.update(phi, state, *args)
        return g, g_phi

    return exact_expectation(f, args, at, check_mass)


def state_of(mean, var):
    return scg.baselines.NVILState(f64(mean), f64(var))


# ---------------------------------------------------------------------------------------
# A sigmoid belief net (amortised q(z | x), a plate of rows) with an input baseline.
# ---------------------------------------------------------------------------------------

B, D, H = 2, 3, 2
X = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])


def sbn_params():
    return f64(
        {
            "W": np.array([[0.3, -0.5], [0.8, 0.2], [-0.4, 0.6]]),
            "c": np.array([0.1, -0.2]),
            "V": np.array([[0.7, -0.3, 0.5], [-0.6, 0.9, 0.2]]),
            "d": np.array([0.0, 0.3, -0.1]),
        }
    )


def sbn_row_costs(params, x, z):
    """Each row's negative ELBO at latents z: log q(z|x) − log p(z) − log p(x|z)."""
    lq = log_bern(z, x @ params["W"] + params["c"]).sum(-1)
    lik = log_bern(x, z @ params["V"] + params["d"]).sum(-1)
    return lq - H * jnp.log(0.5) - lik


def sbn_downstream(params, x, z):
    """Q_ij, the downstream cost of latent (i, j), by hand: (z_ij·l_ij − log p(x_i | z_i))/B.
    log q(z_ij) = log σ(−l_ij) + z_ij·l_ij, and the cost is split along its additive
    tail: log σ(−l_ij), the prior's constant and log q(z_ik) (k ≠ j) depend on no draw
    or on other latents, so they do not weight z_ij (Rao-Blackwellization by dataflow)."""
    logits = x @ params["W"] + params["c"]
    lik = log_bern(x, z @ params["V"] + params["d"]).sum(-1)
    return (z * logits - lik[:, None]) / B


def sbn(params, x, key):
    logits = x @ params["W"] + params["c"]
    z = scg.sample(key, dist.Bernoulli(logits=logits), name="z").astype(x.dtype)
    return jnp.mean(sbn_row_costs(params, x, z))


def sbn_baseline(phi, params, x):
    del params
    return {"z": x @ phi["w"] + phi["b"]}  # (B, 1): one baseline per row


PHI = {"w": np.array([[0.4], [-1.1], [0.7]]), "b": np.array([0.9])}


def sbn_args():
    return (sbn_params(), jnp.asarray(X), jax.random.key(0))


@pytest.mark.parametrize("center", [True, False])
def test_sbn_gradient_is_unbiased_with_an_input_dependent_baseline(center):
    """E[grads] = ∇E[f] exactly, for a baseline b_φ(x) far from the optimum and a
    running mean c̄ ≠ 0 (both subtracted from every latent's downstream cost)."""
    args = sbn_args()
    state = state_of({"z": 1.7}, {"z": 5.0})
    got, _ = nvil_expectation(sbn, sbn_baseline, f64(PHI), state, args, center=center)
    want = exact_gradient(sbn, args)
    assert all(float(jnp.max(jnp.abs(w))) > 1e-3 for w in jax.tree.leaves(want))
    assert_close(got, want, what="E[grads] vs ∇E[f]")


def test_sbn_normalized_encoder_gradient_is_scaled_and_decoder_unchanged():
    """normalize=True with v = 9 (s = 3): the encoder reaches E[f] through q's density
    (its direct ∇log q term has mean 0), so E[grads] = ∇E[f]/3 for W and c; the decoder
    reaches it only directly, so E[grads] = ∇E[f] for V and d."""
    args = sbn_args()
    state = state_of({"z": -0.4}, {"z": 9.0})
    got, _ = nvil_expectation(sbn, sbn_baseline, f64(PHI), state, args, normalize=True)
    want = exact_gradient(sbn, args)
    scaled = {k: v / 3.0 if k in ("W", "c") else v for k, v in want.items()}
    assert_close(got, scaled, what="E[grads] vs ∇E[f] with the encoder's part / 3")


def test_sbn_scale_below_one_is_not_applied():
    """max(1, √v): a running variance below 1 leaves the signal as it is."""
    args = sbn_args()
    state = state_of({"z": 0.0}, {"z": 0.25})
    got, _ = nvil_expectation(sbn, sbn_baseline, f64(PHI), state, args, normalize=True)
    assert_close(got, exact_gradient(sbn, args), what="E[grads] vs ∇E[f]")


def test_sbn_baseline_gradient_is_the_regression_loss_gradient():
    """E[baseline_grads] = ∇_φ E[mean_ij((Q_ij − c̄ − b_φ(x)_i)²)], with Q_ij the
    downstream cost of latent (i, j) written out by hand (`sbn_downstream`)."""
    args = sbn_args()
    cbar = 0.6
    state = state_of({"z": cbar}, {"z": 2.0})
    _, got = nvil_expectation(sbn, sbn_baseline, f64(PHI), state, args)
    params, x, key = args
    _, draws, _ = enumerate_draws(sbn, args)

    def expected_loss(phi):
        def one(z):
            q = sbn_downstream(params, x, z["z"].astype(x.dtype))
            b = sbn_baseline(phi, params, x)["z"]
            return weight(sbn, args, z) * jnp.mean((q - cbar - b) ** 2)

        return jnp.sum(jax.vmap(one)(draws))

    want = jax.jit(jax.grad(expected_loss))(f64(PHI))
    assert all(float(jnp.max(jnp.abs(w))) > 1e-3 for w in jax.tree.leaves(want))
    assert_close(got, want, what="E[baseline_grads] vs ∇ of the expected regression loss")


def test_sbn_regression_converges_to_the_mean_downstream_cost_and_lowers_variance():
    """Gradient descent on the exact E[baseline_grads] of a free per-row baseline reaches
    b_i = mean_j E[Q_ij] − c̄ (the regression's minimiser); there the encoder gradient's exact
    variance is below that of no baseline, and its mean is still ∇E[f]."""
    args = sbn_args()
    params, x, key = args
    state = state_of({"z": 0.3}, {"z": 0.0})

    def free(phi, params, x):
        del params, x
        return {"z": phi}

    grad_phi = jax.jit(lambda phi: nvil_expectation(sbn, free, phi, state, args, False)[1])
    phi = jnp.zeros((B, 1))
    for _ in range(60):
        phi = phi - 0.5 * grad_phi(phi)  # the loss is mean((Q − c̄ − b)²): curvature 2/B
    _, draws, _ = enumerate_draws(sbn, args)
    q = jax.vmap(
        lambda z: weight(sbn, args, z) * sbn_downstream(params, x, z["z"].astype(x.dtype))
    )(draws)
    np.testing.assert_allclose(phi[:, 0], q.sum(0).mean(-1) - 0.3, rtol=1e-8)

    def moments(phi, state):
        def at(z):
            g = scg.baselines.nvil(sbn, free, draws=z).update(phi, state, *args)[0]
            return g["W"], g["W"] ** 2

        return exact_expectation(sbn, args, at)

    mean_b, sq_b = moments(phi, state)
    # c̄ = 0 and b = 0: no baseline at all
    mean_n, sq_n = moments(jnp.zeros((B, 1)), state_of({"z": 0.0}, {"z": 0.0}))
    want = exact_gradient(sbn, args)["W"]
    for m in (mean_b, mean_n):
        assert_close(m, want, what="E[grads['W']]")
    var_b = float(jnp.sum(sq_b - mean_b**2))
    var_n = float(jnp.sum(sq_n - mean_n**2))  # no baseline at all
    assert var_b < 0.5 * var_n, (var_b, var_n)


@pytest.mark.parametrize("normalize", [False, True])
def test_sbn_same_key_equals_the_per_row_hand_written_estimator(normalize):
    """One draw: grads = Σ_ij ∇log q(z_ij)·(Q_ij − b_i − c̄)/s + the direct part (each
    latent weighted by its own downstream cost and its row's baseline; s = √v = 2.5 with
    normalize, else 1), and baseline_grads, the new state and the info by their
    definitions. (The exact tests cannot see a draw-independent change of the signal,
    e.g. (Q − b)/s written Q/s − b, or a baseline's sign: the mean is the same.)"""
    params, x, key = sbn_args()
    cbar, v, decay = 0.25, 6.25, 0.7
    state = state_of({"z": cbar}, {"z": v})
    phi = f64(PHI)
    nv = scg.baselines.nvil(sbn, sbn_baseline, decay=decay, normalize=normalize)
    g, g_phi, new, info = jax.jit(nv.update)(phi, state, params, x, key)

    z = jax.jit(scg.trace(sbn))(params, x, key).sites["z"].value.astype(jnp.float64)
    b = sbn_baseline(phi, params, x)["z"][:, 0]
    rows = sbn_row_costs(params, x, z)
    q = sbn_downstream(params, x, z)

    def hand(p):
        lq = log_bern(z, x @ p["W"] + p["c"])
        signal = lax.stop_gradient(q - b[:, None] - cbar) / (2.5 if normalize else 1.0)
        return jnp.mean(sbn_row_costs(p, x, z)) + jnp.sum(lq * signal)

    assert_close(g, jax.jit(jax.grad(hand))(params), rtol=1e-10, what="grads")
    assert_close(info.downstream["z"], q, what="downstream")
    loss = lambda ph: jnp.mean((q - cbar - sbn_baseline(ph, params, x)["z"]) ** 2)  # noqa: E731
    assert_close(g_phi, jax.grad(loss)(phi), what="baseline_grads")
    np.testing.assert_allclose(info.loss, loss(phi), rtol=1e-12)
    np.testing.assert_allclose(info.cost, jnp.mean(rows), rtol=1e-12)
    r = q - b[:, None]
    np.testing.assert_allclose(new.mean["z"], decay * cbar + (1 - decay) * r.mean(), rtol=1e-12)
    np.testing.assert_allclose(
        new.var["z"], decay * v + (1 - decay) * jnp.mean((r - cbar) ** 2), rtol=1e-12
    )
    assert info.aux is None


# ---------------------------------------------------------------------------------------
# Several nodes with different scales; a parameter with a direct path.
# ---------------------------------------------------------------------------------------


def chain(theta, key):
    """z1 ~ Bern(θ0), z2 ~ Bern(θ1 + z1); θ2 reaches the cost directly and through z1's
    density is not in play: c = (z1 + 2 z2 − θ2)² + θ0·z2."""
    k1, k2 = jax.random.split(key)
    z1 = scg.sample(k1, dist.Bernoulli(logits=theta[0]), name="z1").astype(theta.dtype)
    z2 = scg.sample(k2, dist.Bernoulli(logits=theta[1] + z1), name="z2").astype(theta.dtype)
    return (z1 + 2.0 * z2 - theta[2]) ** 2 + theta[0] * z2


def chain_parts(theta, key):
    """(through z1's density, through z2's density, direct) parts of ∇E[f], exactly."""
    args = (theta, key)
    _, draws, _ = enumerate_draws(chain, args)

    def part(which):
        def expected(th):
            def one(z):
                zf = jax.tree.map(lambda v: v.astype(th.dtype), z)
                p1 = jnp.exp(log_bern(zf["z1"], (th if which == 1 else theta)[0]))
                p2 = jnp.exp(log_bern(zf["z2"], (th if which == 2 else theta)[1] + zf["z1"]))
                c = scg.trace(chain, draws=z)(th if which == 0 else theta, key).cost
                return p1 * p2 * c

            return jnp.sum(jax.vmap(one)(draws))

        return jax.jit(jax.grad(expected))(theta)

    return part(1), part(2), part(0)


def test_per_node_scales_divide_each_nodes_part_of_the_gradient():
    """E[grads] = g_z1/s1 + g_z2/s2 + g_direct, the guarantee of normalize=True, for
    scales 2 and 5 and baselines (c̄ and learned) on both nodes."""
    theta = f64(np.array([0.4, -0.9, 0.7]))
    key = jax.random.key(0)
    state = state_of({"z1": 0.5, "z2": -1.0}, {"z1": 4.0, "z2": 25.0})

    def baselines(phi, theta):
        return {"z1": phi[0] * theta[2], "z2": phi[1]}

    phi = f64(np.array([1.3, 0.8]))
    got, _ = nvil_expectation(chain, baselines, phi, state, (theta, key), normalize=True)
    g1, g2, g0 = chain_parts(theta, key)
    assert_close(g1 + g2 + g0, exact_gradient(chain, (theta, key)), what="parts add up")
    assert all(float(jnp.max(jnp.abs(g))) > 1e-3 for g in (g1, g2, g0))
    assert_close(got, g1 / 2.0 + g2 / 5.0 + g0, what="E[grads] vs Σ g_w/s_w + g_direct")
    got_plain, _ = nvil_expectation(chain, baselines, phi, state, (theta, key))
    assert_close(got_plain, g1 + g2 + g0, what="E[grads] vs ∇E[f] (normalize=False)")


# ---------------------------------------------------------------------------------------
# A node in a scan: per-step baselines, reward-to-go targets.
# ---------------------------------------------------------------------------------------

T = 3
XS = np.array([0.5, -1.0, 1.5])


def rollout_by_hand(theta, xs, acts):
    """(rewards, logits) of the rollout at the actions `acts`."""

    def step(s, ax):
        a, x = ax
        logit = theta[0] * s + theta[1] * x
        s = 0.5 * s + a - 0.3 * x
        return s, ((s - theta[2] * x) ** 2, logit)

    return lax.scan(step, jnp.zeros((), theta.dtype), (acts, xs))[1]


def rollout(theta, xs, key):
    """A policy a_t ~ Bern(θ0·s_t + θ1·x_t) in a scan; the cost Σ_t r_t."""

    def step(s, kx):
        k, x = kx
        a = scg.sample(k, dist.Bernoulli(logits=theta[0] * s + theta[1] * x), name="a")
        s = 0.5 * s + a.astype(s.dtype) - 0.3 * x
        return s, (s - theta[2] * x) ** 2

    _, r = lax.scan(step, jnp.zeros((), theta.dtype), (jax.random.split(key, T), xs))
    return jnp.sum(r)


def rollout_baseline(phi, theta, xs):
    del theta
    return {"a": phi["t"] + phi["x"] * xs}  # (T,): one per step, from the inputs


ROLL_PHI = {"t": np.array([2.0, -0.5, 1.0]), "x": np.array(0.7)}


def test_scan_gradient_is_unbiased_and_baseline_regresses_reward_to_go():
    """A node in a scan with a per-step baseline b_t(x): E[grads] = ∇E[f], and
    E[baseline_grads] = ∇_φ E[mean_t((G_t − c̄ − b_t)²)] with G_t = Σ_{u≥t} r_u (the
    downstream cost under causality), written out by hand."""
    theta = f64(np.array([0.8, -0.6, 0.4]))
    xs = f64(XS)
    args = (theta, xs, jax.random.key(1))
    cbar = -0.2
    state = state_of({"a": cbar}, {"a": 1.0})
    phi = f64(ROLL_PHI)
    got, got_phi = nvil_expectation(rollout, rollout_baseline, phi, state, args)
    assert_close(got, exact_gradient(rollout, args), what="E[grads] vs ∇E[f]")
    _, draws, _ = enumerate_draws(rollout, args)

    def expected_loss(ph):
        def one(z):
            acts = z["a"].astype(jnp.float64)
            r, logits = rollout_by_hand(theta, xs, acts)
            p = jnp.exp(jnp.sum(log_bern(acts, logits)))
            togo = jnp.cumsum(r[::-1])[::-1]
            return p * jnp.mean((togo - cbar - rollout_baseline(ph, theta, xs)["a"]) ** 2)

        return jnp.sum(jax.vmap(one)(draws))

    want_phi = jax.jit(jax.grad(expected_loss))(phi)
    assert all(float(jnp.max(jnp.abs(w))) > 1e-3 for w in jax.tree.leaves(want_phi))
    assert_close(got_phi, want_phi, what="E[baseline_grads]")


# ---------------------------------------------------------------------------------------
# The checker notices a broken rule.
# ---------------------------------------------------------------------------------------


def test_exact_check_notices_a_baseline_that_depends_on_the_draw():
    """The same machinery with a baseline that follows the draw (a closure over the
    replayed z, which nvil's baseline_fn cannot see otherwise) is biased, and the exact
    comparison says so: the tests above would fail for such a rule."""
    args = sbn_args()
    state = state_of({"z": 0.0}, {"z": 0.0})

    def at(z):
        def leaky(phi, params, x):
            del phi, params, x
            return {"z": 0.3 * z["z"].astype(jnp.float64)}  # depends on the draw

        return scg.baselines.nvil(sbn, leaky, draws=z).update(None, state, *args)[0]

    got = exact_expectation(sbn, args, at)
    want = exact_gradient(sbn, args)
    assert float(jnp.max(jnp.abs(got["W"] - want["W"]))) > 1e-3


def test_baseline_fn_that_draws_is_refused():
    params, x, key = sbn_args()

    def drawing(phi, params, x):
        k = jax.random.key(3)
        return {"z": scg.sample(k, dist.Normal(0.0, 1.0), (B, 1)) + phi}

    nv = scg.baselines.nvil(sbn, drawing)
    with pytest.raises(ValueError, match="baseline_fn draws with scg.sample"):
        nv.update(jnp.zeros(()), nv.init(params, x, key), params, x, key)


def test_baseline_fn_sees_the_inputs_but_not_the_key():
    params, x, key = sbn_args()
    seen = []

    def spy(phi, *inputs):
        seen.append(len(inputs))
        assert not any(
            isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jax.dtypes.prng_key)
            for a in inputs
        )
        return {"z": phi}

    nv = scg.baselines.nvil(sbn, spy)
    jax.jit(nv.update)(jnp.zeros((B, 1)), nv.init(params, x, key), params, x, key)
    assert seen and set(seen) == {2}


# ---------------------------------------------------------------------------------------
# Composition: jit, vmap, has_aux, argnums, key position.
# ---------------------------------------------------------------------------------------


def test_update_under_jit_and_vmap_equals_eager():
    params, x, key = sbn_args()
    nv = scg.baselines.nvil(sbn, sbn_baseline, normalize=True)
    state = state_of({"z": 0.4}, {"z": 3.0})
    phi = f64(PHI)
    eager = nv.update(phi, state, params, x, key)
    jf = jax.jit(nv.update)
    jitted = jf(phi, state, params, x, key)
    assert_close(jitted[:3], eager[:3], rtol=1e-12, what="jit")
    keys = jax.random.split(key, 3)
    batched = jax.jit(jax.vmap(nv.update, (None, None, None, None, 0)))(phi, state, params, x, keys)
    for i, k in enumerate(keys):
        one = jf(phi, state, params, x, k)
        assert_close(jax.tree.map(lambda a: a[i], batched[:3]), one[:3], rtol=1e-12, what="vmap")


def test_vmapped_rows_inside_the_program_get_their_own_baselines():
    """The same SBN written per row under jax.vmap: the node has shape (B, H) at the top
    level and the (B, 1) baselines align with its rows, so the estimate is the one of
    the vectorized program, for the same key."""

    def per_row(params, x, key):
        def row(xi, k):
            zi = scg.sample(k, dist.Bernoulli(logits=xi @ params["W"] + params["c"]), name="z")
            return sbn_row_costs(params, xi[None], zi.astype(xi.dtype)[None])[0]

        return jnp.mean(jax.vmap(row)(x, jax.random.split(key, B)))

    def vectorized(params, x, key):
        ks = jax.random.split(key, B)
        z = jax.vmap(
            lambda xi, k: scg.sample(
                k, dist.Bernoulli(logits=xi @ params["W"] + params["c"]), name="z"
            )
        )(x, ks)
        return jnp.mean(sbn_row_costs(params, x, z.astype(x.dtype)))

    params, x, key = sbn_args()
    state = state_of({"z": 0.2}, {"z": 4.0})
    got = jax.jit(scg.baselines.nvil(per_row, sbn_baseline, normalize=True).update)(
        f64(PHI), state, params, x, key
    )
    want = jax.jit(scg.baselines.nvil(vectorized, sbn_baseline, normalize=True).update)(
        f64(PHI), state, params, x, key
    )
    assert_close(got[:3], want[:3], rtol=1e-10, what="per-row vs vectorized")
    args = (params, x, key)
    exact = nvil_expectation(
        per_row, sbn_baseline, f64(PHI), state_of({"z": 0.2}, {"z": 0.0}), args
    )
    assert_close(exact[0], exact_gradient(per_row, args), what="E[grads] vs ∇E[f]")


def test_has_aux_argnums_and_key_position():
    def f(key, x, params):
        c = sbn(params, x, key)
        return c, {"twice": 2 * c}

    params, x, key = sbn_args()
    nv = scg.baselines.nvil(
        f, lambda phi, x, params: sbn_baseline(phi, params, x), argnums=(2,), has_aux=True,
        key_argnum=0,
    )  # fmt: skip
    state = nv.init(key, x, params)
    (g,), g_phi, new, info = jax.jit(nv.update)(f64(PHI), state, key, x, params)
    ref = jax.jit(scg.baselines.nvil(sbn, sbn_baseline).update)(f64(PHI), state, params, x, key)
    assert_close(g, ref[0], rtol=1e-12, what="grads")
    assert_close(g_phi, ref[1], rtol=1e-12, what="baseline_grads")
    np.testing.assert_allclose(info.aux["twice"], 2 * info.cost)


def test_init_has_one_zero_entry_per_score_node():
    theta = f64(np.array([0.4, -0.9, 0.7]))
    state = scg.baselines.nvil(chain, lambda phi, th: {}).init(theta, jax.random.key(0))
    assert sorted(state.mean) == sorted(state.var) == ["z1", "z2"]
    assert all(float(v) == 0.0 for v in jax.tree.leaves(state))


def test_without_baselines_and_centring_it_is_scg_grad():
    params, x, key = sbn_args()
    nv = scg.baselines.nvil(sbn, lambda phi, params, x: {}, center=False)
    g, g_phi, _, info = jax.jit(nv.update)(None, nv.init(params, x, key), params, x, key)
    g_ref, q = jax.jit(scg.scg_grad(sbn, downstream=True))(params, x, key)
    assert_close(g, g_ref, rtol=1e-12, what="grads")
    assert_close(info.downstream, q, rtol=1e-12, what="downstream")
    assert g_phi is None and float(info.loss) == 0.0


def test_training_loop_with_optax_reduces_the_regression_loss():
    """A short Optax loop on both parameter sets (float32, jit): the regression loss
    falls and the statistics track the downstream costs."""
    import optax

    params = jax.tree.map(lambda a: np.asarray(a, np.float32), sbn_params())
    with jax.enable_x64(False):
        params = jax.tree.map(jnp.asarray, params)
        x = jnp.asarray(X, jnp.float32)
        nv = scg.baselines.nvil(sbn, sbn_baseline, normalize=True)
        phi = {"w": jnp.zeros((D, 1)), "b": jnp.zeros(1)}
        state = nv.init(params, x, jax.random.key(0))
        opt, opt_b = optax.adam(1e-2), optax.adam(5e-2)
        s, s_b = opt.init(params), opt_b.init(phi)

        @jax.jit
        def step(params, phi, state, s, s_b, key):
            g, g_phi, state, info = nv.update(phi, state, params, x, key)
            u, s = opt.update(g, s)
            u_b, s_b = opt_b.update(g_phi, s_b)
            return (
                optax.apply_updates(params, u),
                optax.apply_updates(phi, u_b),
                state,
                s,
                s_b,
                info,
            )

        losses = []
        for k in jax.random.split(jax.random.key(1), 200):
            params, phi, state, s, s_b, info = step(params, phi, state, s, s_b, k)
            losses.append(float(info.loss))
        assert np.mean(losses[-20:]) < 0.2 * np.mean(losses[:5])
        assert state.mean["z"].dtype == jnp.float32


# ---------------------------------------------------------------------------------------
# Clear errors.
# ---------------------------------------------------------------------------------------


def _update(f, baseline_fn, phi, args, **options):
    nv = scg.baselines.nvil(f, baseline_fn, **options)
    return nv.update(phi, nv.init(*args), *args)


def test_wrong_baseline_shape_is_refused():
    with pytest.raises(ValueError, match=r"baseline for 'z' has shape \(3, 1\).*\(2, 2\)"):
        _update(sbn, lambda phi, p, x: {"z": jnp.zeros((3, 1))}, None, sbn_args())
    with pytest.raises(ValueError, match=r"shape \(2, 2, 1\)"):  # broadcasts, but grows it
        _update(sbn, lambda phi, p, x: {"z": jnp.zeros((2, 2, 1))}, None, sbn_args())


def test_unknown_node_name_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match=r"\['zz'\].*score-function sites are \['z'\]"):
        _update(sbn, lambda phi, p, x: {"zz": 0.0}, None, sbn_args())


def test_baseline_for_a_pathwise_node_is_refused():
    def f(theta, key):
        k1, k2 = jax.random.split(key)
        z = scg.sample(k1, dist.Bernoulli(logits=theta[0]), name="z").astype(theta.dtype)
        y = scg.sample(k2, dist.Normal(theta[1] * z, 1.0), name="y")
        return (y - 1.0) ** 2

    args = (f64(np.array([0.3, 0.5])), jax.random.key(0))
    with pytest.raises(ValueError, match=r"\['y'\], which are not score-function sites"):
        _update(f, lambda phi, th: {"y": 0.0}, None, args)


def test_baseline_fn_must_return_a_dict():
    with pytest.raises(TypeError, match="must return a dict"):
        _update(sbn, lambda phi, p, x: jnp.zeros((2, 1)), None, sbn_args())
    with pytest.raises(TypeError, match="must be a function"):
        scg.baselines.nvil(sbn, {"z": 0.0})  # type: ignore[arg-type]


def test_program_with_its_own_baseline_is_refused():
    def f(params, x, key):
        logits = x @ params["W"] + params["c"]
        z = scg.sample(key, dist.Bernoulli(logits=logits), baseline=1.0, name="z")
        return jnp.mean(sbn_row_costs(params, x, z.astype(x.dtype)))

    with pytest.raises(ValueError, match=r"\['z'\] of f have a baseline= of their own"):
        scg.baselines.nvil(f, lambda phi, p, x: {}).init(*sbn_args())


def test_state_of_another_program_is_refused():
    state = state_of({"a": 0.0}, {"a": 0.0})
    with pytest.raises(ValueError, match=r"state has entries for \['a'\].*sites are \['z'\]"):
        scg.baselines.nvil(sbn, sbn_baseline).update(f64(PHI), state, *sbn_args())
    with pytest.raises(TypeError, match="must be an NVILState"):
        scg.baselines.nvil(sbn, sbn_baseline).update(f64(PHI), {"z": 0.0}, *sbn_args())


def test_enumerated_sites_are_refused():
    def f(theta, key):
        z = scg.sample(key, dist.Bernoulli(logits=theta), estimator="enum", name="z")
        return (z - 0.3) ** 2

    with pytest.raises(ValueError, match="scg.baselines.nvil are not supported yet"):
        scg.baselines.nvil(f, lambda phi, th: {}).init(jnp.array(0.2), jax.random.key(0))


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="decay"):
        scg.baselines.nvil(sbn, sbn_baseline, decay=1.0)
    with pytest.raises(TypeError, match="key_argnum"):
        scg.baselines.nvil(sbn, sbn_baseline, key_argnum="key")  # type: ignore[arg-type]
    nv = scg.baselines.nvil(sbn, sbn_baseline, key_argnum=0)
    with pytest.raises(TypeError, match="key_argnum=0 must be a single PRNG key"):
        nv.init(*sbn_args())
