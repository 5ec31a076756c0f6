"""Key reuse (issue 6, item 6): a PRNG key consumed twice, one consumer a score-function
draw, is refused at trace time with a ValueError naming both source lines; the idioms
that derive a fresh key for every draw are accepted, with the same gradient as the
hand-written DiCE surrogate on the same keys.

Lines are named by markers: `at("name")` is this file's `test_key_reuse.py:<line> (`
for the line ending in `# @name`."""

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from jax import lax

import scgjax as scg
from scgjax import _keys

try:
    from .helpers import mc_draws
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    from helpers import mc_draws

KEY = jax.random.key(0)
THETA = 0.3  # not 0: numpyro's Bernoulli log_prob has a wrong derivative at logits 0
_LINES = pathlib.Path(__file__).read_text().splitlines()


def at(marker: str) -> str:
    hits = [i + 1 for i, line in enumerate(_LINES) if line.rstrip().endswith(f"# @{marker}")]
    assert len(hits) == 1, marker
    return f"{os.path.basename(__file__)}:{hits[0]} ("


def bern(key, logit):
    return scg.sample(key, dist.Bernoulli(logits=logit)).astype(jnp.float32)


def box(logp):
    return jnp.exp(logp - lax.stop_gradient(logp))


def hand_bern(key, logit):
    """The same draw as `bern`, and its log-probability written out."""
    z = dist.Bernoulli(logits=logit).sample(key).astype(jnp.float32)
    return z, z * logit - jax.nn.softplus(logit)


def refused(f, *args, grad=True) -> str:
    """The message of the ValueError that tracing `f` raises."""
    transform = scg.scg_grad(f) if grad else scg.surrogate(f)
    with pytest.raises(ValueError, match="PRNG key reuse") as info:
        transform(*args)
    return str(info.value)


def assert_names(msg: str, *markers: str) -> None:
    for m in markers:
        assert at(m) in msg, (m, msg)


def assert_same_grad(f, hand, theta, keys=None):
    """scg_grad(f) equals the gradient of the hand-written surrogate, key for key."""
    keys = jax.random.split(KEY, 3) if keys is None else keys
    got = jax.jit(jax.vmap(scg.scg_grad(f), (None, 0)))(theta, keys)
    want = jax.jit(jax.vmap(jax.grad(hand), (None, 0)))(theta, keys)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.fixture
def without_check(monkeypatch):
    """The transforms as they were before the check (issue 6's 'old code')."""
    monkeypatch.setattr(_keys, "check_key_reuse", lambda jaxpr: None)


# -- The two reported cases --------------------------------------------------------------


def reported_same_key(theta, key):
    d = dist.Bernoulli(logits=theta)
    z1 = scg.sample(key, d).astype(jnp.float32)  # @same-1
    z2 = scg.sample(key, d).astype(jnp.float32)  # @same-2
    return z1 * z2


def reported_baseline(theta, key):
    d = dist.Bernoulli(logits=theta)
    b = 5.0 * d.sample(key)  # @baseline-draw
    z = scg.sample(key, d, baseline=b).astype(jnp.float32)  # @baseline-site
    return 5.0 * z


def test_same_key_twice_is_refused_naming_both_lines(any_key):
    msg = refused(reported_same_key, THETA, any_key)
    assert_names(msg, "same-1", "same-2")
    assert "jax.random.split(key)" in msg and "[score function]" in msg


def test_same_key_twice_was_biased_before_the_check(without_check):
    # Both nodes are the same draw z, so the program's cost is z: dE/dθ = p(1 - p). The
    # surrogate had two score terms and gave twice that.
    p = float(jax.nn.sigmoid(THETA))
    exact = p * (1 - p)  # 0.2445
    draws = np.asarray(mc_draws(lambda k: scg.scg_grad(reported_same_key)(THETA, k), 20_000, 1))
    mean, se = draws.mean(), draws.std() / np.sqrt(len(draws))
    assert abs(mean - 2 * exact) < 5 * se  # 0.489
    assert abs(mean - exact) > 20 * se


def test_baseline_drawn_from_the_draws_own_key_is_refused(any_key):
    msg = refused(reported_baseline, THETA, any_key)
    assert_names(msg, "baseline-draw", "baseline-site")
    assert "random_bits" in msg and "d.sample" in msg


