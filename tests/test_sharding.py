"""Multi-device estimation (issue 8): Explicit and Auto meshes, `shard_map`, `pmap`.

The suite's processes have four CPU devices (tests/conftest.py). Three kinds of check:

* **Same key, same estimator** as the hand-written DiCE surrogate under the same
  sharding: `jit(scg_grad(f))` on sharded data and keys, and `scg_grad` *inside* a
  `shard_map` body (the data-parallel step) with `check_vma=True`, including costs that
  couple the shards through `pmean` and baselines.
* **Exact** (float64, enumerating every joint draw): samples drawn *inside* a
  `shard_map` or `pmap` body within `scg_grad`, with costs returned per shard, reduced by
  `psum`/`pmean` or gathered; gradient and Hessian.
* **Plates across shards**: per-row costs of rows drawn on different shards keep per-row
  weights (same key as the hand-written per-row estimator, and far from the whole-batch
  one), and a key that is the same on every shard is refused.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import scgjax as scg

try:
    from .exact import assert_exact
except ImportError:  # tests/ is not a package
    from exact import assert_exact

CPUS = jax.devices("cpu")
pytestmark = pytest.mark.skipif(len(CPUS) < 4, reason="needs 4 CPU devices (conftest.py)")


def _mesh(shape, names, axis_type=AxisType.Auto):
    n = int(np.prod(shape))
    return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape), devices=CPUS[:n])


def _box(t):
    return jnp.exp(t - lax.stop_gradient(t))


W = jnp.array([0.3, -0.2, 0.5])
X = jnp.linspace(-1.0, 1.0, 24).reshape(8, 3)


# -- jit on Explicit and Auto meshes ---------------------------------------------------------


def _rows(w, x, keys):
    def row(k, xi):
        k1, k2 = jax.random.split(k)
        z = scg.sample(k1, dist.Bernoulli(logits=xi @ w)).astype(x.dtype)
        n = scg.sample(k2, dist.Normal(xi @ w, 1.0))  # an unbatched scale
        return (z - 0.3) ** 2 + n**2 * z

    return jnp.mean(jax.vmap(row)(keys, x))


def _rows_hand(w, x, keys):
    def row(k, xi):
        k1, k2 = jax.random.split(k)
        logits = xi @ w
        z = dist.Bernoulli(logits=lax.stop_gradient(logits)).sample(k1).astype(x.dtype)
        n = dist.Normal(logits, 1.0).rsample(k2)
        return _box(dist.Bernoulli(logits=logits).log_prob(z)) * ((z - 0.3) ** 2 + n**2 * z)

    return jnp.mean(jax.vmap(row)(keys, x))


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
def test_jit_on_a_mesh_with_sharded_data_and_keys(axis_type):
    mesh = _mesh((4,), ("d",), axis_type)
    with jax.set_mesh(mesh):
        x = jax.device_put(X, NamedSharding(mesh, P("d")))
        keys = jax.device_put(jax.random.split(jax.random.key(0), 8), NamedSharding(mesh, P("d")))
        ours = jax.jit(scg.scg_grad(_rows))(W, x, keys)
        hand = jax.jit(jax.grad(_rows_hand))(W, x, keys)
        np.testing.assert_allclose(ours, hand, rtol=1e-5)
        assert float(jnp.max(jnp.abs(hand))) > 0.1
        # One draw per site, where the program makes it: the surrogate's value is the
        # program's cost for the same keys under this sharding.
        np.testing.assert_allclose(
            jax.jit(scg.surrogate(_rows))(W, x, keys), jax.jit(_rows)(W, x, keys), rtol=1e-6
        )
        np.testing.assert_allclose(jax.jit(_rows)(W, x, keys), jax.jit(_rows_hand)(W, x, keys))


def test_a_draw_keeps_its_sharding_on_an_explicit_mesh():
    """`sample`'s abstract evaluation gives the draw the sharding the draw itself has (it
    used to drop it, and a vmapped draw with an unbatched operand could not be traced)."""
    mesh = _mesh((4,), ("d",), AxisType.Explicit)
    with jax.set_mesh(mesh):
        x = jax.device_put(X, NamedSharding(mesh, P("d")))

        def draw(w, x, key, sample):
            keys = jax.sharding.reshard(jax.random.split(key, 8), P("d"))
            z = jax.vmap(lambda xi, k: sample(k, dist.Bernoulli(logits=xi @ w)))(x, keys)
            assert jax.typeof(z).sharding.spec == P("d")
            return z

        z = jax.jit(draw, static_argnums=3)(W, x, jax.random.key(1), scg.sample)
        plain = jax.jit(draw, static_argnums=3)(W, x, jax.random.key(1), lambda k, d: d.sample(k))
        np.testing.assert_array_equal(z, plain)


# -- scg_grad inside a shard_map body --------------------------------------------------------


def _loss(kind):
    def loss(w, x, key):
        b = 0.2 * jnp.ones(x.shape[0]) if kind == "baseline" else None
        z = scg.sample(key, dist.Bernoulli(logits=x @ w), baseline=b).astype(x.dtype)
        per_shard = jnp.mean((z - 0.3) ** 2 * (x @ w))
        if kind == "per shard":
            return per_shard
        return lax.pmean(per_shard, "d") ** 2 + lax.pmean(jnp.mean(z * x[:, 0]), "d")

    return loss


def _loss_hand(kind):
    def loss(w, x, key):
        logits = x @ w
        z = dist.Bernoulli(logits=lax.stop_gradient(logits)).sample(key).astype(x.dtype)
        lp = dist.Bernoulli(logits=logits).log_prob(z)
        c = (z - 0.3) ** 2 * logits
        if kind == "per shard":
            return jnp.mean(_box(lp) * c)
        # The pmean'd square depends on every shard's draws; the linear part on each
        # row's own draw; each shard's baseline terms join the global surrogate.
        out = _box(lax.psum(jnp.sum(lp), "d")) * lax.pmean(jnp.mean(c), "d") ** 2
        out = out + lax.pmean(jnp.mean(_box(lp) * z * x[:, 0]), "d")
        if kind == "baseline":
            out = out + lax.psum(jnp.sum((1.0 - _box(lp)) * 0.2), "d")
        return out

    return loss


@pytest.mark.parametrize("kind", ["per shard", "pmean", "baseline"])
def test_scg_grad_inside_shard_map_is_the_hand_written_surrogate(kind):
    mesh = _mesh((4,), ("d",))

    def step(grad):
        @partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("d"), P()), out_specs=P())
        def body(w, x, key):
            key = jax.random.fold_in(key, lax.axis_index("d"))
            return lax.pmean(grad(w, x, key), "d")

        return jax.jit(body)

    ours = step(scg.scg_grad(_loss(kind)))(W, X, jax.random.key(0))
    hand = step(jax.grad(_loss_hand(kind)))(W, X, jax.random.key(0))
    np.testing.assert_allclose(ours, hand, rtol=1e-5)
    assert float(jnp.max(jnp.abs(hand))) > 1e-2


# -- Samples inside a shard_map or pmap body, within scg_grad: exact -------------------------

XE = jnp.array([[0.5, -1.0], [1.5, 0.3], [-0.7, 0.8], [0.2, 0.4]])
THETA = jnp.array([0.4, -0.3])


def _rows_out(th, x, key):  # per-row costs leave the body sharded; a nonlinear total
    @partial(jax.shard_map, mesh=_mesh((2,), ("d",)), in_specs=(P(), P("d"), P()), out_specs=P("d"))
    def body(th, xb, key):
        key = jax.random.fold_in(key, lax.axis_index("d"))
        z = scg.sample(key, dist.Bernoulli(logits=xb @ th)).astype(xb.dtype)
        return (z - xb[:, 0]) ** 2 * (xb @ th)

    c = body(th, x, key)
    return jnp.sum(c) + 0.1 * jnp.sum(c[:2]) * jnp.sum(c[2:])


def _pmeaned(th, x, key):  # the cost couples the shards inside the body
    @partial(jax.shard_map, mesh=_mesh((2,), ("d",)), in_specs=(P(), P("d"), P()), out_specs=P())
    def body(th, xb, key):
        key = jax.random.fold_in(key, lax.axis_index("d"))
        z = scg.sample(key, dist.Bernoulli(logits=xb @ th)).astype(xb.dtype)
        m = lax.pmean(jnp.mean((z - 0.3) ** 2 * (xb @ th)), "d")
        return m**2 + lax.pmean(jnp.mean(z * xb[:, 0]), "d")

    return body(th, x, key)


def _pmapped(th, x, key):  # pmap lowers to a shard_map with check_vma=False
    def body(th, xb, k):
        z = scg.sample(k, dist.Bernoulli(logits=xb @ th)).astype(xb.dtype)
        return lax.psum(jnp.sum(z * xb[:, 1]), "i") * jnp.sum(z) + z

    out = jax.pmap(body, axis_name="i", in_axes=(None, 0, 0), devices=CPUS[:2])(
        th, x.reshape(2, 2, 2), jax.random.split(key, 2)
    )
    return jnp.sum(out**2)


def _two_axes(th, x, key):  # a 2×2 mesh, one row per shard, reduced over both axes
    mesh = _mesh((2, 2), ("a", "b"))

    @partial(jax.shard_map, mesh=mesh, in_specs=(P(), P(("a", "b")), P()), out_specs=P("b"))
    def body(th, xb, key):
        i = lax.axis_index("a") * 2 + lax.axis_index("b")
        z = scg.sample(jax.random.fold_in(key, i), dist.Bernoulli(logits=xb @ th))
        c = (z.astype(xb.dtype) - xb[:, 0]) ** 2
        out = lax.psum(jnp.sum(c), ("a", "b")) + lax.psum(jnp.sum(c * (xb @ th)), "a") ** 2
        return out[None]  # one value per shard along "b"

    return jnp.sum(body(th, x, key) ** 2)


def _gathered(th, x, key):  # all_gather'd per-shard draws, a cost outside
    @partial(
        jax.shard_map,
        mesh=_mesh((2,), ("d",)),
        in_specs=(P(), P("d"), P()),
        out_specs=P(),
        check_vma=False,  # all_gather's result is typed varying
    )
    def body(th, xb, key):
        z = scg.sample(jax.random.fold_in(key, lax.axis_index("d")), dist.Bernoulli(logits=xb @ th))
        return lax.all_gather(z.astype(xb.dtype) * (xb @ th), "d")

    g = body(th, x, key)
    return jnp.sum(g[0] ** 2) + jnp.sum(g[1]) * g[0, 1]


def _drawn_outside(th, x, key):  # no sample inside: the cost's terms pass through
    z = scg.sample(key, dist.Bernoulli(logits=x @ th)).astype(x.dtype)

    @partial(jax.shard_map, mesh=_mesh((2,), ("d",)), in_specs=(P("d"), P("d")), out_specs=P("d"))
    def body(z, x):
        return (z - x[:, 0]) ** 2 + z * x[:, 1]

    return jnp.sum(body(z, x) ** 2)


def _reordered(th, x, key):  # rows drawn in ("a", "b") order, returned in ("b", "a") order
    mesh = _mesh((2, 2), ("a", "b"))

    @partial(jax.shard_map, mesh=mesh, in_specs=(P(), P(("a", "b")), P()), out_specs=P(("b", "a")))
    def body(th, xb, key):
        i = lax.axis_index("a") * 2 + lax.axis_index("b")
        z = scg.sample(jax.random.fold_in(key, i), dist.Bernoulli(logits=xb @ th))
        return (z.astype(xb.dtype) - 0.3) ** 2 * (xb @ th) ** 2

    c = body(th, x, key)  # element g is not row g's
    return jnp.sum(c * jnp.arange(1.0, 1.0 + c.shape[0]))


def _blocks_outside(th, x, key):  # drawn outside; each shard's block becomes a row
    z = scg.sample(key, dist.Bernoulli(logits=x @ th)).astype(x.dtype)

    @partial(jax.shard_map, mesh=_mesh((2,), ("d",)), in_specs=P("d"), out_specs=P("d"))
    def body(zb):
        return zb[None, :]  # (1, 2) per shard: row s is shard s's block

    rows = body(z)  # rows[s, r] is z[2 s + r], not z[r]
    return jnp.sum((rows - 0.3) ** 2 * x[:, 0].reshape(2, 2)) + jnp.sum(rows * th[0])


def _in_a_scan(th, x, key):  # the carry (every shard's cost) feeds the next step's logits
    @partial(
        jax.shard_map, mesh=_mesh((2,), ("d",)), in_specs=(P(), P("d"), P(), P()), out_specs=P("d")
    )
    def body(th, xb, key, c):
        key = jax.random.fold_in(key, lax.axis_index("d"))
        z = scg.sample(key, dist.Bernoulli(logits=xb @ th + 2.0 * c)).astype(xb.dtype)
        return jnp.sum((z - xb[:, 0]) ** 2 * (xb @ th))[None]  # one cost per shard

    def step(c, t):
        out = body(th, x, jax.random.fold_in(key, t), c)
        return c + jnp.sum(out), out

    _, ys = lax.scan(step, 0.0, jnp.arange(2))
    return jnp.sum(ys)


def _scan_in_body(th, x, key):  # check_vma=True, a varying carry
    @partial(jax.shard_map, mesh=_mesh((2,), ("d",)), in_specs=(P(), P("d"), P()), out_specs=P("d"))
    def body(th, xb, key):
        key = jax.random.fold_in(key, lax.axis_index("d"))

        def step(c, t):
            k = jax.random.fold_in(key, t)
            z = scg.sample(k, dist.Bernoulli(logits=xb @ th + c)).astype(xb.dtype)
            return c + z, (z - xb[:, 0]) ** 2

        c, ys = lax.scan(
            step, lax.pcast(jnp.zeros(xb.shape[0]), ("d",), to="varying"), jnp.arange(2)
        )
        return ys.sum(0) * c

    c = body(th, x, key)
    return jnp.sum(c) + 0.2 * c[0] * c[3]


def _psum_added_back(th, x, key):  # JAX casts the psum back to varying (pvary)
    @partial(jax.shard_map, mesh=_mesh((2,), ("d",)), in_specs=(P(), P("d"), P()), out_specs=P("d"))
    def body(th, xb, key):
        key = jax.random.fold_in(key, lax.axis_index("d"))
        z = scg.sample(key, dist.Bernoulli(logits=xb @ th)).astype(xb.dtype)
        c = (z - xb[:, 0]) ** 2 * (xb @ th)
        return c + 0.3 * lax.psum(jnp.sum(c), "d")

    return jnp.sum(body(th, x, key))


def _reversed_blocks_outside(th, x, key):  # a running sum made outside, each block reversed
    z = scg.sample(key, dist.Bernoulli(logits=x @ th)).astype(x.dtype)
    running = jnp.cumsum(z * x[:, 1])  # element i depends on draws <= i

    @partial(jax.shard_map, mesh=_mesh((2,), ("d",)), in_specs=P("d"), out_specs=P("d"))
    def body(rb):
        return rb[::-1]  # within a block only: not a reversal of the whole axis

    return jnp.sum(jnp.sin(body(running)) * x[:, 0]) + jnp.sum(z * th[0])


@pytest.mark.parametrize(
    "f",
    [
        _reversed_blocks_outside,
        _in_a_scan,
        _scan_in_body,
        _psum_added_back,
        _rows_out,
        _pmeaned,
        _pmapped,
        _two_axes,
        _reordered,
        _gathered,
        _drawn_outside,
        _blocks_outside,
    ],
    ids=lambda f: f.__name__,
)
def test_samples_inside_shard_map_exact(f):
    # The Hessian for the four that exercise each layout and collective; the first
    # derivative for the rest (the suite's time budget).
    hessian = f in (_rows_out, _pmeaned, _pmapped, _two_axes)
    assert_exact(f, THETA, extra_args=(XE,), hessian=hessian)


# -- Plates across shards ----------------------------------------------------------------------

XA = jax.random.normal(jax.random.key(3), (16, 3))
THA = jnp.array([0.4, -0.3, 0.2])


def _per_row_cost(z, x, th):
    return (z - x[:, 0]) ** 2 * (x @ th)


def _rows_sharded(th, x, key):
    @partial(jax.shard_map, mesh=_mesh((4,), ("d",)), in_specs=(P(), P("d"), P()), out_specs=P("d"))
    def body(th, xb, key):
        key = jax.random.fold_in(key, lax.axis_index("d"))
        z = scg.sample(key, dist.Bernoulli(logits=xb @ th)).astype(xb.dtype)
        return _per_row_cost(z, xb, th)

    return jnp.sum(body(th, x, key))


def _rows_psummed(th, x, key):
    @partial(jax.shard_map, mesh=_mesh((4,), ("d",)), in_specs=(P(), P("d"), P()), out_specs=P())
    def body(th, xb, key):
        key = jax.random.fold_in(key, lax.axis_index("d"))
        z = scg.sample(key, dist.Bernoulli(logits=xb @ th)).astype(xb.dtype)
        return lax.psum(jnp.sum(_per_row_cost(z, xb, th)), "d")

    return body(th, x, key)


def _rows_pmapped(th, x, key):
    def body(th, xb, k):
        z = scg.sample(k, dist.Bernoulli(logits=xb @ th)).astype(xb.dtype)
        return _per_row_cost(z, xb, th)

    out = jax.pmap(body, in_axes=(None, 0, 0), devices=CPUS[:4])(
        th, x.reshape(4, 4, 3), jax.random.split(key, 4)
    )
    return jnp.sum(out)


def _rows_drawn_outside(th, x, key):  # drawn outside, each row's cost inside
    z = scg.sample(key, dist.Bernoulli(logits=x @ th)).astype(x.dtype)

    @partial(
        jax.shard_map, mesh=_mesh((4,), ("d",)), in_specs=(P("d"), P("d"), P()), out_specs=P("d")
    )
    def body(zb, xb, th):
        return _per_row_cost(zb, xb, th)

    return jnp.sum(body(z, x, th))


@pytest.mark.parametrize(
    "f",
    [_rows_sharded, _rows_psummed, _rows_pmapped, _rows_drawn_outside],
    ids=lambda f: f.__name__,
)
def test_rows_drawn_on_different_shards_keep_per_row_weights(f):
    key = jax.random.key(0)
    (site,) = jax.jit(scg.trace(f))(THA, XA, key).sites.values()
    z = jnp.asarray(site.value, XA.dtype).reshape(-1)

    def hand(th, per_row):
        lp = dist.Bernoulli(logits=XA @ th).log_prob(z)
        c = _per_row_cost(z, XA, th)
        if per_row:
            return jnp.sum(_box(lp) * c)
        return _box(jnp.sum(lp)) * jnp.sum(c)

    ours = jax.jit(scg.scg_grad(f))(THA, XA, key)
    np.testing.assert_allclose(ours, jax.grad(hand)(THA, True), rtol=1e-4, atol=1e-5)
    assert float(jnp.max(jnp.abs(ours - jax.grad(hand)(THA, False)))) > 1e-1


# -- Keys ---------------------------------------------------------------------------------------


def test_a_key_that_is_the_same_on_every_shard_is_refused():
    @partial(jax.shard_map, mesh=_mesh((4,), ("d",)), in_specs=(P(), P("d"), P()), out_specs=P())
    def body(th, xb, key):  # every shard draws from `key` itself
        z = scg.sample(key, dist.Bernoulli(logits=xb @ th)).astype(xb.dtype)
        return lax.psum(jnp.sum(z), "d")

    with pytest.raises(ValueError, match=r"same on every shard along mesh axis 'd'.*fold_in"):
        scg.scg_grad(body)(THA, XA, jax.random.key(0))


def test_a_key_folded_with_one_mesh_axis_of_two_is_refused():
    @partial(
        jax.shard_map,
        mesh=_mesh((2, 2), ("a", "b")),
        in_specs=(P(), P(("a", "b")), P()),
        out_specs=P(),
    )
    def body(th, xb, key):
        key = jax.random.fold_in(key, lax.axis_index("a"))  # the same along "b"
        z = scg.sample(key, dist.Bernoulli(logits=xb @ th)).astype(xb.dtype)
        return lax.psum(jnp.sum(z), ("a", "b"))

    with pytest.raises(ValueError, match=r"mesh axis 'b'"):
        scg.scg_grad(body)(THA, XA, jax.random.key(0))


def test_a_key_consumed_twice_inside_a_shard_map_body_is_refused():
    @partial(jax.shard_map, mesh=_mesh((4,), ("d",)), in_specs=(P(), P("d"), P()), out_specs=P())
    def body(th, xb, key):
        key = jax.random.fold_in(key, lax.axis_index("d"))
        z1 = scg.sample(key, dist.Bernoulli(logits=xb @ th)).astype(xb.dtype)
        z2 = scg.sample(key, dist.Bernoulli(logits=xb @ th)).astype(xb.dtype)
        return lax.psum(jnp.sum(z1 * z2), "d")

    with pytest.raises(ValueError, match="PRNG key reuse"):
        scg.scg_grad(body)(THA, XA, jax.random.key(0))


def test_per_shard_keys_consumed_outside_the_shard_map_too_are_refused():
    def f(th, x, key):
        keys = jax.random.split(key, 4)

        @partial(
            jax.shard_map, mesh=_mesh((4,), ("d",)), in_specs=(P(), P("d"), P("d")), out_specs=P()
        )
        def body(th, xb, k):
            z = scg.sample(k[0], dist.Bernoulli(logits=xb @ th)).astype(xb.dtype)
            return lax.psum(jnp.sum(z), "d")

        again = scg.sample(keys[0], dist.Bernoulli(logits=th[0])).astype(x.dtype)
        return body(th, x, keys) * again

    with pytest.raises(ValueError, match="PRNG key reuse"):
        scg.scg_grad(f)(THA, XA, jax.random.key(0))


# -- Particles sharded across devices ----------------------------------------------------------


def _particle_loss(w, x, key):
    z = scg.sample(key, dist.Bernoulli(logits=x @ w)).astype(x.dtype)
    return jnp.mean((z - 0.3) ** 2 * (x @ w)) ** 2


@pytest.mark.parametrize("axis_type", [AxisType.Explicit], ids=["explicit"])
def test_leave_one_out_over_particles_sharded_across_devices_is_the_one_device_estimator(
    axis_type,
):
    options = dict(num_samples=8, baseline="leave_one_out")
    key = jax.random.key(0)
    one = jax.jit(scg.scg_grad(_particle_loss, **options))(W, X, key)
    with jax.set_mesh(_mesh((4,), ("p",), axis_type)):
        g = jax.jit(scg.scg_grad(_particle_loss, particle_axes="p", **options))
        np.testing.assert_allclose(g(W, X, key), one, rtol=1e-5)
        assert "sharding" in g.lower(W, X, key).as_text()
        with pytest.raises(ValueError, match="mesh axes \\['q'\\]"):
            scg.scg_grad(_particle_loss, particle_axes="q", **options)(W, X, key)
    assert float(jnp.max(jnp.abs(one))) > 1e-4


def test_a_shared_key_in_a_scan_or_cond_in_the_body_is_refused():
    def body(th, xb, key):
        def step(c, xr):  # `key` is a scan constant: the same on every shard
            z = scg.sample(key, dist.Bernoulli(logits=th[0])).astype(xb.dtype)
            return c + z * xr[0], None

        c, _ = lax.scan(step, 0.0, xb[:1])
        return lax.psum(c, "d") ** 2

    f = jax.shard_map(
        body, mesh=_mesh((2,), ("d",)), in_specs=(P(), P("d"), P()), out_specs=P(), check_vma=False
    )
    with pytest.raises(ValueError, match="same on every shard"):
        scg.scg_grad(f)(THETA, XE, jax.random.key(0))


def test_a_shared_key_for_a_pathwise_draw_is_accepted():
    @partial(jax.shard_map, mesh=_mesh((2,), ("d",)), in_specs=(P(), P("d"), P()), out_specs=P())
    def f(th, xb, key):  # common noise on every shard: the pathwise gradient is right
        n = scg.sample(key, dist.Normal(th[0], 1.0))
        return lax.psum(jnp.sum(n * xb[:, 0]), "d")

    g = jax.jit(scg.scg_grad(f))(THETA, XE, jax.random.key(0))
    np.testing.assert_allclose(g, [float(jnp.sum(XE[:, 0])), 0.0], rtol=1e-6)


def test_a_shard_map_inside_a_shard_map_with_draws_is_refused():
    mesh = _mesh((2, 2), ("a", "b"))

    def f(th, x, key):
        @partial(
            jax.shard_map, mesh=mesh, in_specs=(P(), P("a"), P()), out_specs=P(), axis_names={"a"}
        )
        def outer(th, xa, key):
            key = jax.random.fold_in(key, lax.axis_index("a"))

            @partial(jax.shard_map, in_specs=(P(), P("b"), P()), out_specs=P(), axis_names={"b"})
            def inner(th, xb, key):
                key = jax.random.fold_in(key, lax.axis_index("b"))
                z = scg.sample(key, dist.Bernoulli(logits=xb @ th)).astype(xb.dtype)
                return lax.psum(jnp.sum(z), "b")

            return lax.psum(inner(th, xa, key), "a")

        return jnp.square(outer(th, x, key))

    assert jax.jit(f)(THETA, XE, jax.random.key(0)).shape == ()  # JAX runs it
    with pytest.raises(NotImplementedError, match="shard_map inside another shard_map"):
        scg.scg_grad(f)(THETA, XE, jax.random.key(0))


def test_the_shardings_of_an_inner_jit_stay_in_the_emitted_program():
    mesh = _mesh((4,), ("d",))
    rows = NamedSharding(mesh, P("d"))
    # A call on the cost's path (its operand depends on the draw): the rule re-enters it.
    per_row = jax.jit(lambda z, l: (z - 0.3) ** 2 * l, in_shardings=rows, out_shardings=rows)

    def f(w, x, key):
        logits = x @ w
        z = scg.sample(key, dist.Bernoulli(logits=logits)).astype(x.dtype)
        return jnp.mean(per_row(z, logits))

    def constraints(fn):
        text = jax.jit(fn).lower(W, X, jax.random.key(0)).as_text()
        return [
            line for line in text.splitlines() if "sharding_constraint" in line and '"d"' in line
        ]

    n = len(constraints(f))  # the operands and the output of the call
    assert n >= 1
    assert len(constraints(scg.scg_grad(f))) >= n
    assert len(constraints(scg.surrogate(f))) >= n


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
def test_placing_draws_and_costs_keeps_plates(axis_type):
    """`with_sharding_constraint` / `jax.sharding.reshard` on a draw and on the per-row
    costs, and `scg.sample(..., out_sharding=)`: placement only, so the per-row weights
    stay (they fell back to the whole batch)."""
    mesh = _mesh((4,), ("d",), axis_type)
    rows = NamedSharding(mesh, P("d"))

    def f(th, x, key):
        k1, k2 = jax.random.split(key)
        z = scg.sample(k1, dist.Bernoulli(logits=x @ th), out_sharding=rows).astype(x.dtype)
        z = _compat_place(z, rows)
        c = _compat_place(_per_row_cost(z, x, th), rows)
        u = scg.sample(k2, dist.Bernoulli(logits=x[:, 1]), out_sharding=P("d")).astype(x.dtype)
        return jnp.sum(c) + jnp.sum(u)

    def hand(th, x, z, per_row):
        lp = dist.Bernoulli(logits=x @ th).log_prob(z)
        c = _per_row_cost(z, x, th)
        return jnp.sum(_box(lp) * c) if per_row else _box(jnp.sum(lp)) * jnp.sum(c)

    with jax.set_mesh(mesh):
        x = jax.device_put(XA, rows)
        key = jax.random.key(0)
        z = jax.jit(scg.trace(f))(THA, x, key).sites["node0"].value.astype(XA.dtype)
        ours = np.asarray(jax.jit(scg.scg_grad(f))(THA, x, key))
        row = np.asarray(jax.jit(jax.grad(hand), static_argnums=3)(THA, x, z, True))
        whole = np.asarray(jax.jit(jax.grad(hand), static_argnums=3)(THA, x, z, False))
    np.testing.assert_allclose(ours, row, rtol=1e-4, atol=1e-5)
    assert float(np.max(np.abs(ours - whole))) > 1e-1


def _compat_place(x, sharding):
    if sharding.mesh.axis_types[0] == AxisType.Explicit:
        return jax.sharding.reshard(x, sharding)
    return jax.lax.with_sharding_constraint(x, sharding)


def test_samples_inside_shard_map_on_an_explicit_mesh():
    """`jax.make_mesh`'s default axes are Explicit: a psum'd cost of draws made in the
    body (its stacked terms were indexed on a sharded axis: a crash), and replay
    (`draws=`, whose abstract pass dropped the operands' shardings)."""

    def make(axis_type):
        mesh = _mesh((4,), ("d",), axis_type)

        @partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("d"), P()), out_specs=P())
        def f(th, xb, key):
            key = jax.random.fold_in(key, lax.axis_index("d"))
            z = scg.sample(key, dist.Bernoulli(logits=xb @ th)).astype(xb.dtype)
            return lax.pmean(jnp.mean(_per_row_cost(z, xb, th)), "d") ** 2

        return mesh, f

    key = jax.random.key(0)
    mesh, f = make(AxisType.Auto)
    with jax.set_mesh(mesh):
        expected = np.asarray(jax.jit(scg.scg_grad(f))(THA, XA, key))
    mesh, f = make(AxisType.Explicit)
    with jax.set_mesh(mesh):
        x = jax.device_put(XA, NamedSharding(mesh, P("d")))
        np.testing.assert_allclose(jax.jit(scg.scg_grad(f))(THA, x, key), expected, rtol=1e-5)
        z = jax.jit(scg.trace(f))(THA, x, key).sites["node0"].value
        replayed = jax.jit(scg.scg_grad(f, draws={"node0": z}))(THA, x, key)
        np.testing.assert_allclose(replayed, expected, rtol=1e-5)
    assert float(np.max(np.abs(expected))) > 1e-2
