"""`scg.draw`: the graph's structure (nodes, shapes, edges, the weights relation) read
back from its DOT text, against what is true of each program.

Every check parses `Drawing.source` (nodes by shape: box, circle, diamond; dashed edges
are the weights relation), so the DOT text itself is what is tested; one test checks that
it says the same as `Drawing.nodes` / `.edges`. Rendering tests skip without `dot`."""

from __future__ import annotations

import html
import pathlib
import re
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
import pytest
from jax import lax
from numpyro.distributions import constraints

import scgjax as scg
from scgjax.infer import TraceSCG_ELBO

pytest.importorskip("graphviz")

KEY = jax.random.key(0)
HAS_DOT = shutil.which("dot") is not None

# -- Reading the DOT text back -----------------------------------------------------------

_ATTR = re.compile(
    r'(\w+)=("(?:[^"\\]|\\.)*"|<(?:[^<>]|<[^<>]*>|<(?:[^<>]|<[^<>]*>)*>)*>|[^\s\]]+)'
)
_KINDS = {"box": "input", "circle": "stochastic", "diamond": "cost"}


def _attrs(text: str) -> dict:
    out = {}
    for k, v in _ATTR.findall(text):
        if v.startswith('"'):
            v = v[1:-1].replace('\\"', '"')
        out[k] = v
    return out


def parse(source: str) -> tuple[dict, set, set]:
    """(DOT id -> (kind, name, label text), influence edges {(tail name, head name)},
    weights edges {(tail name, head name, label)}) of a drawing's DOT text."""
    nodes, raw_edges = {}, []
    for line in source.splitlines()[1:-1]:
        line = line.strip()
        m = re.match(r"^(\w+) -> (\w+)(?: \[(.*)\])?$", line)
        if m:
            raw_edges.append((m[1], m[2], _attrs(m[3] or "")))
            continue
        m = re.match(r"^(\w+) \[(.*)\]$", line)
        if m and m[1] not in ("graph", "node", "edge"):
            a = _attrs(m[2])
            label = html.unescape(re.sub(r"<br/>", "\n", a["label"]))
            text = re.sub(r"<[^>]+>", "", label)
            name = re.search(r"<b>(.*?)</b>", a["label"])
            assert name, a["label"]
            nodes[m[1]] = (_KINDS[a["shape"]], html.unescape(name[1]), text)
    infl, weights = set(), set()
    for t, h, a in raw_edges:
        assert t in nodes and h in nodes, (t, h)
        if a.get("style") == "dashed":
            weights.add((nodes[t][1], nodes[h][1], a.get("label", "")))
        else:
            infl.add((nodes[t][1], nodes[h][1]))
    return nodes, infl, weights


def names(nodes, kind):
    return {n for k, n, _ in nodes.values() if k == kind}


def text_of(nodes, name):
    (text,) = [t for _, n, t in nodes.values() if n == name]
    return text


def reachable(infl: set, a: str, b: str) -> bool:
    seen, todo = {a}, [a]
    while todo:
        x = todo.pop()
        for t, h in infl:
            if t == x and h not in seen:
                seen.add(h)
                todo.append(h)
    return b in seen


def check_consistent(f, *args, **kwargs):
    """What holds for every program: the drawing says what `describe` says (cost terms,
    how many each score node weights), a score node's score term is weighted by exactly
    the cost terms it reaches through the solid edges, and the DOT text carries
    `Drawing.nodes` / `.edges`."""
    d = scg.draw(f)(*args, **kwargs)
    nodes, infl, weights = parse(d.source)
    table = scg.describe(f)(*args, **kwargs).splitlines()
    costs = names(nodes, "cost")
    for row in table[1:]:
        if not row.strip():
            break
        cells = row.split()
        m = re.search(r"(\d+) of (\d+) cost terms", row)
        if m:
            assert int(m[2]) == len(costs), (row, costs)
            assert len({c for w, c, _ in weights if w == cells[0]}) == int(m[1]), row
            for c in costs:
                weighted = any(w == cells[0] and h == c for w, h, _ in weights)
                assert weighted == reachable(infl, cells[0], c), (cells[0], c)
    assert not d.approximate
    assert {
        (d.nodes[e.tail].name, d.nodes[e.head].name) for e in d.edges if e.kind != "weights"
    } == infl
    assert len(nodes) == len(d.nodes)
    return d, nodes, infl, weights


# -- The paper's figure-1 kind of program ---------------------------------------------------