def test_baseline_from_own_key_was_zero_before_the_check(without_check):
    # b = 5·z is the draw itself: Q - b = 0 in every draw, exact 5·p(1 - p) = 1.222.
    draws = np.asarray(mc_draws(lambda k: scg.scg_grad(reported_baseline)(THETA, k), 1000, 2))
    assert np.all(draws == 0.0)


def test_baseline_from_a_key_of_its_own_is_accepted(any_key):
    def f(theta, key):
        kb, kz = jax.random.split(key)
        d = dist.Bernoulli(logits=theta)
        b = 5.0 * d.sample(kb)
        return 5.0 * scg.sample(kz, d, baseline=b).astype(jnp.float32)

    def hand(theta, key):
        kb, kz = jax.random.split(key)
        b = 5.0 * dist.Bernoulli(logits=theta).sample(kb)
        z, lp = hand_bern(kz, theta)
        return box(lp) * 5.0 * z + (1.0 - box(lp)) * b

    assert_same_grad(f, hand, THETA, jax.random.split(any_key, 3))


# -- Refused: one key, two consumers -----------------------------------------------------


def test_sample_and_split_of_one_key_are_refused(any_key):
    def f(t, key):
        z = bern(key, t)  # @split-sample
        k1, _ = jax.random.split(key)  # @split-split
        return z + bern(k1, t)

    msg = refused(f, THETA, any_key)
    assert_names(msg, "split-sample", "split-split")
    assert "jax.random.split" in msg


@pytest.mark.parametrize("draw", ["normal", "gamma", "fold_in"])
def test_sample_and_a_jax_random_use_of_one_key_are_refused(draw, any_key):
    def f(t, key):
        z = bern(key, t)  # @jr-sample
        if draw == "normal":
            other = jax.random.normal(key)  # @jr-normal
        elif draw == "gamma":
            other = jax.random.gamma(key, 2.0)  # @jr-gamma
        else:
            other = bern(jax.random.fold_in(key, 1), t)  # @jr-fold_in
        return z + other

    assert_names(refused(f, THETA, any_key), "jr-sample", f"jr-{draw}")


def test_a_pathwise_draw_and_a_score_draw_on_one_key_are_refused():
    def f(t, key):
        x = scg.sample(key, dist.Normal(t, 1.0))  # @mixed-pathwise
        return x + bern(key, t)  # @mixed-score

    msg = refused(f, THETA, KEY)
    assert_names(msg, "mixed-pathwise", "mixed-score")
    assert "[pathwise]" in msg


def test_the_same_static_index_twice_is_refused(any_key):
    def f(t, key):
        keys = jax.random.split(key, 3)
        a = bern(keys[1], t)  # @index-1
        b = bern(jax.random.split(key, 3)[1], t)  # @index-2
        return a + b

    assert_names(refused(f, THETA, any_key), "index-1", "index-2")


def test_the_same_fold_in_literal_twice_is_refused(any_key):
    def f(t, key):
        a = bern(jax.random.fold_in(key, 7), t)  # @fold-1
        return a + bern(jax.random.fold_in(key, 7), -t)  # @fold-2

    assert_names(refused(f, THETA, any_key), "fold-1", "fold-2")


def test_the_same_traced_index_twice_is_refused():
    def f(t, key):
        i = (t > 0).astype(jnp.int32)
        keys = jax.random.split(key, 3)
        return bern(keys[i], t) + bern(keys[i], -t)  # @traced-index

    assert at("traced-index") in refused(f, THETA, KEY)


def test_a_key_made_from_the_same_seed_twice_is_refused():
    def f(t, key):
        a = bern(jax.random.key(3), t)  # @seed-1
        return a + bern(jax.random.key(3), t)  # @seed-2

    assert_names(refused(f, THETA, KEY), "seed-1", "seed-2")

    def g(t, key):
        return bern(jax.random.key(3), t) + bern(jax.random.PRNGKey(4), t)

    jax.eval_shape(scg.scg_grad(g), THETA, KEY)


def test_a_closed_over_key_used_twice_is_refused():
    k = jax.random.key(5)

    def f(t, key):
        a = bern(k, t)  # @closed-1
        return a + bern(k, t)  # @closed-2

    assert_names(refused(f, THETA, KEY), "closed-1", "closed-2")


