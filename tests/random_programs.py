"""Random stochastic programs for property-based tests (hypothesis).

A program is a small tree of operations (`Expr`) whose root is a scalar cost; `Program`
compiles it to Python source, so a failing case shrinks to a program one can read, run
and paste into a test: `repr(program)` *is* that source. The tree is built top-down from
the shape each node must have, so every operation is reached in every position:

* on the cost's additive tail (`add`, `sub`, `neg`, sums and means, scaling and division by
  sample-free factors on either side, `einsum`, `concatenate`/`stack`/`pad`, `where`,
  `cumsum`, reshapes, transposes, dtype conversions), where scgjax splits the cost into
  terms, and
* below nonlinear operations (`tanh`, squares, products of two samples, ...), where only
  the dependency tracking (automatic plates, causality) decides which score terms weight
  which cost element;

inside `jit`, `checkpoint`, `cond`/`switch` (with parameter and sampled predicates),
`scan`/`fori_loop` (stacked outputs, accumulating and discounted carries, nested loops),
`vmap`, and an inner `scg.scg_grad` (its draws become nodes of the outer graph).

Score sites are Bernoulli and small: at most `MAX_ELEMENTS` joint elements (a site inside
a loop or a `vmap` counts once per iteration or lane), so `tests/exact.py` enumerates every
joint draw cheaply. Pathwise sites (`Normal`) are free.

`Program.source(dead=True)` renders the same program with every *use* of a score draw's
value replaced by a constant (the draws still happen): no score node reaches the cost,
and `scg_grad(f)` must then be `jax.grad(f)` to the last bit.

`python tests/random_programs.py [N]` prints N example programs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import linecache
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from hypothesis import strategies as st

MAX_ELEMENTS = 8  # joint Bernoulli elements (enumeration: at most 2**8 draws)
MAX_SIZE = 12  # elements of any intermediate array
MAX_NODES = 22  # operations per program
MAX_WRAPPERS = 3  # higher-order operations per program (jit, cond, scan, vmap, ...)
MAX_NESTING = 2  # of higher-order operations inside each other
MAX_NDIM = 3  # axes of any intermediate array
N_THETA = 6  # length of θ
F, F32 = "f", "f32"  # θ's dtype, float32


@dataclasses.dataclass(frozen=True)
class Expr:
    """One operation: `op` on `args` (sub-expressions), with static `attrs`; its value has
    `shape` and `dtype` (`F`: θ's dtype, `F32`: float32)."""

    op: str
    shape: tuple
    args: tuple = ()
    attrs: tuple = ()
    dtype: str = F

    def __getitem__(self, key):
        return dict(self.attrs)[key]


def E(op, shape, *args, dtype=F, **attrs) -> Expr:
    return Expr(op, tuple(shape), tuple(args), tuple(sorted(attrs.items())), dtype)


def size(shape) -> int:
    return int(np.prod(shape, dtype=int))


def fits(shape) -> bool:
    return size(shape) <= MAX_SIZE and len(shape) <= MAX_NDIM


# Operations that keep a float32 value exact when their operands are exact (small dyadic
# numbers): a float32 conversion is generated only on such values, so that rounding never
# decides a float64 comparison at rtol 1e-9.
EXACT_OPS = frozenset(
    """neg add sub mul sum cumsum transpose reshape expand squeeze broadcast
    slice pad shift take concat stack where split sort_take einsum to_f32""".split()
)


def exact32(e: Expr) -> bool:
    if e.op in ("site", "draw", "const"):
        return True
    if e.op == "where":
        return exact32(e.args[1]) and exact32(e.args[2])
    if e.op == "take_sampled":
        return exact32(e.args[0])
    return e.op in EXACT_OPS and all(exact32(a) for a in e.args)


@dataclasses.dataclass(frozen=True)
class Site:
    """A top-level Bernoulli site, drawn before the cost: `name ~ Bernoulli(logits)` with
    `sample_shape`."""

    name: str
    sample_shape: tuple
    logits: Expr

    @property
    def shape(self):
        return self.sample_shape + self.logits.shape


@dataclasses.dataclass(frozen=True)
class Program:
    sites: tuple
    cost: Expr
    theta: tuple
    features: frozenset = frozenset()

    def source(self, dead: bool = False) -> str:
        return Emitter(dead).program(self)

    def compile(self, dead: bool = False) -> Callable:
        """The program as a Python function `f(theta, key)`; tracebacks show its lines."""
        src = self.source(dead)
        filename = f"<random program {hashlib.sha1(src.encode()).hexdigest()[:10]}>"
        linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
        namespace: dict[str, Any] = {}
        exec(compile(src, filename, "exec"), _namespace(), namespace)
        return namespace["f"]

    @property
    def reaches_cost(self) -> bool:
        """Whether a score draw's value reaches the cost (structurally)."""
        return _uses_score(self.cost)

    def __repr__(self):
        return f"\n{self.source()}\ntheta = {list(self.theta)}\n"


def _namespace() -> dict:
    import jax
    import jax.numpy as jnp
    import numpyro.distributions as dist
    from jax import lax

    import scgjax as scg

    return {"jax": jax, "jnp": jnp, "np": np, "lax": lax, "dist": dist, "scg": scg}


def _uses_score(e: Expr) -> bool:
    if e.op in ("site", "draw"):
        return True
    return any(_uses_score(a) for a in e.args if isinstance(a, Expr))


# -- Generation ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Where:
    """Where in the program a node is generated."""

    mult: int = 1  # elements per draw element (enclosing loop lengths, lanes)
    leaves: tuple = ()  # scope values: (op, name, shape), e.g. ("x", "x3", (2,))
    param: str = "theta"  # the differentiated parameter here (`phi` in an inner grad)
    n_param: int = N_THETA
    top: bool = True  # at top level (draws go to the prologue)
    axis_names: tuple = ()  # enclosing vmap axis names (collectives)
    loops: int = 0  # enclosing scans
    nest: int = 0  # enclosing higher-order operations


class Gen:
    """The state of one program's generation: hypothesis' `draw`, the Bernoulli elements
    and operations left, the top-level sites, and the features used."""

    def __init__(self, draw, collectives: bool = False, features=None):
        self.d = draw
        self.budget = MAX_ELEMENTS
        self.nodes = MAX_NODES
        self.wrappers = MAX_WRAPPERS
        self.sites: list[Site] = []
        self.counter = 0
        self.features: set[str] = set()
        self.collectives = collectives
        self.only = features  # None: every feature

    # choices shrink towards their first option
    def int(self, lo, hi) -> int:
        return self.d(st.integers(lo, hi))

    def choice(self, options):
        options = list(options)
        return options[self.int(0, len(options) - 1)]

    def flag(self) -> bool:
        return self.d(st.booleans())

    def weighted(self, options):
        """A choice among (weight, value) pairs (weights are integers)."""
        options = [(w, v) for w, v in options if w > 0]
        total = sum(w for w, _ in options)
        r = self.int(0, total - 1)
        for w, v in options:
            if r < w:
                return v
            r -= w
        raise AssertionError

    def name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def allowed(self, feature: str) -> bool:
        return self.only is None or feature in self.only

    def use(self, feature: str) -> None:
        self.features.add(feature)


def _dims(g: Gen, n: int) -> tuple:
    return tuple(g.int(1, 3) for _ in range(n))


def broadcastable(g: Gen, shape: tuple) -> tuple:
    """A shape that broadcasts to `shape`: itself, fewer leading axes, size-1 axes."""
    kind = g.int(0, 3)
    if kind == 0 or not shape:
        return shape
    if kind == 1:
        return ()
    if kind == 2:
        return shape[g.int(1, len(shape)) :]
    return tuple(1 if g.flag() else s for s in shape)


def gen_theta(g: Gen, shape: tuple, w: Where) -> Expr:
    idx = tuple(g.int(0, w.n_param - 1) for _ in range(size(shape)))
    return E("theta", shape, name=w.param, idx=idx)


def gen_const(g: Gen, shape: tuple) -> Expr:
    values = tuple(g.int(-8, 8) / 4 for _ in range(size(shape)))
    return E("const", shape, values=values)


def gen_free(g: Gen, shape: tuple, w: Where, depth: int = 1) -> Expr:
    """A sample-free factor: θ and constants, through a nonlinear op or a sum."""
    kind = g.weighted([(4, "theta"), (2, "const"), (2 if depth else 0, "op")])
    if kind == "theta":
        return gen_theta(g, shape, w)
    if kind == "const":
        return gen_const(g, shape)
    op = g.choice(["sin", "add", "tanh"])
    if op == "add":
        return E(
            "add",
            shape,
            gen_free(g, shape, w, depth - 1),
            gen_free(g, broadcastable(g, shape), w, depth - 1),
        )
    return E(op, shape, gen_free(g, shape, w, depth - 1))


def gen_logits(g: Gen, batch: tuple, w: Where) -> Expr:
    """A draw's logits: a sample-free function of θ, plus (a chain) an earlier top-level
    site of the same shape."""
    logits = gen_free(g, batch, w)
    parents = [s for s in g.sites if s.shape in (batch, ())]
    if parents and g.int(0, 2) == 0:
        g.use("chain")
        p = g.choice(parents)
        logits = E(
            "add",
            batch,
            logits,
            E("mul", batch, E("const", (), values=(0.75,)), E("site", p.shape, name=p.name)),
        )
    return logits


def gen_score(g: Gen, shape: tuple, w: Where) -> Expr | None:
    """A Bernoulli value of `shape`: a new site (top-level in the prologue, else drawn in
    place) when the budget allows, else an earlier top-level site of that shape."""
    same = [s for s in g.sites if s.shape == shape]
    if same and (g.flag() or size(shape) * w.mult > g.budget):
        s = g.choice(same)
        return E("site", shape, name=s.name)
    if size(shape) * w.mult > g.budget or len(g.sites) >= 5:
        return None
    n_sample = 0
    if shape and g.int(0, 3) == 0:
        n_sample = g.int(1, len(shape))
        g.use("sample_shape")
    sample_shape, batch = shape[:n_sample], shape[n_sample:]
    g.budget -= size(shape) * w.mult
    logits = gen_logits(g, batch, w)
    name = g.name("z")
    if w.top:
        g.sites.append(Site(name, sample_shape, logits))
        return E("site", shape, name=name)
    g.use("draw_inside")
    return E("draw", shape, logits, name=name, sample_shape=sample_shape)


def gen_leaf(g: Gen, shape: tuple, w: Where, allow_sample: bool = True) -> Expr:
    scope = [leaf for leaf in w.leaves if leaf[2] == shape]
    kind = g.weighted(
        [
            (6 if allow_sample else 0, "score"),
            (3, "theta"),
            (2, "const"),
            (4 if scope else 0, "scope"),
            (1, "pathwise"),
        ]
    )
    if kind == "score":
        e = gen_score(g, shape, w)
        if e is not None:
            return e
        kind = "theta"
    if kind == "scope":
        op, name, _ = g.choice(scope)
        return E(op, shape, name=name)
    if kind == "pathwise":
        g.use("pathwise")
        return E("normal", shape, gen_free(g, shape, w), name=g.name("n"))
    if kind == "theta":
        return gen_theta(g, shape, w)
    return gen_const(g, shape)


def insert_axis(g: Gen, shape: tuple, n: int | None = None) -> tuple[tuple, int]:
    """`shape` with a new axis of size `n` (random) at a random position (a shape with
    too many axes is rejected by `fits`)."""
    a = g.int(0, len(shape))
    return shape[:a] + (g.int(1, 3) if n is None else n,) + shape[a:], a


def gen(g: Gen, shape: tuple, w: Where, depth: int) -> Expr:
    """An expression of `shape` (dtype F or F32)."""
    if depth <= 0 or g.nodes <= 0:
        return gen_leaf(g, shape, w)
    g.nodes -= 1
    nd = len(shape)
    big = max(shape, default=0)
    linear = 6 if depth >= 3 else 2
    focus = 5 if g.only is not None else 1  # a test about some features: make them common
    if g.wrappers <= 0 or w.nest >= MAX_NESTING:
        focus = 0  # no more higher-order operations
    ops = [
        (8, "leaf"),
        (linear, "sum"),
        (linear // 2, "mean"),
        (linear, "add"),
        (linear, "sub"),
        (linear // 2, "neg"),
        (linear, "scale"),
        (linear // 2, "div"),
        (linear if nd <= 2 else 0, "einsum"),
        (4, "nonlin"),
        (3, "mul"),
        (2 if nd else 0, "cumsum"),
        (2 if nd >= 2 else 0, "transpose"),
        (2, "reshape"),
        (1 if 1 in shape else 0, "expand"),
        (1, "squeeze"),
        (1 if nd else 0, "broadcast"),
        (2 if nd else 0, "slice"),
        (1 if big >= 2 else 0, "pad"),
        (2 if big >= 2 else 0, "shift"),
        (2 if nd else 0, "take"),
        (2, "take_sampled"),
        (1 if nd else 0, "split"),
        (1 if big >= 2 else 0, "sort_take"),
        (2 if big >= 2 else 0, "concat"),
        (1 if 2 in shape else 0, "stack"),
        (2, "where"),
        (1, "to_f32"),
        (1, "to_int"),
        (1, "stopgrad"),
        (1, "complex"),
        (2 * focus if g.allowed("jit") else 0, "jit"),
        (1 * focus if g.allowed("checkpoint") else 0, "checkpoint"),
        (2 * focus if g.allowed("cond") else 0, "cond"),
        (1 * focus if g.allowed("cond") else 0, "switch"),
        (3 * focus if g.allowed("scan") else 0, "scan_ys"),
        (3 * focus if g.allowed("scan") else 0, "scan_carry"),
        (1 * focus if g.allowed("scan") else 0, "fori"),
        (3 * focus if g.allowed("vmap") else 0, "vmap"),
        (
            3 * focus if nd <= 1 and size(shape) <= 3 and w.top and g.allowed("inner_grad") else 0,
            "inner_grad",
        ),
        (3 if w.axis_names and g.collectives else 0, "collective"),
    ]
    op = g.weighted(ops)
    if op == "leaf":
        g.nodes += 1
        return gen_leaf(g, shape, w)
    if op in WRAPPERS:
        g.wrappers -= 1
        w = dataclasses.replace(w, nest=w.nest + 1)
    g.use(op)
    sub = depth - 1
    return OPS[op](g, shape, w, sub)


WRAPPERS = frozenset(
    {"jit", "checkpoint", "cond", "switch", "scan_ys", "scan_carry", "fori", "vmap", "inner_grad"}
)


def as_f(e: Expr) -> Expr:
    return E("to_f", e.shape, e) if e.dtype == F32 else e


def gen_f(g, shape, w, depth) -> Expr:
    return as_f(gen(g, shape, w, depth))


def _join_dtype(*es) -> str:
    return F if any(e.dtype == F for e in es) else F32


def op_sum(g, shape, w, depth, mean=False):
    keep = g.flag() and any(s == 1 for s in shape)
    if keep:  # keepdims: some size-1 axes of the output were reduced
        axes = tuple(a for a, s in enumerate(shape) if s == 1 and g.flag()) or (shape.index(1),)
        child = tuple(g.int(1, 3) if a in axes else s for a, s in enumerate(shape))
    else:
        child, axes = shape, []
        for _ in range(g.int(1, max(1, min(2, MAX_NDIM - len(shape))))):
            child, a = insert_axis(g, child)
            axes = [b + (b >= a) for b in axes] + [a]
        axes = tuple(sorted(axes))
    if not fits(child):
        return gen_leaf(g, shape, w)
    x = gen(g, child, w, depth)
    return E(
        "mean" if mean else "sum",
        shape,
        x if not mean else as_f(x),
        axes=axes,
        keepdims=keep,
        dtype=x.dtype if not mean else F,
    )


def op_binary(op):
    def rule(g, shape, w, depth):
        # operand kinds: both anything, or one a sample-free factor (θ on either side)
        kind = g.choice(["any", "free_right", "free_left"]) if op != "add" else "any"
        other = broadcastable(g, shape)
        a = gen(g, shape, w, depth)
        b = gen_free(g, other, w) if kind != "any" else gen(g, other, w, depth)
        if kind == "free_left" or (kind == "any" and g.flag()):
            a, b = b, a
        return E(op, shape, a, b, dtype=_join_dtype(a, b))

    return rule


def op_scale(g, shape, w, depth):
    x = gen(g, shape, w, depth)
    factor = gen_free(g, broadcastable(g, shape), w)
    left = g.flag()
    return E("mul", shape, *((factor, x) if left else (x, factor)), dtype=_join_dtype(x, factor))


def op_neg(g, shape, w, depth):
    x = gen(g, shape, w, depth)
    return E("neg", shape, x, dtype=x.dtype)


def op_div(g, shape, w, depth):
    # a / (c + b**2): a sample-free denominator exercises the linear rule of `div`
    kind = g.choice(["free_den", "any", "free_num"])
    num_shape, den_shape = shape, broadcastable(g, shape)
    if g.flag():
        num_shape, den_shape = den_shape, shape
    num = gen_free(g, num_shape, w) if kind == "free_num" else gen_f(g, num_shape, w, depth)
    den = gen_free(g, den_shape, w) if kind == "free_den" else gen_f(g, den_shape, w, depth)
    return E("div", shape, num, den)


def op_nonlin(g, shape, w, depth):
    fn = g.choice(["tanh", "sq", "sin", "sigmoid", "mulself"])
    x = gen_f(g, shape, w, depth)
    return E(fn, shape, x)


def op_mul(g, shape, w, depth):
    a = gen(g, shape, w, depth)
    b = gen(g, broadcastable(g, shape), w, depth)
    if g.flag():
        a, b = b, a
    return E("mul", shape, a, b, dtype=_join_dtype(a, b))


def op_cumsum(g, shape, w, depth):
    x = gen(g, shape, w, depth)
    return E(
        "cumsum",
        shape,
        x,
        axis=g.int(0, len(shape) - 1),
        reverse=g.flag(),
        lax=g.flag(),
        dtype=x.dtype,
    )


def op_transpose(g, shape, w, depth):
    perm = tuple(g.d(st.permutations(range(len(shape)))))
    child = [0] * len(shape)
    for i, p in enumerate(perm):
        child[p] = shape[i]
    x = gen(g, tuple(child), w, depth)
    return E("transpose", shape, x, perm=perm, dtype=x.dtype)


def op_reshape(g, shape, w, depth):
    kind = g.int(0, 2)
    if (kind == 0 or not shape) and len(shape) < MAX_NDIM:  # a size-1 axis more
        child, _ = insert_axis(g, shape, 1)
    elif kind == 1 and 1 in shape:  # the input lacks one of the output's size-1 axes
        a = shape.index(1)
        child = shape[:a] + shape[a + 1 :]
    else:  # merge or split axes: not aligned
        n = size(shape)
        child = {
            1: (1,),
            2: (2,),
            3: (3,),
            4: (2, 2),
            6: (2, 3),
            8: (2, 4),
            9: (3, 3),
            12: (3, 4),
        }.get(n, (n,))
        if child == shape:
            child = (n,)
    x = gen(g, child, w, depth)
    return E("reshape", shape, x, dtype=x.dtype)


def op_expand(g, shape, w, depth):
    a = g.choice([i for i, s in enumerate(shape) if s == 1])
    x = gen(g, shape[:a] + shape[a + 1 :], w, depth)
    return E("expand", shape, x, axis=a, dtype=x.dtype)


def op_squeeze(g, shape, w, depth):
    child, a = insert_axis(g, shape, 1)
    if not fits(child):
        return gen_leaf(g, shape, w)
    x = gen(g, child, w, depth)
    return E("squeeze", shape, x, axis=a, dtype=x.dtype)


def op_broadcast(g, shape, w, depth):
    child = broadcastable(g, shape)
    x = gen(g, child, w, depth)
    return E("broadcast", shape, x, dtype=x.dtype)


def op_slice(g, shape, w, depth):
    a = g.int(0, len(shape) - 1)
    n = shape[a]
    kind = g.choice(["start", "stop", "step", "rev"])
    m = {"start": n + 1, "stop": n + 1, "step": 2 * n, "rev": n}[kind]
    child = shape[:a] + (m,) + shape[a + 1 :]
    if size(child) > MAX_SIZE:
        child, kind = shape, "rev"
    x = gen(g, child, w, depth)
    return E("slice", shape, x, axis=a, kind=kind, dtype=x.dtype)


def op_pad(g, shape, w, depth):
    a = g.choice([i for i, s in enumerate(shape) if s >= 2])
    lo = g.int(0, shape[a] - 1)
    hi = g.int(0, shape[a] - 1 - lo)
    child = shape[:a] + (shape[a] - lo - hi,) + shape[a + 1 :]
    x = gen(g, child, w, depth)
    return E("pad", shape, x, axis=a, lo=lo, hi=hi, dtype=x.dtype)


def op_shift(g, shape, w, depth):
    # lax.pad with a negative side: same size, shifted by one (not aligned)
    a = g.choice([i for i, s in enumerate(shape) if s >= 2])
    x = gen(g, shape, w, depth)
    lo = g.choice([1, -1])
    return E("shift", shape, x, axis=a, lo=lo, hi=-lo, dtype=x.dtype)


def op_take(g, shape, w, depth):
    a = g.int(0, len(shape) - 1)
    m = g.int(1, 3)
    child = shape[:a] + (m,) + shape[a + 1 :]
    if size(child) > MAX_SIZE:
        child, m = shape, shape[a]
    idx = tuple(g.int(0, m - 1) for _ in range(shape[a]))
    x = gen(g, child, w, depth)
    return E("take", shape, x, axis=a, idx=idx, style=g.choice(["take", "index"]), dtype=x.dtype)


def op_take_sampled(g, shape, w, depth):
    """`jnp.take(x, z.astype(int), axis)` with `z` a Bernoulli draw: a scalar index
    (removes the axis) or one index per output element along the axis."""
    scalar = not shape or g.flag()
    if scalar:
        a = g.int(0, len(shape))
        child, idx_shape = shape[:a] + (g.int(2, 3),) + shape[a:], ()
    else:
        a = g.int(0, len(shape) - 1)
        child, idx_shape = shape[:a] + (g.int(2, 3),) + shape[a + 1 :], (shape[a],)
    if not fits(child):
        return gen_leaf(g, shape, w)
    idx = gen_score(g, idx_shape, w)
    if idx is None:
        return gen_leaf(g, shape, w)
    x = gen(g, child, w, depth)
    return E("take_sampled", shape, x, idx, axis=a, dtype=x.dtype)


def op_split(g, shape, w, depth):
    a = g.int(0, len(shape) - 1)
    child = shape[:a] + (2 * shape[a],) + shape[a + 1 :]
    if size(child) > MAX_SIZE:
        return gen_leaf(g, shape, w)
    x = gen(g, child, w, depth)
    return E("split", shape, x, axis=a, part=g.int(0, 1), dtype=x.dtype)


def op_sort_take(g, shape, w, depth):
    """`lax.sort((keys, x), num_keys=1)[1]`: x permuted by the order of the keys (a
    multi-output primitive)."""
    a = g.choice([i for i, s in enumerate(shape) if s >= 2])
    keys = gen_free(g, shape, w) if g.flag() else gen_f(g, shape, w, depth - 1)
    x = gen(g, shape, w, depth)
    return E("sort_take", shape, keys, x, axis=a, dtype=x.dtype)


def op_concat(g, shape, w, depth):
    a = g.choice([i for i, s in enumerate(shape) if s >= 2])
    n1 = g.int(1, shape[a] - 1)
    xs = [gen(g, shape[:a] + (n,) + shape[a + 1 :], w, depth) for n in (n1, shape[a] - n1)]
    return E("concat", shape, *xs, axis=a, dtype=_join_dtype(*xs))


def op_stack(g, shape, w, depth):
    a = g.choice([i for i, s in enumerate(shape) if s == 2])
    child = shape[:a] + shape[a + 1 :]
    xs = [gen(g, child, w, depth) for _ in range(2)]
    return E("stack", shape, *xs, axis=a, dtype=_join_dtype(*xs))


def op_einsum(g, shape, w, depth):
    nd = len(shape)
    i = g.int(0, nd)
    j = g.int(i, nd)
    batch, lfree, rfree = shape[:i], shape[i:j], shape[j:]
    contract = _dims(g, g.int(0 if nd else 1, 2))
    letters = iter("abcdefgh")
    lb, ll, lr, lc = ([next(letters) for _ in s] for s in (batch, lfree, rfree, contract))
    lhs, rhs = lb + ll + lc, lb + lc + lr
    lhs_shape = batch + lfree + contract
    rhs_shape = batch + contract + rfree
    if size(lhs_shape) > MAX_SIZE or size(rhs_shape) > MAX_SIZE:
        return gen_leaf(g, shape, w)
    lp = g.d(st.permutations(range(len(lhs))))
    rp = g.d(st.permutations(range(len(rhs))))
    lhs, lhs_shape = [lhs[k] for k in lp], tuple(lhs_shape[k] for k in lp)
    rhs, rhs_shape = [rhs[k] for k in rp], tuple(rhs_shape[k] for k in rp)
    kind = g.choice(["free_right", "free_left", "any"])
    a = gen(g, lhs_shape, w, depth) if kind != "free_left" else gen_free(g, lhs_shape, w)
    b = gen(g, rhs_shape, w, depth) if kind != "free_right" else gen_free(g, rhs_shape, w)
    spec = f"{''.join(lhs)},{''.join(rhs)}->{''.join(lb + ll + lr)}"
    return E("einsum", shape, as_f(a), as_f(b), spec=spec)


def gen_pred(g: Gen, shape: tuple, w: Where, depth: int) -> Expr:
    """A boolean of `shape`: a comparison of a draw, of θ or of anything."""
    kind = g.choice(["score", "theta", "any"])
    if kind == "score":
        x = gen_score(g, shape, w) or gen_theta(g, shape, w)
    elif kind == "theta":
        x = gen_free(g, shape, w)
    else:
        x = gen_f(g, shape, w, depth)
    return E("gt", shape, as_f(x), threshold=g.choice([0.5, 0.0, -0.25]))


def op_where(g, shape, w, depth):
    pred = gen_pred(g, broadcastable(g, shape), w, depth - 1)
    a = gen(g, shape, w, depth)
    b = gen(g, broadcastable(g, shape), w, depth)
    if g.flag():
        a, b = b, a
    return E("where", shape, pred, a, b, dtype=_join_dtype(a, b))


def op_to_f32(g, shape, w, depth):
    x = gen(g, shape, w, depth)
    if not exact32(x):
        return x
    return E("to_f32", shape, x, dtype=F32)


def op_to_int(g, shape, w, depth):
    x = gen_f(g, shape, w, depth)
    return E("to_int", shape, E("mul", shape, x, E("const", (), values=(2.0,))))


def op_complex(g, shape, w, depth):
    """`jnp.real(x * c)` with a complex constant `c`: a detour through complex numbers."""
    x = gen_f(g, shape, w, depth)
    return E("complex", shape, x, c=g.choice([(1.0, 0.5), (-0.5, 2.0)]))


def op_stopgrad(g, shape, w, depth):
    x = gen(g, shape, w, depth)
    return E("stopgrad", shape, x, dtype=x.dtype)


def op_call(kind):
    def rule(g, shape, w, depth):
        inner = dataclasses.replace(w, top=False)
        x = gen_f(g, shape, inner, depth)
        return E(kind, shape, x)

    return rule


def op_cond(g, shape, w, depth):
    inner = dataclasses.replace(w, top=False)
    pred = gen_pred(g, (), w, 1)
    branches = [gen_f(g, shape, inner, depth) for _ in range(2)]
    return E("cond", shape, pred, *branches)


def op_switch(g, shape, w, depth):
    inner = dataclasses.replace(w, top=False)
    n = g.int(1, 3)
    index = gen_score(g, (n,), w) or gen_const(g, (n,))
    branches = [gen_f(g, shape, inner, depth) for _ in range(3)]
    return E("switch", shape, index, *branches)


def op_scan(out: str):
    """`lax.scan` whose carry is `carry + inc`, `γ·carry + inc` (γ a literal or a
    function of θ) or nonlinear, with optional scanned inputs and draws in the body;
    its value is the stacked `y` (`out="ys"`) or the final carry."""

    def rule(g, shape, w, depth):
        if out == "ys":
            length, y_shape = shape[0], shape[1:]
            carry_shape = g.choice([(), y_shape])
        else:
            length, carry_shape, y_shape = g.int(1, 3), shape, None
        xs_shape = (length,) + _dims(g, g.int(0, 1)) if g.flag() else None
        if xs_shape and size(xs_shape) > MAX_SIZE:
            xs_shape = None
        mode = g.choice(["add", "add_r", "disc", "disc_r", "disc_theta", "nonlin", "disc_body"])
        g.use(f"scan_{mode}")
        reverse = g.flag()
        if reverse:
            g.use("scan_reverse")
        if w.loops:
            g.use("nested_scan")
        init = gen_f(g, carry_shape, w, min(depth, 1))
        xs = gen_f(g, xs_shape, w, depth) if xs_shape else None
        gamma = None
        if mode in ("disc_theta", "disc_body"):  # a loop constant, or computed in the body
            gamma = E("sigmoid", (), gen_free(g, (), w, 0))
        c, x, cnew = g.name("c"), g.name("x"), g.name("cn")
        leaves = w.leaves + (
            (("carry", c, carry_shape),) + ((("x", x, xs_shape[1:]),) if xs_shape else ())
        )
        body = dataclasses.replace(
            w, mult=w.mult * length, leaves=leaves, top=False, loops=w.loops + 1
        )
        inc = gen_f(g, carry_shape, body, depth)
        y = None
        if y_shape is not None:
            y_where = dataclasses.replace(body, leaves=leaves + (("carry", cnew, carry_shape),))
            y = gen_f(g, y_shape, y_where, depth)
        args = (
            (init, inc)
            + ((y,) if y is not None else ())
            + ((xs,) if xs else ())
            + ((gamma,) if gamma else ())
        )
        return E(
            "scan",
            shape,
            *args,
            out=out,
            length=length,
            mode=mode,
            reverse=reverse,
            carry=c,
            x=x,
            cnew=cnew,
            has_xs=xs is not None,
            has_y=y is not None,
            has_gamma=gamma is not None,
        )

    return rule


def op_fori(g, shape, w, depth):
    """`lax.fori_loop(0, T, ...)` with static bounds (a scan with a counter), indexing a
    closed-over array at the counter."""
    length = g.int(1, 3)
    c, i = g.name("c"), g.name("i")
    table_shape = (length,) + shape
    table = gen_f(g, table_shape, w, depth) if size(table_shape) <= MAX_SIZE and g.flag() else None
    init = gen_f(g, shape, w, min(depth, 1))
    leaves = w.leaves + (("carry", c, shape),) + ((("row", i, shape),) if table else ())
    body = dataclasses.replace(w, mult=w.mult * length, leaves=leaves, top=False, loops=w.loops + 1)
    inc = gen_f(g, shape, body, depth)
    return E(
        "fori",
        shape,
        init,
        inc,
        *((table,) if table else ()),
        length=length,
        carry=c,
        i=i,
        has_table=table is not None,
    )


def reduced(rule):
    """`rule` for a shape with an axis; for a scalar (or at random), `rule` on a shape with
    one more axis, then a sum or mean over it."""

    def wrapper(g, shape, w, depth):
        if shape and g.int(0, 2):
            return rule(g, shape, w, depth)
        bigger, a = insert_axis(g, shape)
        if not fits(bigger):
            return gen_leaf(g, shape, w)
        x = rule(g, bigger, w, depth)
        return E(g.choice(["sum", "mean"]), shape, as_f(x), axes=(a,), keepdims=False)

    return wrapper


@reduced
def op_vmap(g, shape, w, depth):
    out_axis = g.int(0, len(shape) - 1)
    lanes = shape[out_axis]
    row_shape = shape[:out_axis] + shape[out_axis + 1 :]
    in_shape = _dims(g, g.int(0, 1))
    in_axis = g.int(0, len(in_shape))
    mapped_shape = in_shape[:in_axis] + (lanes,) + in_shape[in_axis:]
    mapped = gen_f(g, mapped_shape, w, depth) if fits(mapped_shape) and g.flag() else None
    a, axis_name = g.name("r"), g.name("lanes")
    leaves = w.leaves + ((("arg", a, in_shape),) if mapped is not None else ())
    names = w.axis_names + ((axis_name,) if g.collectives else ())
    body = dataclasses.replace(w, mult=w.mult * lanes, leaves=leaves, top=False, axis_names=names)
    x = gen_f(g, row_shape, body, depth)
    return E(
        "vmap",
        shape,
        x,
        *((mapped,) if mapped is not None else ()),
        lanes=lanes,
        in_axis=in_axis,
        out_axis=out_axis,
        arg=a,
        axis_name=axis_name,
        has_mapped=mapped is not None,
    )


def op_inner_grad(g, shape, w, depth):
    """`scg.scg_grad(inner)(phi, key)` inside the program: `phi` a function of θ (and
    maybe of draws), `inner` a stochastic program of its own in `phi`."""
    phi = gen_f(g, shape, w, min(depth, 2))
    inner = Where(mult=w.mult, param="phi", n_param=max(size(shape), 1), top=False, nest=w.nest)
    cost = gen_f(g, (), inner, max(depth, 2))
    return E("inner_grad", shape, phi, cost, name=g.name("inner"))


def op_collective(g, shape, w, depth):
    x = gen_f(g, shape, w, depth)
    return E(g.choice(["psum", "pmean"]), shape, x, axis_name=g.choice(w.axis_names))


OPS = {
    "sum": op_sum,
    "mean": lambda g, s, w, d: op_sum(g, s, w, d, mean=True),
    "add": op_binary("add"),
    "sub": op_binary("sub"),
    "neg": op_neg,
    "scale": op_scale,
    "div": op_div,
    "einsum": op_einsum,
    "nonlin": op_nonlin,
    "mul": op_mul,
    "cumsum": op_cumsum,
    "transpose": op_transpose,
    "reshape": op_reshape,
    "expand": op_expand,
    "squeeze": op_squeeze,
    "broadcast": op_broadcast,
    "slice": op_slice,
    "pad": op_pad,
    "shift": op_shift,
    "take": op_take,
    "take_sampled": op_take_sampled,
    "split": op_split,
    "sort_take": op_sort_take,
    "concat": op_concat,
    "stack": op_stack,
    "where": op_where,
    "to_f32": op_to_f32,
    "to_int": op_to_int,
    "stopgrad": op_stopgrad,
    "complex": op_complex,
    "jit": op_call("jit"),
    "checkpoint": op_call("checkpoint"),
    "cond": op_cond,
    "switch": op_switch,
    "scan_ys": reduced(op_scan("ys")),
    "scan_carry": op_scan("carry"),
    "fori": op_fori,
    "vmap": op_vmap,
    "inner_grad": op_inner_grad,
    "collective": op_collective,
}


@st.composite
def programs(
    draw, features=None, collectives: bool = False, depth: int = 5, require_score: bool = True
):
    """Random programs `f(theta, key)`; `features` restricts the higher-order operations
    (e.g. `{"scan"}`), `collectives` adds `psum`/`pmean` inside `vmap`s."""
    g = Gen(draw, collectives, features)
    cost = as_f(gen(g, (), Where(), depth))
    theta = tuple(draw(st.integers(-12, 12)) / 8 for _ in range(N_THETA))
    if require_score and not _uses_score(cost):
        # one more term, so that a score draw reaches the cost
        extra = gen_score(g, (), Where())
        if extra is None and g.sites:
            extra = E("site", g.sites[0].shape, name=g.sites[0].name)
        if extra is not None:
            cost = E(
                "add",
                (),
                cost,
                E("sum", (), extra, axes=tuple(range(len(extra.shape))), keepdims=False),
            )
    return Program(tuple(g.sites), cost, theta, frozenset(g.features))


# -- Rendering -----------------------------------------------------------------------------


class Scope:
    """A function body being written: its lines, the names it defines, the outer names it
    reads (`free`), and (for a key-owning scope) how many keys its draws take."""

    def __init__(
        self,
        parent: Scope | None,
        defined=(),
        key: str | None = None,
        keys_name: str | None = None,
    ):
        self.parent = parent
        self.lines: list[str] = []
        self.defined = set(defined) | ({keys_name} if keys_name else set())
        self.free: list[str] = []
        self.key, self.keys_name, self.n_keys = key, keys_name, 0
        self.prelude: list[str] = []  # lines before the key split (e.g. the key itself)

    def use(self, name: str) -> str:
        if name not in self.defined and name not in self.free:
            self.free.append(name)
            if self.parent is not None:
                self.parent.use(name)
        return name

    def owner(self) -> Scope:
        s = self
        while s.key is None:
            s = s.parent
        return s

    def new_key(self) -> str:
        """A fresh key for one draw (or one loop's keys) in this scope."""
        owner = self.owner()
        owner.n_keys += 1
        return f"{self.use(owner.keys_name)}[{owner.n_keys - 1}]"

    def body(self, indent: str) -> list[str]:
        head = []
        if self.key is not None and self.n_keys:
            head = [f"{self.keys_name} = jax.random.split({self.key}, {self.n_keys})"]
        return [indent + line for line in self.prelude + head + self.lines]


def _shape_src(shape) -> str:
    return "(" + "".join(f"{s}, " for s in shape).rstrip(" ") + ")"


def _array_src(values, shape) -> str:
    arr = np.array(values, dtype=float).reshape(shape)
    return repr(arr.tolist()) if shape else repr(float(arr))


class Emitter:
    def __init__(self, dead: bool = False):
        self.dead = dead
        self.n = 0

    def var(self, scope: Scope, expr_src: str, prefix: str = "v") -> str:
        self.n += 1
        name = f"{prefix}{self.n}"
        if "theta." in expr_src:
            scope.use("theta")
        scope.lines.append(f"{name} = {expr_src}")
        scope.defined.add(name)
        return name

    def program(self, prog: Program) -> str:
        top = Scope(None, {"theta", "key"}, key="key", keys_name="ks")
        for s in prog.sites:
            self.draw(top, s.name, s.logits, s.sample_shape, define=True)
        out = self.emit(prog.cost, top)
        lines = ["def f(theta, key):"] + top.body("    ") + [f"    return {out}"]
        return "\n".join(lines) + "\n"

    def draw(self, scope: Scope, name: str, logits: Expr, sample_shape, define: bool) -> str:
        lg = self.emit(logits, scope)
        ss = f", sample_shape={_shape_src(sample_shape)}" if sample_shape else ""
        src = (
            f"scg.sample({scope.new_key()}, dist.Bernoulli(logits={lg}){ss}, "
            f"name={name!r}).astype(theta.dtype)"
        )
        scope.use("theta")
        if self.dead and not define:
            scope.lines.append(f"_ = {src}")
            return None
        scope.lines.append(f"{name} = {src}")
        scope.defined.add(name)
        return name

    def dead_value(self, scope: Scope, shape) -> str:
        scope.use("theta")
        return self.var(scope, f"jnp.full({_shape_src(shape)}, 0.75, theta.dtype)")

    def emit(self, e: Expr, scope: Scope) -> str:
        method = getattr(self, f"op_{e.op}", None)
        if method is not None:
            return method(e, scope)
        a = [self.emit(x, scope) for x in e.args]
        return self.var(scope, SIMPLE[e.op](e, *a))

    # leaves
    def op_site(self, e, scope):
        if self.dead:
            return self.dead_value(scope, e.shape)
        return scope.use(e["name"])

    def op_draw(self, e, scope):
        name = self.draw(scope, e["name"], e.args[0], e["sample_shape"], define=False)
        return self.dead_value(scope, e.shape) if name is None else name

    def op_theta(self, e, scope):
        p = scope.use(e["name"])
        idx = list(e["idx"])
        flat = p if e["name"] == "theta" else f"jnp.ravel({p})"
        return self.var(scope, f"{flat}[np.array({idx})].reshape({_shape_src(e.shape)})", "t")

    def op_const(self, e, scope):
        scope.use("theta")
        return self.var(scope, f"jnp.asarray({_array_src(e['values'], e.shape)}, theta.dtype)", "k")

    def op_normal(self, e, scope):
        loc = self.emit(e.args[0], scope)
        return self.var(
            scope,
            f"scg.sample({scope.new_key()}, dist.Normal({loc}, 1.0), name={e['name']!r})",
            "n",
        )

    def _scope_leaf(self, e, scope):
        return scope.use(e["name"])

    op_carry = op_x = op_arg = _scope_leaf

    # wrappers with explicit arguments: a body reads outer names as parameters
    def _def(self, scope: Scope, fn: str, params: list[str], inner: Scope, ret: str) -> None:
        scope.lines.extend(
            [f"def {fn}({', '.join(params)}):"] + inner.body("    ") + [f"    return {ret}"]
        )

    def op_jit(self, e, scope, wrap="jax.jit"):
        self.n += 1
        fn = f"_{e.op}{self.n}"
        inner = Scope(scope)
        out = self.emit(e.args[0], inner)
        self._def(scope, fn, inner.free, inner, out)
        return self.var(scope, f"{wrap}({fn})({', '.join(inner.free)})")

    def op_checkpoint(self, e, scope):
        return self.op_jit(e, scope, wrap="jax.checkpoint")

    def op_cond(self, e, scope):
        pred = self.emit(e.args[0], scope)
        return self._branches(scope, "lax.cond", pred, e.args[1:])

    def op_switch(self, e, scope):
        index = self.emit(e.args[0], scope)
        i = self.var(scope, f"jnp.clip(jnp.sum({index}).astype(jnp.int32), 0, 2)")
        return self._branches(scope, "lax.switch", i, e.args[1:])

    def _branches(self, scope, combinator, selector, branches):
        """Every branch takes the names that any branch reads, as operands."""
        self.n += 1
        base = self.n
        inners = [Scope(scope) for _ in branches]
        outs = [self.emit(b, inner) for b, inner in zip(branches, inners)]
        names = list(dict.fromkeys(n for inner in inners for n in inner.free))
        fns = [f"_branch{base}_{k}" for k in range(len(branches))]
        for fn, inner, out in zip(fns, inners, outs):
            self._def(scope, fn, names, inner, out)
        ops = "".join(f", {n}" for n in names)
        fn_src = f"{fns[0]}, {fns[1]}" if combinator == "lax.cond" else f"[{', '.join(fns)}]"
        return self.var(scope, f"{combinator}({selector}, {fn_src}{ops})")

    def op_scan(self, e, scope):
        init = self.emit(e.args[0], scope)
        rest = list(e.args[2:])
        y = rest.pop(0) if e["has_y"] else None
        xs = self.emit(rest.pop(0), scope) if e["has_xs"] else None
        gamma_expr = rest.pop(0) if e["has_gamma"] else None
        gamma = self.emit(gamma_expr, scope) if e["mode"] == "disc_theta" else None
        self.n += 1
        fn, k, length = f"_body{self.n}", f"k{self.n}", e["length"]
        c, x, cnew = e["carry"], e["x"], e["cnew"]
        inner = Scope(scope, {c, x, k}, key=k, keys_name=f"ks{self.n}")
        if e["mode"] == "disc_body":
            gamma = self.emit(gamma_expr, inner)
        inc = self.emit(e.args[1], inner)
        update = {
            "add": f"{c} + {inc}",
            "add_r": f"{inc} + {c}",
            "disc": f"0.5 * {c} + {inc}",
            "disc_r": f"{inc} + {c} * 0.75",
            "disc_theta": f"{gamma} * {c} + {inc}",
            "disc_body": f"{c} * {gamma} + {inc}",
            "nonlin": f"jnp.tanh({c}) + {inc}",
        }[e["mode"]]
        if gamma:
            inner.use(gamma)
        inner.lines.append(f"{cnew} = {update}")
        inner.defined.add(cnew)
        y_out = self.emit(y, inner) if y is not None else "None"
        parts, targets = [], []
        if xs:
            parts.append(xs)
            targets.append(x)
        if inner.n_keys:
            parts.append(f"jax.random.split({scope.new_key()}, {length})")
            targets.append(k)
        if targets:
            inner.prelude.append(
                f"{', '.join(targets)} = xk" if len(targets) > 1 else f"{targets[0]} = xk"
            )
        self._def(scope, fn, [c, "xk"], inner, f"{cnew}, {y_out}")
        xs_src = "None" if not parts else parts[0] if len(parts) == 1 else f"({', '.join(parts)})"
        rev = ", reverse=True" if e["reverse"] else ""
        self.n += 1
        name = f"v{self.n}"
        scope.lines.append(
            f"{name}_c, {name}_y = lax.scan({fn}, {init}, {xs_src}, length={length}{rev})"
        )
        scope.defined |= {f"{name}_c", f"{name}_y"}
        return f"{name}_c" if e["out"] == "carry" else f"{name}_y"

    def op_fori(self, e, scope):
        init = self.emit(e.args[0], scope)
        table = self.emit(e.args[2], scope) if e["has_table"] else None
        self.n += 1
        fn, i, c, k = f"_body{self.n}", e["i"], e["carry"], f"k{self.n}"
        inner = Scope(scope, {i, c, k, f"{i}_row"}, key=k, keys_name=f"ks{self.n}")
        if table:
            inner.prelude.append(f"{i}_row = {inner.use(table)}[{i}]")
        inc = self.emit(e.args[1], inner)
        if inner.n_keys:
            keys = self.var(scope, f"jax.random.split({scope.new_key()}, {e['length']})", "kf")
            inner.prelude.append(f"{k} = {inner.use(keys)}[{i}]")
        self._def(scope, fn, [i, c], inner, f"{c} + {inc}")
        return self.var(scope, f"lax.fori_loop(0, {e['length']}, {fn}, {init})")

    def op_row(self, e, scope):
        return scope.use(f"{e['name']}_row")

    def op_vmap(self, e, scope):
        mapped = self.emit(e.args[1], scope) if e["has_mapped"] else None
        self.n += 1
        fn, k, a = f"_lane{self.n}", f"k{self.n}", e["arg"]
        inner = Scope(scope, {a, k}, key=k, keys_name=f"ks{self.n}")
        out = self.emit(e.args[0], inner)
        params, args, axes = [k], [f"jax.random.split({scope.new_key()}, {e['lanes']})"], ["0"]
        if mapped:
            params.append(a)
            args.append(mapped)
            axes.append(str(e["in_axis"]))
        self._def(scope, fn, params, inner, out)
        name = f", axis_name={e['axis_name']!r}" if _uses_axis(e.args[0], e["axis_name"]) else ""
        return self.var(
            scope,
            f"jax.vmap({fn}, in_axes=({', '.join(axes)},), "
            f"out_axes={e['out_axis']}{name})({', '.join(args)})",
        )

    def op_inner_grad(self, e, scope):
        phi = self.emit(e.args[0], scope)
        self.n += 1
        fn, k = f"_{e['name']}", f"k{self.n}"
        inner = Scope(scope, {"phi", k}, key=k, keys_name=f"ks{self.n}")
        out = self.emit(e.args[1], inner)
        self._def(scope, fn, ["phi", k], inner, out)
        return self.var(scope, f"scg.scg_grad({fn})({phi}, {scope.new_key()})", "g")


def _uses_axis(e: Expr, name: str) -> bool:
    if e.op in ("psum", "pmean") and e["axis_name"] == name:
        return True
    return any(_uses_axis(a, name) for a in e.args if isinstance(a, Expr))


def _padding(e: Expr, n: int) -> list:
    """(lo, hi[, interior]) per axis: `e`'s on its axis, zeros elsewhere."""
    return [(e["lo"], e["hi"], 0)[:n] if k == e["axis"] else (0,) * n for k in range(len(e.shape))]


def _index_src(ndim: int, axis: int, item: str) -> str:
    return "[" + ", ".join([":"] * axis + [item]) + "]"


SIMPLE: dict[str, Callable[..., str]] = {
    "add": lambda e, a, b: f"{a} + {b}",
    "sub": lambda e, a, b: f"{a} - {b}",
    "mul": lambda e, a, b: f"{a} * {b}",
    "neg": lambda e, a: f"-{a}",
    "div": lambda e, a, b: f"{a} / (1.5 + {b} ** 2)",
    "tanh": lambda e, a: f"jnp.tanh({a})",
    "sin": lambda e, a: f"jnp.sin({a})",
    "sigmoid": lambda e, a: f"jax.nn.sigmoid({a})",
    "sq": lambda e, a: f"{a} ** 2",
    "mulself": lambda e, a: f"{a} * {a}",
    "sum": lambda e, a: (
        f"jnp.sum({a}, axis={e['axes']}{', keepdims=True' if e['keepdims'] else ''})"
    ),
    "mean": lambda e, a: (
        f"jnp.mean({a}, axis={e['axes']}{', keepdims=True' if e['keepdims'] else ''})"
    ),
    "cumsum": lambda e, a: (
        f"lax.cumsum({a}, {e['axis']}, reverse={e['reverse']})"
        if e["lax"] or e["reverse"]
        else f"jnp.cumsum({a}, axis={e['axis']})"
    ),
    "transpose": lambda e, a: f"jnp.transpose({a}, {e['perm']})",
    "reshape": lambda e, a: f"{a}.reshape({_shape_src(e.shape)})",
    "expand": lambda e, a: f"jnp.expand_dims({a}, {e['axis']})",
    "squeeze": lambda e, a: f"jnp.squeeze({a}, {e['axis']})",
    "broadcast": lambda e, a: f"jnp.broadcast_to({a}, {_shape_src(e.shape)})",
    "slice": lambda e, a: (
        a
        + _index_src(
            len(e.shape),
            e["axis"],
            {"start": "1:", "stop": f":{e.shape[e['axis']]}", "step": "::2", "rev": "::-1"}[
                e["kind"]
            ],
        )
    ),
    "pad": lambda e, a: f"jnp.pad({a}, {_padding(e, 2)})",
    "shift": lambda e, a: f"lax.pad({a}, jnp.zeros((), {a}.dtype), {_padding(e, 3)})",
    "take": lambda e, a: (
        f"jnp.take({a}, np.array({list(e['idx'])}), axis={e['axis']})"
        if e["style"] == "take"
        else a + _index_src(len(e.shape), e["axis"], f"np.array({list(e['idx'])})")
    ),
    "take_sampled": lambda e, a, i: f"jnp.take({a}, {i}.astype(jnp.int32), axis={e['axis']})",
    "split": lambda e, a: f"jnp.split({a}, 2, axis={e['axis']})[{e['part']}]",
    "sort_take": lambda e, k, a: f"lax.sort(({k}, {a}), dimension={e['axis']}, num_keys=1)[1]",
    "concat": lambda e, a, b: f"jnp.concatenate([{a}, {b}], axis={e['axis']})",
    "stack": lambda e, a, b: f"jnp.stack([{a}, {b}], axis={e['axis']})",
    "einsum": lambda e, a, b: f"jnp.einsum({e['spec']!r}, {a}, {b})",
    "gt": lambda e, a: f"{a} > {e['threshold']}",
    "where": lambda e, p, a, b: f"jnp.where({p}, {a}, {b})",
    "to_f32": lambda e, a: f"{a}.astype(jnp.float32)",
    "to_f": lambda e, a: f"{a}.astype(theta.dtype)",
    "to_int": lambda e, a: f"{a}.astype(jnp.int32).astype(theta.dtype)",
    "stopgrad": lambda e, a: f"lax.stop_gradient({a})",
    "complex": lambda e, a: f"jnp.real({a} * complex{e['c']})",
    "psum": lambda e, a: f"lax.psum({a}, {e['axis_name']!r})",
    "pmean": lambda e, a: f"lax.pmean({a}, {e['axis_name']!r})",
}


if __name__ == "__main__":
    import sys

    from hypothesis import given, settings

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    seen = []

    @settings(max_examples=n, database=None, derandomize=True)
    @given(programs(collectives=os.environ.get("SCGJAX_HYPOTHESIS_COLLECTIVES") == "1"))
    def show(prog):
        seen.append(prog)

    show()
    for p in seen[-n:]:
        print(repr(p), sorted(p.features), "\n")