def fig1(theta, phi, key):
    k1, k2, k3 = jax.random.split(key, 3)
    x = scg.sample(k1, dist.Bernoulli(logits=theta), name="x")
    c1 = (x - 0.3) ** 2  # downstream of x only
    z = scg.sample(k2, dist.Bernoulli(logits=phi + x), name="z")
    y = scg.sample(k3, dist.Normal(phi * z, 1.0), name="y")  # pathwise
    return c1 + (y - 1.0) ** 2 + phi**2


def _cost_names(weights, infl):
    """The cost terms of `fig1` by what reaches them."""
    by_x_only = {c for w, c, _ in weights if w == "x"} - {c for w, c, _ in weights if w == "z"}
    (cx,) = by_x_only
    (cxz,) = {c for w, c, _ in weights if w == "z"}
    (cphi,) = {h for t, h in infl if t == "phi" and h.startswith("c")}
    return cx, cxz, cphi


def test_figure_one_nodes_edges_and_weights():
    d, nodes, infl, weights = check_consistent(fig1, jnp.array(0.1), jnp.array(0.2), KEY)
    assert names(nodes, "input") == {"theta", "phi"}
    assert names(nodes, "stochastic") == {"x", "z", "y"}
    assert len(names(nodes, "cost")) == 3
    cx, cxz, cphi = _cost_names(weights, infl)
    assert infl == {
        ("theta", "x"),
        ("phi", "z"),
        ("phi", "y"),
        ("phi", cphi),
        ("x", "z"),
        ("x", cx),
        ("z", "y"),
        ("y", cxz),
    }
    assert {(w, c) for w, c, _ in weights} == {("x", cx), ("x", cxz), ("z", cxz)}
    assert "BernoulliLogits" in text_of(nodes, "x") and "score" in text_of(nodes, "x")
    assert "pathwise" in text_of(nodes, "y")
    assert "test_draw.py" in text_of(nodes, "x")  # the source line
    assert d.by_name("y").score is False and d.by_name("z").score is True


def test_score_node_is_not_connected_to_an_upstream_cost():
    d, nodes, infl, weights = check_consistent(fig1, jnp.array(0.1), jnp.array(0.2), KEY)
    cx, _, _ = _cost_names(weights, infl)
    assert not any(w == "z" and c == cx for w, c, _ in weights)
    assert not reachable(infl, "z", cx)
    # theta reaches the costs only through the draws
    assert {h for t, h in infl if t == "theta"} == {"x"}


def test_names_match_describe_and_sample_names():
    def f(theta, key):
        k1, k2 = jax.random.split(key)
        a = scg.sample(k1, dist.Bernoulli(logits=theta))
        b = scg.sample(k2, dist.Bernoulli(logits=theta + a), name="b")
        return (a + b) * 1.0

    _, nodes, infl, weights = check_consistent(f, jnp.array(0.0), KEY)
    assert names(nodes, "stochastic") == {"node0", "b"}
    assert ("node0", "b") in infl


# -- Plates ---------------------------------------------------------------------------------

B, D, H = 6, 5, 3


def vae(params, x, key):
    logits = x @ params["enc"]["w"] + params["enc"]["b"]
    z = scg.sample(key, dist.Bernoulli(logits=logits).to_event(1), name="z")
    recon = z @ params["dec"]["w"] + params["dec"]["b"]
    log_px = dist.Bernoulli(logits=recon).to_event(1).log_prob(x)
    log_qz = dist.Bernoulli(logits=logits).to_event(1).log_prob(z)
    return -(log_px - log_qz).mean()


VAE_PARAMS = {
    "enc": {"w": jnp.zeros((D, H)), "b": jnp.zeros(H)},
    "dec": {"w": jnp.zeros((H, D)), "b": jnp.zeros(D)},
}


def test_discrete_vae_plate_and_grouped_parameters():
    x = jnp.ones((B, D))
    d, nodes, infl, weights = check_consistent(vae, VAE_PARAMS, x, KEY)
    # leaves of one argument feeding the same nodes are one box
    assert names(nodes, "input") == {"params['enc']", "params['dec']", "x"}
    assert "2 arrays" in text_of(nodes, "params['enc']")
    assert "f32[6,5]" in text_of(nodes, "x")
    assert f"[{B}]" in text_of(nodes, "z")
    (c,) = {c for _, c, _ in weights}
    assert d.by_name(c).shape == (B,)  # a plate of B cost elements is one diamond
    assert weights == {("z", c, "weights (0: plate)")}
    assert {h for t, h in infl if t == "params['dec']"} == {c}  # the decoder is after z
    assert {h for t, h in infl if t == "params['enc']"} == {"z", c}  # and log q(z)