def test_a_selected_key_and_one_of_its_alternatives_are_refused():
    def f(t, key):
        k1, k2 = jax.random.split(key)
        k = jnp.where(t > 0, k1, k2)
        return bern(k, t) + bern(k1, t)  # @where

    assert at("where") in refused(f, THETA, KEY)


def test_a_key_used_in_a_branch_and_outside_the_cond_is_refused(any_key):
    def f(t, key):
        z = lax.cond(t > 0, lambda: bern(key, t), lambda: 0.0)  # @cond-branch
        return z + bern(key, -t)  # @cond-outside

    assert_names(refused(f, THETA, any_key), "cond-branch", "cond-outside")


def test_consumers_inside_jit_custom_jvp_and_checkpoint_are_seen(any_key):
    @jax.custom_jvp
    def noisy(x, k):
        return x + jax.random.normal(k)

    noisy.defjvp(lambda primals, tangents: (noisy(*primals), tangents[0]))

    def f(t, key):
        a = jax.checkpoint(lambda k: bern(k, t))(key)  # @remat
        return a + jax.jit(noisy)(t, key)  # @custom

    assert_names(refused(f, THETA, any_key), "remat", "custom")


def test_threefry_on_the_words_of_a_legacy_key_is_refused():
    from jax._src.random import threefry2x32

    def f(t, key):
        bits = threefry2x32.threefry_2x32(key, jnp.arange(4, dtype=jnp.uint32))  # @threefry
        return bern(key, t) + bits[0].astype(jnp.float32)  # @threefry-sample

    assert_names(refused(f, THETA, jax.random.PRNGKey(0)), "threefry", "threefry-sample")


# -- Refused: loops ----------------------------------------------------------------------


@pytest.mark.parametrize("loop", ["scan", "fori_loop", "while_loop"])
def test_a_key_closed_over_a_loop_body_is_refused(loop, any_key):
    def f(t, key):
        def step(c):
            return c + bern(key, t)  # @closed-body

        if loop == "scan":
            return lax.scan(lambda c, _: (step(c), None), 0.0, None, length=3)[0]  # @loop-scan
        if loop == "fori_loop":
            return lax.fori_loop(0, 3, lambda i, c: step(c), 0.0)  # @loop-fori_loop
        return lax.while_loop(  # @loop-while_loop
            lambda c: c[0] < 3,
            lambda c: (c[0] + 1, step(c[1])),
            (0, 0.0),
        )[1]

    msg = refused(f, THETA, any_key, grad=False)
    assert_names(msg, "closed-body", f"loop-{loop}")
    assert "every iteration" in msg and "fold_in(key, i)" in msg


def test_a_closed_over_key_in_a_loop_of_one_iteration_is_accepted():
    def f(t, key):
        return lax.scan(lambda c, _: (c + bern(key, t), None), 0.0, None, length=1)[0]

    def hand(t, key):
        z, lp = hand_bern(key, t)
        return box(lp) * z

    assert_same_grad(f, hand, THETA)


def test_a_key_carried_through_a_loop_unchanged_is_refused(any_key):
    def f(t, key):
        def body(c, _):
            k, acc = c
            return (k, acc + bern(k, t)), None  # @carried

        return lax.scan(body, (key, 0.0), None, length=4)[0][1]

    assert "every iteration" in refused(f, THETA, any_key)


def test_a_carried_key_consumed_before_the_iteration_that_splits_it_is_refused(any_key):
    def f(t, key):
        def body(c, _):
            k, acc = c
            k, sub = jax.random.split(k)  # @ahead-split
            return (k, acc + bern(sub, t) + bern(k, -t)), None  # @ahead-sample

        return lax.scan(body, (key, 0.0), None, length=3)[0][1]

    msg = refused(f, THETA, any_key)
    assert_names(msg, "ahead-split", "ahead-sample")
    assert "next iteration" in msg


def test_keys_at_i_and_i_plus_one_in_a_fori_loop_are_refused():
    def f(t, key):
        keys = jax.random.split(key, 5)
        return lax.fori_loop(
            0,
            4,
            lambda i, c: (
                c
                + bern(keys[i], t)  # @at-i
                + bern(keys[i + 1], -t)  # @at-i-plus-1
            ),
            0.0,
        )

    msg = refused(f, THETA, KEY)
    assert_names(msg, "at-i", "at-i-plus-1")