def test_plate_aligned_chain_of_sites():
    def f(theta, key):
        k1, k2 = jax.random.split(key)
        z1 = scg.sample(k1, dist.Bernoulli(logits=theta), name="z1")
        z2 = scg.sample(k2, dist.Bernoulli(logits=z1 - 0.5), name="z2")
        return (z1 + 2.0 * z2).sum()

    d, nodes, infl, weights = check_consistent(f, jnp.zeros(4), KEY)
    assert ("z1", "z2") in infl
    assert all(label == "weights (0: plate)" for _, _, label in weights)
    assert {w for w, _, _ in weights} == {"z1", "z2"}
    assert d.by_name("z1").shape == (4,)


def test_parameter_scaling_the_cost_reaches_every_term():
    # theta scales both terms (a sample-free factor): the cost still splits in two, and
    # theta influences both.
    def f(theta, key):
        k1, k2 = jax.random.split(key)
        z1 = scg.sample(k1, dist.Bernoulli(logits=0.0), name="z1")
        z2 = scg.sample(k2, dist.Bernoulli(logits=0.0), name="z2")
        return theta * (z1 + z2)

    _, nodes, infl, weights = check_consistent(f, jnp.array(2.0), KEY)
    costs = names(nodes, "cost")
    assert len(costs) == 2
    assert {h for t, h in infl if t == "theta"} == costs
    assert {(w, c) for w, c, _ in weights} == {(w, c) for w, c in infl if w.startswith("z")}
    assert (
        len({c for w, c, _ in weights if w == "z1"} & {c for w, c, _ in weights if w == "z2"}) == 0
    )


# -- Loops, branches, transforms inside ------------------------------------------------------

T = 5


def policy(w, key):
    def step(carry, k):
        s, total = carry
        a = scg.sample(k, dist.Categorical(logits=s @ w), name="a")
        r = -jnp.abs(s[0] - 1.0) + 0.1 * a
        return (s + jax.nn.one_hot(a, 3), total + r), None

    (_, total), _ = lax.scan(step, (jnp.zeros(3), 0.0), jax.random.split(key, T))
    return -total


def test_policy_in_scan_self_loop_and_causal_weights():
    d, nodes, infl, weights = check_consistent(policy, jnp.zeros((3, 3)), KEY)
    assert d.by_name("a").shape == (T,)
    assert ("a", "a") in infl  # the state carries earlier actions into later logits
    assert {h for t, h in infl if t == "w"} == {"a"}
    labels = {label for w, _, label in weights if w == "a"}
    assert labels == {"weights (0: time <)", "weights (0: time ≤)"}
    assert 'label="earlier steps"' in d.source


def test_scan_reward_of_its_own_action_is_a_plate_without_self_loop():
    def f(w, key):
        def step(total, k):
            a = scg.sample(k, dist.Bernoulli(logits=w), name="a")
            return total + a * 1.0, None

        total, _ = lax.scan(step, 0.0, jax.random.split(key, T))
        return total

    _, nodes, infl, weights = check_consistent(f, jnp.array(0.0), KEY)
    assert ("a", "a") not in infl
    assert {label for _, _, label in weights} == {"weights (0: plate)"}


def test_discount_passed_as_an_array_influences_the_return():
    def f(w, gamma, key):
        def step(g, k):
            a = scg.sample(k, dist.Bernoulli(logits=w), name="a")
            return a * 1.0 + gamma * g, None

        total, _ = lax.scan(step, 0.0, jax.random.split(key, T), reverse=True)
        return total

    _, nodes, infl, weights = check_consistent(f, jnp.array(0.0), jnp.array(0.9), KEY)
    costs = {c for _, c, _ in weights}
    assert costs and {h for t, h in infl if t == "gamma"} >= costs
    # each step's increment depends on its own draw only
    assert {label for _, _, label in weights} == {"weights (0: plate)"}