def test_offsets_of_the_loop_counter_are_compared_across_iterations():
    def f(t, key):
        return lax.fori_loop(
            0,
            4,
            lambda i, c: (
                c
                + bern(jax.random.fold_in(key, i + 2), t)  # @plus-2
                + bern(jax.random.fold_in(key, i + 1), -t)  # @plus-1
            ),
            0.0,
        )

    msg = refused(f, THETA, KEY)
    assert_names(msg, "plus-2", "plus-1")
    assert "next iteration" in msg


def test_keys_swapped_between_two_carries_are_refused_from_three_iterations_on():
    def f(length):
        def run(t, key):
            def body(c, _):
                a, b, acc = c
                return (b, a, acc + bern(a, t)), None  # @swapped

            return lax.scan(body, (*jax.random.split(key), 0.0), None, length=length)[0][2]

        return run

    assert "every other iteration" in refused(f(3), THETA, KEY)
    scg.scg_grad(f(2))(THETA, KEY)  # two iterations draw from two different keys


@pytest.mark.parametrize("use", ["as_is", "derived"])
def test_scanned_keys_that_repeat_are_refused(use, any_key):
    def f(t, key):
        keys = jnp.stack([key, key, key])

        def body(c, k):
            k = k if use == "as_is" else jax.random.fold_in(k, 0)
            return c + bern(k, t), None  # @repeat

        return lax.scan(body, 0.0, keys)[0]

    assert at("repeat") in refused(f, THETA, any_key)


def test_a_key_used_outside_and_scanned_over_is_refused(any_key):
    def f(t, key):
        keys = jax.random.split(key, 3)
        z = bern(keys[1], t)  # @outside-row
        return z + lax.scan(lambda c, k: (c + bern(k, t), None), 0.0, keys)[0]  # @scanned-row

    assert_names(refused(f, THETA, any_key), "outside-row", "scanned-row")


def test_the_first_iteration_of_a_reversed_scan_is_its_last_row():
    def f(t, key):
        keys = jax.random.split(key, 3)
        z = bern(jax.random.fold_in(keys[2], 0), t)  # @last-row
        return (
            z
            + lax.scan(
                lambda c, k: (c + bern(jax.random.fold_in(k, 0), t), None),  # @rev
                0.0,
                keys,
                reverse=True,
            )[0]
        )

    assert_names(refused(f, THETA, KEY), "last-row", "rev")


def test_a_key_used_outside_and_in_the_first_iteration_is_refused(any_key):
    def f(t, key):
        keys = jax.random.split(key, 4)
        z = bern(keys[0], t)  # @outside-first
        return z + lax.fori_loop(0, 4, lambda i, c: c + bern(keys[i], t), 0.0)  # @first-iter

    msg = refused(f, THETA, any_key)
    assert_names(msg, "outside-first", "first-iter")
    assert "first iteration" in msg


def test_a_fold_in_in_a_loop_and_a_sample_outside_on_one_key_are_refused(any_key):
    def f(t, key):
        z = bern(key, t)  # @outer-sample
        return z + lax.fori_loop(
            0,
            3,
            lambda i, c: c + bern(jax.random.fold_in(key, i), t),  # @loop-fold
            0.0,
        )

    msg = refused(f, THETA, any_key)
    assert_names(msg, "outer-sample", "loop-fold")


def test_a_key_a_loop_returns_unchanged_is_the_key_it_was_given(any_key):
    def f(t, key):
        def body(i, c):
            k, acc = c
            return k, acc + bern(jax.random.fold_in(k, i), t)  # @passed-fold

        k, acc = lax.fori_loop(0, 3, body, (key, 0.0))
        return acc + bern(k, -t)  # @passed-after

    assert_names(refused(f, THETA, any_key), "passed-fold", "passed-after")

    def g(t, key):  # the key comes back unchanged, through an op JAX does not forward
        def body(i, c):
            k, acc = c
            return jnp.where(acc > 100.0, k, k), acc + t

        k, acc = lax.fori_loop(0, 3, body, (key, 0.0))
        return acc + bern(k, t) + bern(key, -t)  # @untouched

    assert at("untouched") in refused(g, THETA, any_key)