def test_jit_cond_vmap_inside():
    def f(theta, key):
        k1, k2, k3 = jax.random.split(key, 3)
        z = scg.sample(k1, dist.Bernoulli(logits=theta[0]), name="z")
        x = jax.jit(lambda k, t: scg.sample(k, dist.Normal(t, 1.0), name="x"))(k2, theta[1])
        c = lax.cond(z > 0, lambda v: v**2, lambda v: v, x)
        ys = jax.vmap(lambda k: scg.sample(k, dist.Bernoulli(logits=theta[2]), name="y"))(
            jax.random.split(k3, 4)
        )
        return c + ys.sum()

    d, nodes, infl, weights = check_consistent(f, jnp.zeros(3), KEY)
    assert names(nodes, "stochastic") == {"z", "x", "y"}
    assert {h for t, h in infl if t == "theta"} == {"z", "x", "y"}
    (cz,) = {c for w, c, _ in weights if w == "z"}
    (cy,) = {c for w, c, _ in weights if w == "y"}
    assert cz != cy
    assert ("x", cz) in infl and ("z", cz) in infl and ("y", cy) in infl
    assert ("y", cy, "weights (0: plate)") in weights
    assert d.by_name("y").shape == (4,)


def test_enumerated_site():
    def f(theta, key):
        k1, k2 = jax.random.split(key)
        z = scg.sample(k1, dist.Bernoulli(logits=theta), estimator="enum", name="z")
        b = scg.sample(k2, dist.Bernoulli(logits=theta), name="b")
        return (z - 0.3) ** 2 + b

    d, nodes, infl, weights = check_consistent(f, jnp.array(0.0), KEY)
    assert "enum" in text_of(nodes, "z")
    assert {label for w, _, label in weights if w == "z"} == {"evaluated at alternatives"}
    assert {label for w, _, label in weights if w == "b"} == {"weights"}


def test_has_aux_and_static_arguments():
    def f(theta, mode, key):
        z = scg.sample(key, dist.Bernoulli(logits=theta), name="z")
        return (z * 2.0 if mode == "double" else z * 1.0), {"z": z, "mode": mode}

    d = scg.draw(f, has_aux=True)(jnp.array(0.0), "double", KEY)
    nodes, infl, weights = parse(d.source)
    assert names(nodes, "input") == {"theta"}
    assert {(w, c) for w, c, _ in weights} == {("z", c) for c in names(nodes, "cost")}


# -- A NumPyro model through TraceSCG_ELBO -----------------------------------------------------


def _mixture(subsample_size):
    """A two-component mixture: global means (pathwise guide), per-point assignments in a
    plate (score function), optionally subsampled."""

    def model(data):
        w = numpyro.param("weights", jnp.ones(2) / 2, constraint=constraints.simplex)
        locs = numpyro.sample("locs", dist.Normal(0.0, 5.0).expand([2]).to_event(1))
        with numpyro.plate("data", len(data), subsample_size=subsample_size) as i:
            z = numpyro.sample("z", dist.Categorical(w))
            numpyro.sample("x", dist.Normal(locs[z], 1.0), obs=data[i])

    def guide(data):
        m = numpyro.param("m", jnp.array([-1.0, 1.0]))
        logits = numpyro.param("logits", jnp.zeros((len(data), 2)))
        numpyro.sample("locs", dist.Normal(m, 0.5).to_event(1))
        with numpyro.plate("data", len(data), subsample_size=subsample_size) as i:
            numpyro.sample("z", dist.Categorical(logits=logits[i]))  # GUIDE_Z

    return TraceSCG_ELBO().program(model, guide)