def test_a_key_a_scan_consumed_and_returned_is_refused_after_it(any_key):
    def f(t, key):
        def body(k, _):
            k, sub = jax.random.split(k)
            return k, (bern(sub, t), sub)  # @returned-sub

        _, (zs, subs) = lax.scan(body, key, None, length=3)
        return zs.sum() + bern(subs[1], -t)  # @reused-sub

    assert_names(refused(f, THETA, any_key), "returned-sub", "reused-sub")


def test_inner_loop_keys_that_repeat_in_every_outer_iteration_are_refused():
    def f(t, key):
        def outer(c, _):
            inner = lax.fori_loop(
                0,
                2,
                lambda j, a: a + bern(jax.random.fold_in(key, j), t),  # @inner
                c,
            )
            return inner, None

        return lax.scan(outer, 0.0, None, length=3)[0]

    msg = refused(f, THETA, KEY)
    assert at("inner") in msg and "every iteration" in msg


# -- Refused: vmap -----------------------------------------------------------------------


def test_an_unbatched_key_of_a_score_draw_under_vmap_is_refused(any_key):
    def f(t, key):
        return jax.vmap(lambda x: bern(key, x))(jnp.array([t, 2 * t, -t])).sum()  # @lanes

    msg = refused(f, THETA, any_key)
    assert at("lanes") in msg and "lanes of jax.vmap" in msg


def test_repeated_keys_of_a_score_draw_under_vmap_are_refused(any_key):
    def f(t, key):
        ks = jax.random.split(key, 3)
        keys = jnp.stack([ks[0], ks[2], ks[0]])
        return jax.vmap(lambda k: bern(k, t))(keys).sum()  # @repeated-lanes

    assert at("repeated-lanes") in refused(f, THETA, any_key)


def test_keys_gathered_at_constant_indices_are_exact_when_the_constants_are_known():
    def f(t, key, index):
        keys = jax.random.split(key, 3)[jnp.array(index)]
        return jax.vmap(lambda k: bern(k, t))(keys).sum()  # @gathered

    closed = jax.make_jaxpr(lambda t, k: f(t, k, [0, 2, 0]))(THETA, KEY)
    assert closed.consts  # the index array is a constant of the traced program
    with pytest.raises(ValueError, match="lanes of jax.vmap") as info:
        _keys.check_key_reuse(closed)
    assert at("gathered") in str(info.value)
    _keys.check_key_reuse(jax.make_jaxpr(lambda t, k: f(t, k, [0, 2, 1]))(THETA, KEY))


def test_one_key_in_both_branches_of_a_vmapped_cond_is_refused():
    # With a batched predicate both branches run in every lane, on the same key.
    def f(t, key):
        def one(x, k):
            return lax.cond(x > 0, lambda: bern(k, x), lambda: bern(k, -x))  # @vmapped-cond

        return jax.vmap(one)(jnp.array([t, -t]), jax.random.split(key)).sum()

    assert at("vmapped-cond") in refused(f, THETA, KEY)


# -- Accepted, with the hand-written surrogate's gradient ---------------------------------


def test_split_keys_used_once_each_are_accepted(any_key):
    def f(t, key):
        k1, k2, k3 = jax.random.split(key, 3)
        k4, k5 = jax.random.split(k3)
        return bern(k1, t) + 2.0 * bern(k2, -t) + 3.0 * bern(k4, 2 * t) + bern(k5, t)

    def hand(t, key):
        k1, k2, k3 = jax.random.split(key, 3)
        k4, k5 = jax.random.split(k3)
        total = 0.0
        for k, logit, w in ((k1, t, 1.0), (k2, -t, 2.0), (k4, 2 * t, 3.0), (k5, t, 1.0)):
            z, lp = hand_bern(k, logit)
            total = total + box(lp) * w * z
        return total

    assert_same_grad(f, hand, THETA, jax.random.split(any_key, 3))


def test_fold_in_with_distinct_literals_is_accepted(any_key):
    def f(t, key):
        return bern(jax.random.fold_in(key, 1), t) + bern(jax.random.fold_in(key, 2), t)

    def hand(t, key):
        total = 0.0
        for i in (1, 2):
            z, lp = hand_bern(jax.random.fold_in(key, i), t)
            total = total + box(lp) * z
        return total

    assert_same_grad(f, hand, THETA, jax.random.split(any_key, 3))