@pytest.mark.parametrize("subsample_size", [None, 4])
def test_numpyro_model_through_trace_scg_elbo(subsample_size):
    """The guide's sites by their NumPyro names, at the guide's lines (not numpyro's
    handlers); the model's arguments named; the assignments weighted by their plate of
    ELBO terms only, not by the global term `log q(locs) - log p(locs)`."""
    data = jnp.linspace(-2.0, 2.0, 10)
    params = {"weights": jnp.ones(2) / 2, "m": jnp.array([-1.0, 1.0]), "logits": jnp.zeros((10, 2))}
    program = _mixture(subsample_size)
    d, nodes, infl, weights = check_consistent(program, params, KEY, data)
    n = subsample_size or len(data)
    assert names(nodes, "stochastic") == {"locs", "z"}
    lines = pathlib.Path(__file__).read_text().splitlines()
    line = next(i for i, t in enumerate(lines, 1) if t.endswith("# GUIDE_Z"))
    assert d.by_name("z").source.endswith(f"test_draw.py:{line}:12 (_mixture.<locals>.guide)")
    assert f"test_draw.py:{line} (_mixture.guide)" in text_of(nodes, "z")
    assert "handlers.py" not in d.source
    assert "CategoricalLogits" in text_of(nodes, "z") and f"[{n}]" in text_of(nodes, "z")
    assert "pathwise" in text_of(nodes, "locs") and d.by_name("locs").shape == (2,)
    # the subsample's indices are drawn from the key (jax.random): it is drawn then only
    inputs = {"param_map['weights']", "param_map['m']", "param_map['logits']", "data"}
    assert names(nodes, "input") == inputs | ({"rng_key"} if subsample_size else set())
    (plate,) = {c for _, c, _ in weights}
    (glob,) = names(nodes, "cost") - {plate}
    assert d.by_name(plate).shape == (n,) and d.by_name(glob).shape == ()
    assert weights == {("z", plate, "weights (0: plate)")}
    assert {h for t, h in infl if t == "locs"} == {plate, glob}
    assert {h for t, h in infl if t == "z"} == {plate}
    assert {h for t, h in infl if t == "param_map['m']"} == {"locs", glob}
    assert {h for t, h in infl if t == "param_map['logits']"} == {"z", plate}
    assert {h for t, h in infl if t == "param_map['weights']"} == {plate}


# -- Bad input -------------------------------------------------------------------------------


def test_no_sample_site_draws_with_a_warning():
    def f(theta, key):
        return (theta**2).sum()

    with pytest.warns(UserWarning, match="draws no sample"):
        d = scg.draw(f)(jnp.ones(2), KEY)
    nodes, infl, weights = parse(d.source)
    assert names(nodes, "stochastic") == set() and weights == set()
    assert {t for t, _ in infl} == {"theta"}


def test_non_scalar_cost_is_refused_as_by_scg_grad():
    def f(theta, key):
        return theta * scg.sample(key, dist.Bernoulli(logits=theta))

    with pytest.raises(ValueError, match="scalar cost"):
        scg.draw(f)(jnp.zeros(3), KEY)


def test_constant_cost_term_is_marked():
    def f(theta, key):
        def step(total, k):
            a = scg.sample(k, dist.Bernoulli(logits=theta), name="a")
            return total + a, None

        total, _ = lax.scan(step, 1.0, jax.random.split(key, 3))
        return total

    d = scg.draw(f)(jnp.array(0.0), KEY)
    nodes, infl, _ = parse(d.source)
    const = {n for n in names(nodes, "cost") if "constant" in text_of(nodes, n)}
    assert const == {n for n in names(nodes, "cost") if not any(h == n for _, h in infl)}


# -- Rendering ---------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_DOT, reason="Graphviz's dot is not installed")
def test_renders_svg_png_and_in_jupyter(tmp_path):
    d = scg.draw(fig1)(jnp.array(0.1), jnp.array(0.2), KEY)
    assert b"<svg" in d.save(tmp_path / "g.svg").read_bytes()
    assert d.save(tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert d.save(tmp_path / "g.dot").read_text() == d.source
    assert "<svg" in d._repr_mimebundle_()["image/svg+xml"]


def test_without_dot_the_source_still_works(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no dot on PATH
    d = scg.draw(fig1)(jnp.array(0.1), jnp.array(0.2), KEY)
    assert d.source.startswith("digraph")
    assert set(d._repr_mimebundle_()) == {"text/plain"}
    with pytest.raises(RuntimeError, match="dot"):
        d.save(tmp_path / "g.svg")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d.save(tmp_path / "g.dot")


def test_example_script_drawings():
    import importlib.util

    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "draw_graph.py"
    spec = importlib.util.spec_from_file_location("draw_graph", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    drawn = module.drawings()
    _, _, weights = parse(drawn["vae"].source)
    assert {label for _, _, label in weights} == {"weights (0: plate)"}
    nodes, infl, _ = parse(drawn["policy"].source)
    assert ("a", "a") in infl
    nodes, _, weights = parse(drawn["figure1"].source)
    assert names(nodes, "stochastic") == {"x", "z", "y"} and len(weights) == 3
    nodes, _, weights = parse(drawn["mixture_svi"].source)
    assert names(nodes, "stochastic") == {"locs", "z"}
    assert {(w, label) for w, _, label in weights} == {("z", "weights (0: plate)")}
    assert "draw_graph.py" in text_of(nodes, "z") and "mixture_guide" in text_of(nodes, "z")