def test_fold_in_with_the_loop_counter_is_accepted(any_key):
    def f(t, key):
        return lax.fori_loop(0, 4, lambda i, c: c + bern(jax.random.fold_in(key, i), t), 0.0)

    def hand(t, key):
        total = 0.0
        for i in range(4):
            z, lp = hand_bern(jax.random.fold_in(key, i), t)
            total = total + box(lp) * z
        return total

    assert_same_grad(f, hand, THETA, jax.random.split(any_key, 3))


def test_keys_at_the_loop_counter_are_accepted(any_key):
    def f(t, key):
        keys = jax.random.split(key, 4)
        return lax.fori_loop(0, 4, lambda i, c: c + bern(keys[i], t), 0.0)

    def hand(t, key):
        total = 0.0
        for k in jax.random.split(key, 4):
            z, lp = hand_bern(k, t)
            total = total + box(lp) * z
        return total

    assert_same_grad(f, hand, THETA, jax.random.split(any_key, 3))


def test_scanning_over_split_keys_is_accepted(any_key):
    def f(t, key):
        return lax.scan(lambda c, k: (c + bern(k, t), None), 0.0, jax.random.split(key, 4))[0]

    def hand(t, key):
        total = 0.0
        for k in jax.random.split(key, 4):
            z, lp = hand_bern(k, t)
            total = total + box(lp) * z
        return total

    assert_same_grad(f, hand, THETA, jax.random.split(any_key, 3))


def test_a_key_carried_and_split_every_step_is_accepted(any_key):
    def f(t, key):
        def body(c, _):
            k, acc = c
            k, sub = jax.random.split(k)
            return (k, acc + bern(sub, t)), None

        return lax.scan(body, (key, 0.0), None, length=4)[0][1]

    def hand(t, key):
        total = 0.0
        for _ in range(4):
            key, sub = jax.random.split(key)
            z, lp = hand_bern(sub, t)
            total = total + box(lp) * z
        return total

    assert_same_grad(f, hand, THETA, jax.random.split(any_key, 3))


def test_a_while_loop_that_splits_its_carried_key_is_accepted():
    def f(t, key):
        def body(c):
            i, k, acc = c
            k, sub = jax.random.split(k)
            return i + 1, k, acc + bern(sub, t)

        return lax.while_loop(lambda c: c[0] < 3, body, (0, key, 0.0))[2]

    # Reverse mode cannot go through while_loop; the value and forward mode can.
    np.testing.assert_allclose(scg.surrogate(f)(THETA, KEY), f(THETA, KEY))
    jax.jvp(lambda t: scg.surrogate(f)(t, KEY), (THETA,), (1.0,))


def test_vmap_over_split_keys_is_accepted(any_key):
    def f(t, key):
        return jax.vmap(lambda k, x: bern(k, x))(
            jax.random.split(key, 3), jnp.array([t, -t, 2 * t])
        ).sum()

    def hand(t, key):
        total = 0.0
        for k, x in zip(jax.random.split(key, 3), (t, -t, 2 * t)):
            z, lp = hand_bern(k, x)
            total = total + box(lp) * z
        return total

    assert_same_grad(f, hand, THETA, jax.random.split(any_key, 3))


def test_one_key_in_both_branches_of_a_cond_or_switch_is_accepted(any_key):
    def f(t, key):
        a = lax.cond(t > 0, lambda: bern(key, t), lambda: 2.0 * bern(key, -t))
        return a

    def hand(t, key):
        z, lp = hand_bern(key, t)
        return box(lp) * z  # t > 0: the first branch

    assert_same_grad(f, hand, THETA, jax.random.split(any_key, 3))

    def g(t, key):
        k1, k2 = jax.random.split(key)
        i = (t > 0).astype(jnp.int32) + 1
        return lax.switch(
            i, [lambda: bern(k2, t), lambda: bern(k2, -t), lambda: 3.0 * bern(k2, 2 * t)]
        ) + bern(k1, t)

    jax.eval_shape(scg.scg_grad(g), THETA, any_key)


def test_a_branch_known_at_trace_time_is_the_only_one_read():
    def f(t, key):
        k1, k2, k3 = jax.random.split(key, 3)
        k = lax.switch(1, [lambda: k1, lambda: k2])  # a cond on a known index
        z = lax.switch(1, [lambda: bern(k1, 2 * t), lambda: bern(k3, 2 * t)])
        return bern(k, t) + z + bern(k1, -t)

    def hand(t, key):
        k1, k2, k3 = jax.random.split(key, 3)
        total = 0.0
        for k, logit in ((k2, t), (k3, 2 * t), (k1, -t)):
            z, lp = hand_bern(k, logit)
            total = total + box(lp) * z
        return total

    assert_same_grad(f, hand, THETA)


def test_pathwise_draws_may_share_a_key():
    # A pathwise gradient is exact for whatever noise the draws share (common random
    # numbers), within a program and across vmap lanes.
    def f(t, key):
        x = scg.sample(key, dist.Normal(t, 1.0))
        y = scg.sample(key, dist.Normal(2.0 * t, 1.0))
        lanes = jax.vmap(lambda m: scg.sample(key, dist.Normal(m, 1.0)))(jnp.array([t, -t]))
        return x * y + jnp.sum(lanes**2)

    def hand(t, key):
        eps = jax.random.normal(key)
        x, y = t + eps, 2.0 * t + eps
        return x * y + (t + eps) ** 2 + (-t + eps) ** 2

    assert_same_grad(f, hand, THETA)


def test_a_traced_index_is_assumed_distinct_from_static_ones():
    # Documented choice: keys[i] with i unknown at trace time and keys[0] could be one
    # key, but refusing them would also refuse keys[i] in a fori_loop.
    def f(t, key):
        i = (t > 0).astype(jnp.int32) + 1
        keys = jax.random.split(key, 3)
        return bern(keys[i], t) + bern(keys[0], t)

    def hand(t, key):
        keys = jax.random.split(key, 3)
        total = 0.0
        for k in (keys[2], keys[0]):  # t > 0: i = 2
            z, lp = hand_bern(k, t)
            total = total + box(lp) * z
        return total

    assert_same_grad(f, hand, THETA)


def test_loops_nested_in_loops_with_fresh_keys_are_accepted(any_key):
    def f(t, key):
        def outer(k, _):
            k, sub = jax.random.split(k)
            inner = lax.fori_loop(0, 2, lambda j, a: a + bern(jax.random.fold_in(sub, j), t), 0.0)
            return k, inner

        return lax.scan(outer, key, None, length=3)[1].sum()

    def hand(t, key):
        total = 0.0
        for _ in range(3):
            key, sub = jax.random.split(key)
            for j in range(2):
                z, lp = hand_bern(jax.random.fold_in(sub, j), t)
                total = total + box(lp) * z
        return total

    assert_same_grad(f, hand, THETA, jax.random.split(any_key, 3))


def test_numpyro_samplers_with_loops_of_their_own_are_accepted(any_key):
    def f(t, key):
        ks = jax.random.split(key, 5)
        total = (
            scg.sample(ks[0], dist.Poisson(jnp.exp(t)))
            + scg.sample(ks[1], dist.Binomial(10, logits=t))
            + scg.sample(ks[2], dist.Gamma(jnp.exp(t), 1.0), estimator="score")
            + dist.Poisson(3.0).sample(ks[3])
            + dist.Beta(2.0, 3.0).sample(ks[4])
        )
        return total.astype(jnp.float32)

    jax.eval_shape(scg.scg_grad(f), THETA, any_key)  # traced (and checked), not run


# -- Cost ----------------------------------------------------------------------------------


def test_each_loop_body_is_read_once(monkeypatch):
    runs = []
    original = _keys._Pass.run

    def counting(self, jaxpr, *args):
        runs.append(jaxpr)
        return original(self, jaxpr, *args)

    monkeypatch.setattr(_keys._Pass, "run", counting)

    def f(t, key):
        def level(depth, k):
            if depth == 0:
                return bern(k, t)

            def body(c, _):
                kk, acc = c
                kk, sub = jax.random.split(kk)
                return (kk, acc + level(depth - 1, sub)), None

            return lax.scan(body, (k, 0.0), None, length=2)[0][1]

        return level(5, key)

    _keys.check_key_reuse(jax.make_jaxpr(f)(THETA, KEY).jaxpr)
    assert len(runs) == 6  # the program and five nested bodies, not 2**5 of them


def test_vector_and_scalar_identities_agree():
    a = np.array([0, 1, 12345678901234, _keys.MASK], np.uint64)
    b = np.array([7, _keys.MASK, 0, 99], np.uint64)
    assert [int(x) for x in _keys._mix(a, b)] == [_keys._mix1(int(x), int(y)) for x, y in zip(a, b)]
