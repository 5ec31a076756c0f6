"""Key reuse: draws that share a PRNG key are refused at trace time.

Two draws from one key are not independent: `scg.sample(key, d)` twice gives the same value
twice, and `d.sample(key)` used as the baseline of `scg.sample(key, d, baseline=b)` is the
draw itself. A score-function term assumes that its draw is independent of everything not
computed from it, so such programs get biased gradients (issue 6: 0.490 instead of 0.2445,
and 0.000 instead of 1.222). This pass reads the traced jaxpr once, before the interpreter
runs, and raises a `ValueError` that names both source lines and the fix.

How it works
------------
Every PRNG key element gets an *identity*: a 63-bit structural hash of how it was made (an
input, `split(parent)[i]`, `fold_in(parent, data)`, `key(seed)`, an opaque value...).
Equal identities mean equal keys; structurally different keys are taken to be different.
Typed keys (`jax.random.key`) and legacy `uint32[..., 2]` key data share identities
through `random_wrap` / `random_unwrap`. Integer data (fold-in data, indices, loop
counters) gets a value number the same way, with `i + c` normalised, literals folded and
small integer ops evaluated, so that `fold_in(key, 3)` twice is one key and
`fold_in(key, i)`, `fold_in(key, i + 1)` are two. Element-moving ops (slice, squeeze,
reshape, broadcast, transpose, concatenate, stack, split, unstack, gather and dynamic
slices at known indices, `select_n` with a known predicate) are emulated on positions,
so the keys of `k1, k2 = split(key)` and `keys[0]`, `keys[1]` are exact. `jit`,
`closed_call`, `checkpoint`, `custom_jvp_call` and `custom_vjp_call` are entered (their
primal jaxpr); sub-jaxprs with nothing to do with keys are skipped. A `cond` reads every
branch, each under its own branch choice (two events in different branches of one cond,
or of two conds on one predicate, cannot both happen); a cond on a known index reads
only that branch. A loop body (`scan`, `while`) is read once, with symbols for the
carries and for the scanned row; σ maps one iteration's symbols to the next's (a carry
to what the body returns for it, a scanned row to the next row unless the rows repeat)
and ι to the first iteration's values.

Consumers are `scg_sample` (operand 0, one key per vmapped lane), `random_bits`,
`random_split`, `random_fold_in`, `random_gamma`, `threefry2x32` on the two words of a
legacy key, and any other primitive that takes a typed key and is not known to merely
move or compare it. A *conflict* is one key consumed twice where at least one consumer
is a score-function `scg_sample`. Reuse among plain `jax.random` calls (e.g. inside
numpyro's samplers) is not scgjax's concern, and neither is noise shared by pathwise
draws: a pathwise draw is a function of its noise, and its gradient is right whatever
else shares that noise (common random numbers). Refused:

* one key consumed twice, e.g. by two `scg.sample`s, or by `scg.sample(key, ...)` and
  `split(key)`, `fold_in(key, ...)` or `d.sample(key)` (through numpyro's jitted
  samplers too), in branches that can both run;
* a score-function draw under `jax.vmap` whose key is the same in several lanes: a key
  that is not batched (`sample_p`'s batching rule broadcasts it), or repeated keys;
* in a loop: a key consumed in iteration t and again in t + 1 or t + 2 (σ applied to
  the body's events): a key closed over by the body (the same key every iteration), a
  carried key passed through unchanged or rotated between two carries, scanned keys
  whose rows repeat, a carried key consumed before the iteration that splits it,
  `keys[i]` next to `keys[i + 1]`;
* a key consumed inside a loop and outside it: the first iteration's events (ι) and, for
  scanned keys consumed as they are, every row, are events of the enclosing scope, and so
  are keys a loop consumed and then returned.

Accepted (and exact): keys from `split` used once each; `fold_in(key, i)` with a loop
counter or distinct literals; scanning or vmapping over split keys; a key carried and
split each step (`key, sub = split(key)`); the same key in two branches of one
`lax.cond` / `lax.switch` (under `vmap` with a batched predicate both branches run, and
that is refused); a scan of length 1 over a closed-over key.

Limits (what the pass assumes instead of proving)
-------------------------------------------------
* Keys picked at an index that is not known at trace time (`keys[t]` with `t` traced)
  are assumed distinct from every key named differently: the same traced index twice is
  one key, `keys[t]` and `keys[t + 1]` are two keys, but `keys[t]` and `keys[0]` are
  taken to be different. Refusing them instead would reject `keys[i]` in a
  `fori_loop`, the common idiom; in the first iteration of a loop whose counter starts
  at a literal the index is known and checked exactly.
* Keys that depend on the iteration are assumed to differ between iterations: data
  passed to `fold_in` is assumed injective in the counter (`fold_in(key, i % 2)` is not
  caught), and collisions more than two iterations apart (a carry rotated among three
  keys) are not looked for.
* Keys made inside a loop are compared with keys outside it through the first iteration
  (and every row of scanned keys consumed as they are): a key made in a later iteration
  that equals one made outside (`fold_in(key, 3)` outside, `fold_in(key, i)` inside) is
  not caught.
* Keys that flow through ops the pass does not model (arithmetic on key data, scatters,
  sorts, callbacks, the outputs of a `shard_map`) become new keys, distinct from all
  others; a `shard_map` body is read as one shard, its sharded key operands as blocks of
  new keys (the operands themselves count as consumed by the `shard_map`). Constants of
  the top-level jaxpr are unknown unless it is passed closed.
* A key consumed twice by plain `jax.random` calls is accepted even when what they make
  feeds a score-function draw (`normal(key)` and `split(key)` with a child sampled).

Cost: one walk over the jaxpr; each loop body is walked once and then checked on the
identities of the keys it consumes; sub-jaxprs without keys are not entered. The work is
linear in the size of the jaxpr (a call is read once per call site, as the interpreter
does) plus the number of key elements.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from . import _compat, _sample

# -- Identities ----------------------------------------------------------------------------

MASK = (1 << 63) - 1
_M64 = (1 << 64) - 1
_GOLD, _C1, _C2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_MAX_CONST = 4096  # concrete integer values are tracked up to this many elements
_MAX_EMULATE = 1 << 18  # element-moving ops are emulated up to this many elements


def _h(*parts) -> int:
    """A structural identity for `parts` (ints, strings, bytes and tuples of them)."""
    return hash(parts) & MASK


def _mix(a, b) -> np.ndarray:
    """Elementwise identity of `(a, b)` for uint64 arrays (splitmix64 finaliser)."""
    with np.errstate(over="ignore"):
        x = (np.asarray(a, np.uint64) * np.uint64(_GOLD)) ^ np.asarray(b, np.uint64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(_C1)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(_C2)
        x = x ^ (x >> np.uint64(31))
        return np.asarray(x & np.uint64(MASK), np.uint64)


def _mix1(a: int, b: int) -> int:
    """`_mix` on two Python ints (the same value, bit for bit)."""
    x = ((a * _GOLD) & _M64) ^ b
    x = ((x ^ (x >> 30)) * _C1) & _M64
    x = ((x ^ (x >> 27)) * _C2) & _M64
    return (x ^ (x >> 31)) & MASK


def _int_bytes(c: int) -> bytes:
    return int(c).to_bytes(16, "little", signed=True)


@functools.lru_cache(maxsize=256)
def _salts(tag: int, n: int) -> np.ndarray:
    """`_mix1(tag, i)` for `i < n`, as an array."""
    return _mix(np.uint64(tag), np.arange(n, dtype=np.uint64))


_ELEM = _h("elem")
_FOLD = _h("fold")
_EMPTY = np.zeros((0,), np.uint64)


# -- Abstract values -----------------------------------------------------------------------


class AV:
    """What the pass knows of one array: its value number `vn` (computed from `ids` when
    unset), the identities `ids` of its keys (typed keys: the array's shape; legacy key
    data `uint32[..., 2]`: the shape without the last axis; `half`: one word, 0 or 1, of
    each key, the array's shape), and its value `const` when small and known."""

    __slots__ = ("vn", "ids", "half", "const")

    def __init__(self, vn=None, ids=None, half=None, const=None):
        self.vn, self.ids, self.half, self.const = vn, ids, half, const


@functools.cache
def _is_key_dtype(dtype) -> bool:
    return _compat.is_key_dtype(dtype)


def _kind(aval) -> str:
    """'key' (typed PRNG keys), 'raw' (uint32[..., 2]: maybe legacy key data), 'data'."""
    dtype = getattr(aval, "dtype", None)
    if dtype is None:
        return "other"
    if _is_key_dtype(dtype):
        return "key"
    shape = tuple(getattr(aval, "shape", ()))
    if dtype == np.uint32 and shape and shape[-1] == 2:
        return "raw"
    return "data"


def _key_shape(aval) -> tuple:
    shape = tuple(aval.shape)
    return shape if _kind(aval) == "key" else shape[:-1]


def _is_intlike(dtype) -> bool:
    try:
        return np.issubdtype(np.dtype(dtype), np.integer) or np.dtype(dtype) == np.bool_
    except TypeError:
        return False


@functools.lru_cache(maxsize=4096)
def _key_relevant(jaxpr) -> bool:
    """Whether a (sub-)jaxpr has anything to do with keys (else it is not entered)."""
    for v in (*jaxpr.invars, *jaxpr.outvars, *jaxpr.constvars):
        if _kind(getattr(v, "aval", None)) in ("key", "raw"):
            return True
    for eqn in jaxpr.eqns:
        if eqn.primitive is _sample.sample_p or eqn.primitive.name in _KEY_PRIMS:
            return True
        if any(_kind(getattr(v, "aval", None)) in ("key", "raw") for v in eqn.outvars):
            return True
        if any(_key_relevant(j) for j in _compat.iter_subjaxprs(eqn.params)):
            return True
    return False


@functools.lru_cache(maxsize=4096)
def _has_sample(jaxpr) -> bool:
    return any(
        eqn.primitive is _sample.sample_p
        or any(_has_sample(j) for j in _compat.iter_subjaxprs(eqn.params))
        for eqn in jaxpr.eqns
    )


_KEY_PRIMS = frozenset(
    {
        "random_bits",
        "random_split",
        "random_fold_in",
        "random_gamma",
        "random_seed",
        "random_wrap",
        "random_unwrap",
        "random_clone",
        "threefry2x32",
    }
)
# What a consumer does, for messages.
_CONSUMER_WORDS = {
    "random_bits": "a jax.random draw (random_bits)",
    "random_split": "jax.random.split",
    "random_fold_in": "jax.random.fold_in",
    "random_gamma": "a jax.random gamma draw",
    "threefry2x32": "threefry2x32 on the key's data",
}
# Primitives that take a typed key without deriving randomness from it.
_NON_CONSUMING = frozenset(
    {
        "eq",
        "ne",
        "random_unwrap",
        "random_wrap",
        "random_clone",
        "random_key_impl",
        "copy",
        "copy_p",
        "device_put",
        "optimization_barrier",
        "sharding_constraint",
        "reshard",
        "mesh_cast",
        "stop_gradient",
        "scatter",
        "dynamic_update_slice",
        "select_n",
        "concatenate",
        "stack",
        "split",
        "unstack",
        "pad",
        "broadcast_in_dim",
        "reshape",
        "squeeze",
        "expand_dims",
        "transpose",
        "rev",
        "slice",
        "dynamic_slice",
        "gather",
        "convert_element_type",
        "pjit",
        "jit",
    }
)
_IDENTITY = frozenset(
    {
        "copy",
        "copy_p",
        "device_put",
        "optimization_barrier",
        "sharding_constraint",
        "reshard",
        "mesh_cast",
        "random_clone",
    }
)
# Element-moving primitives: (positions of the operands whose elements move,
# positions of the operands that must be known to emulate them). None: every operand.
_MOVES = {
    "slice": ((0,), ()),
    "squeeze": ((0,), ()),
    "reshape": ((0,), ()),
    "broadcast_in_dim": ((0,), ()),
    "transpose": ((0,), ()),
    "rev": ((0,), ()),
    "expand_dims": ((0,), ()),
    "convert_element_type": ((0,), ()),
    "concatenate": (None, ()),
    "stack": (None, ()),
    "split": ((0,), ()),
    "unstack": ((0,), ()),
    "dynamic_slice": ((0,), "rest"),
    "dynamic_update_slice": ((0, 1), "rest2"),
    "gather": ((0,), (1,)),
    "select_n": ("rest", (0,)),
}


# -- Events --------------------------------------------------------------------------------


@dataclasses.dataclass
class Event:
    """One equation consuming keys: their identities (flat), and where it happened."""

    ids: np.ndarray
    eqn: Any
    stack: tuple  # enclosing higher-order equations, outermost first
    path: tuple  # cond branches taken: ((instance, branch), ...)
    score: bool  # a score-function scg_sample
    sample: bool  # any scg_sample
    note: str = ""  # e.g. " (in every iteration of the scan at ...)"


@dataclasses.dataclass(frozen=True)
class _Ctx:
    events: list
    path: tuple = ()
    stack: tuple = ()

    def child(self, **changes) -> _Ctx:
        return dataclasses.replace(self, **changes)


# -- The pass ------------------------------------------------------------------------------


class _Pass:
    def __init__(self):
        self.origin: dict[int, tuple] = {}  # node -> (birth, kind, payload, kids)
        self.lits: dict[int, np.ndarray] = {}
        self.affs: dict[int, tuple[int, int]] = {}
        self.phis: dict[int, tuple[int, tuple]] = {}
        self.serial = 0  # loops entered so far
        self.birth = 0  # the loop whose body is being read (0: none)
        self.effects = 0  # effectful equations seen

    # -- nodes (each constructor is also how `_remake` rebuilds a node) --

    def _rec(self, node: int, kind: str, payload, kids: tuple) -> int:
        if self.birth:
            self.origin.setdefault(node, (self.birth, kind, payload, kids))
        return node

    def lit(self, value) -> int:
        value = np.asarray(value)
        node = _h("lit", value.dtype.str, value.shape, value.tobytes())
        if value.size <= _MAX_CONST:
            self.lits.setdefault(node, value)
        return node

    def aff(self, base: int, off: int) -> int:
        """The value number of `base + off` (integers)."""
        if base in self.lits:
            v = self.lits[base]
            with np.errstate(all="ignore"):
                return self.lit((v.astype(np.int64) + off).astype(v.dtype))
        if base in self.affs:
            base, off0 = self.affs[base]
            off += off0
        if off == 0:
            return base
        node = _h("aff", base, _int_bytes(off))
        self.affs.setdefault(node, (base, off))
        return self._rec(node, "aff", off, (base,))

    def op(self, eqn, sig, j: int, kids: tuple) -> int:
        """The value number of output `j` of `eqn` on inputs numbered `kids`."""
        if all(k in self.lits for k in kids):
            outs = _evaluate(eqn, [self.lits[k] for k in kids])
            if outs is not None:
                return self.lit(outs[j])
        node = _h("op", eqn.primitive.name, sig, j, kids)
        return self._rec(node, "op", (eqn, sig, j), kids)

    def elems(self, vn: int, shape: tuple) -> np.ndarray:
        """Identities for the keys of an opaque array numbered `vn`."""
        n = int(np.prod(shape, dtype=np.int64))
        ids = _mix(np.uint64(vn), _salts(_ELEM, n)).reshape(shape)
        if self.birth:
            for i, node in enumerate(ids.reshape(-1).tolist()):
                self._rec(node, "elem", i, (vn,))
        return ids

    def split_children(self, parents: np.ndarray, shape: tuple) -> np.ndarray:
        n = int(np.prod(shape, dtype=np.int64))
        tag = _h("split", tuple(shape))
        salts = _salts(tag, n)
        ids = _mix(parents[..., None], salts).reshape(parents.shape + tuple(shape))
        if self.birth:
            flat = ids.reshape(-1, n).tolist()
            for p, row in zip(parents.reshape(-1).tolist(), flat):
                for i, node in enumerate(row):
                    self._rec(node, "split", (tag, i), (p,))
        return ids

    def fold(self, parents: np.ndarray, data: np.ndarray) -> np.ndarray:
        salts = np.array([_mix1(_FOLD, d) for d in data.reshape(-1).tolist()], np.uint64).reshape(
            data.shape
        )
        ids = _mix(parents, salts)
        if self.birth:
            for node, p, d in zip(
                ids.reshape(-1).tolist(),
                np.broadcast_to(parents, ids.shape).reshape(-1).tolist(),
                np.broadcast_to(data, ids.shape).reshape(-1).tolist(),
            ):
                self._rec(node, "fold", None, (p, d))
        return ids

    def seeded(self, impl: str, data: np.ndarray) -> np.ndarray:
        tag = _h("seed", impl)
        ids = np.array([_mix1(tag, d) for d in data.reshape(-1).tolist()], np.uint64).reshape(
            data.shape
        )
        if self.birth:
            for node, d in zip(ids.reshape(-1).tolist(), data.reshape(-1).tolist()):
                self._rec(node, "seed", tag, (d,))
        return ids

    def keyarr(self, ids: np.ndarray, layout) -> int:
        """The value number of a key array (layout: 'key', 'raw' or ('half', w))."""
        ids = np.ascontiguousarray(ids, np.uint64)
        node = _h("keyarr", layout, ids.shape, ids.tobytes())
        if self.birth:
            self._rec(node, "keyarr", (layout, ids.shape), tuple(ids.reshape(-1).tolist()))
        return node

    def phi(self, instance: int, alts: tuple) -> int:
        """One of `alts`, chosen by `instance` (a cond index or select predicate)."""
        if all(a == alts[0] for a in alts):
            return alts[0]
        if instance in self.lits and self.lits[instance].size == 1:
            b = int(np.clip(int(self.lits[instance].reshape(())), 0, len(alts) - 1))
            return alts[b]
        node = _h("phi", instance, alts)
        self.phis.setdefault(node, (instance, alts))
        return self._rec(node, "phi", None, (instance, *alts))

    def pick(self, eqn, sig, pos: int, layout, kids: tuple) -> int:
        """Key `pos` of a gather / dynamic slice of the key array numbered `kids[0]` at
        indices numbered `kids[1:]`; resolved when the indices are known."""
        if all(k in self.lits for k in kids[1:]):
            resolved = self._resolve_pick(eqn, pos, layout, kids)
            if resolved is not None:
                return resolved
        node = _h("pick", sig, pos, kids)
        return self._rec(node, "pick", (eqn, sig, pos, layout), kids)

    def _resolve_pick(self, eqn, pos, layout, kids):
        o = self.origin.get(kids[0])
        if o is None or o[1] != "keyarr":
            return None
        in_layout, shape = o[2]
        table = np.array(o[3], np.uint64)
        codes = _codes(in_layout, shape, 0)
        values = [codes] + [self.lits[k] for k in kids[1:]]
        if eqn.primitive.name == "dynamic_update_slice":
            return None
        outs = _emulate(eqn, values)
        if outs is None:
            return None
        ids = _decode(outs[0], layout, table)
        return None if ids is None else int(ids.reshape(-1)[pos])

    def loopout(self, eqn, tag, kids: tuple) -> int:
        node = _h("loopout", id(eqn), tag, kids)
        return self._rec(node, "loopout", (eqn, tag), kids)

    def _remake(self, o: tuple, kids: tuple) -> int:
        _, kind, payload, _ = o
        if kind == "aff":
            return self.aff(kids[0], payload)
        if kind == "op":
            eqn, sig, j = payload
            return self.op(eqn, sig, j, kids)
        if kind == "elem":
            return self._rec(_mix1(kids[0], _mix1(_ELEM, payload)), kind, payload, kids)
        if kind == "split":
            tag, i = payload
            return self._rec(_mix1(kids[0], _mix1(tag, i)), kind, payload, kids)
        if kind == "fold":
            return self._rec(_mix1(kids[0], _mix1(_FOLD, kids[1])), kind, payload, kids)
        if kind == "seed":
            return self._rec(_mix1(payload, kids[0]), kind, payload, kids)
        if kind == "keyarr":
            layout, shape = payload
            return self.keyarr(np.array(kids, np.uint64).reshape(shape), layout)
        if kind == "phi":
            return self.phi(kids[0], kids[1:])
        if kind == "pick":
            eqn, sig, pos, layout = payload
            return self.pick(eqn, sig, pos, layout, kids)
        if kind == "loopout":
            eqn, tag = payload
            return self.loopout(eqn, tag, kids)
        raise AssertionError(kind)

    def replay(self, node: int, subst: dict, lo: int, hi: int, memo: dict) -> int:
        """`node` with the symbols in `subst` replaced, rebuilding the nodes born in
        loops `lo..hi` that depend on them (iteratively: chains can be long)."""
        if node in memo:
            return memo[node]
        stack = [node]
        while stack:
            n = stack[-1]
            if n in memo:
                stack.pop()
                continue
            if n in subst:
                memo[n] = subst[n]
                stack.pop()
                continue
            o = self.origin.get(n)
            if o is None or not lo <= o[0] <= hi:
                memo[n] = n
                stack.pop()
                continue
            pending = [k for k in o[3] if k not in memo]
            if pending:
                stack.extend(pending)
                continue
            new = tuple(memo[k] for k in o[3])
            memo[n] = n if new == o[3] else self._remake(o, new)
            stack.pop()
        return memo[node]

    def replay_array(self, ids: np.ndarray, subst, lo, hi, memo) -> np.ndarray:
        out = [self.replay(n, subst, lo, hi, memo) for n in ids.reshape(-1).tolist()]
        return np.array(out, np.uint64).reshape(ids.shape)

    def expand(self, node: int, path: tuple = ()):
        """The keys `node` may be, each with the branches taken (after `path`) that make
        it so; combinations of branches that cannot happen together are left out."""
        if node not in self.phis:
            return [(node, path)]
        instance, alts = self.phis[node]
        return [
            leaf
            for b, alt in enumerate(alts)
            if _compatible(path, ((instance, b),))
            for leaf in self.expand(alt, path + ((instance, b),))
        ]

    # -- abstract values --

    def vn(self, av: AV) -> int:
        if av.vn is None:
            layout = "key" if av.half is None else ("half", av.half)
            assert av.ids is not None
            av.vn = self.keyarr(av.ids, layout)
        return av.vn

    def key_ids(self, av: AV, aval) -> np.ndarray:
        """The identities of the keys of `av` (typed keys or legacy key data)."""
        if av.ids is not None and av.half is None:
            return av.ids
        return self.elems(self.vn(av), _key_shape(aval))

    def data_elems(self, av: AV, aval_shape: tuple, shape: tuple) -> np.ndarray:
        """Value numbers of the elements of integer data `av` (of shape `aval_shape`),
        broadcast to `shape`."""
        if av.const is not None:
            value = np.asarray(av.const)
            flat = [self.lit(x) for x in value.reshape(-1)]
            arr = np.array(flat, np.uint64).reshape(value.shape)
        elif aval_shape == ():
            arr = np.array(self.vn(av), np.uint64)
        else:
            arr = self.elems(self.vn(av), aval_shape)
        return np.broadcast_to(arr, shape)

    def literal(self, atom) -> AV:
        value = np.asarray(atom.val)
        return self.value_av(value)

    def value_av(self, value) -> AV:
        if isinstance(value, np.ndarray) or np.isscalar(value):
            value = np.asarray(value)
            if value.size <= _MAX_CONST:
                const = value if _is_intlike(value.dtype) else None
                return AV(vn=self.lit(value), const=const)
        return AV(vn=_h("constobj", id(value)))

    def from_const(self, value, var) -> AV:
        """A closed-over constant of a sub-jaxpr: small integer values are read."""
        if (
            _kind(var.aval) != "key"
            and int(np.prod(getattr(var.aval, "shape", ()), dtype=np.int64)) <= _MAX_CONST
        ):
            try:
                return self.value_av(np.asarray(value))
            except Exception:  # e.g. a tracer of an enclosing trace
                pass
        return AV(vn=_h("constobj", id(value)))

    # -- the walk --

    def run(self, jaxpr, consts: list, args: list, ctx: _Ctx) -> list:
        env: dict = {}

        def read(a):
            if isinstance(a, _compat.Literal):
                return self.literal(a)
            return env[a]

        env.update(zip(jaxpr.constvars, consts))
        env.update(zip(jaxpr.invars, args))
        for eqn in jaxpr.eqns:
            outs = self.equation(eqn, [read(a) for a in eqn.invars], ctx)
            for v, out in zip(eqn.outvars, outs):
                if not isinstance(v, _compat.DropVar):
                    env[v] = out
        return [read(a) for a in jaxpr.outvars]

    def equation(self, eqn, ins: list, ctx: _Ctx) -> list:
        prim = eqn.primitive
        name = prim.name
        if prim is _sample.sample_p:
            return self.sample_site(eqn, ins, ctx)
        rule = _RULES.get(name)
        if rule is not None:
            return rule(self, eqn, ins, ctx)
        subs = list(_compat.iter_subjaxprs_with_consts(eqn.params))
        if subs:
            if not any(_key_relevant(j) for j, _ in subs) and not any(
                _kind(v.aval) in ("key", "raw")
                for v in (*eqn.invars, *eqn.outvars)
                if hasattr(v, "aval")
            ):
                return self.default(eqn, ins, ctx, consume=False)
            call = _as_call(eqn, subs)
            if call is not None:
                jaxpr, consts = call
                inner = [self.from_const(c, v) for c, v in zip(consts, jaxpr.constvars)]
                return self.run(jaxpr, inner, ins, ctx.child(stack=ctx.stack + (eqn,)))
            return self.default(eqn, ins, ctx, consume=True)
        if name in _IDENTITY and len(ins) == len(eqn.outvars):
            return list(ins)
        if name in _MOVES:
            return self.moves(eqn, ins, ctx)
        return self.default(eqn, ins, ctx, consume=name not in _NON_CONSUMING)

    def consume(self, ctx: _Ctx, ids: np.ndarray, eqn, *, sample=False, score=False):
        ctx.events.append(
            Event(np.asarray(ids, np.uint64).reshape(-1), eqn, ctx.stack, ctx.path, score, sample)
        )

    def default(self, eqn, ins, ctx, consume: bool) -> list:
        """An equation the pass does not model: outputs are new values of its inputs
        (integer ops on known values are evaluated); typed keys it takes are consumed."""
        if consume:
            for a, v in zip(ins, eqn.invars):
                if _kind(getattr(v, "aval", None)) == "key":
                    self.consume(ctx, self.key_ids(a, v.aval), eqn)
        name = eqn.primitive.name
        outs = [AV() for _ in eqn.outvars]
        if getattr(eqn, "effects", None):  # e.g. a callback: a new value each time
            self.effects += 1
            kids = (_h("effect", self.effects),)
        else:
            kids = tuple(self.vn(a) for a in ins)
        aff = _aff_operands(eqn, ins) if len(outs) == 1 and name in ("add", "sub") else None
        if aff is not None:
            base, off = aff
            outs[0].vn = self.aff(self.vn(base), off)
        elif (
            len(outs) == 1
            and name == "convert_element_type"
            and ins[0].const is None
            and _is_intlike(eqn.invars[0].aval.dtype)
            and _is_intlike(eqn.outvars[0].aval.dtype)
        ):
            outs[0].vn = self.vn(ins[0])
        else:
            sig = _params_sig(eqn.params)
            for j, out in enumerate(outs):
                out.vn = self.op(eqn, sig, j, kids)
        for out in outs:
            value = self.lits.get(out.vn) if out.vn is not None else None
            if value is not None and _is_intlike(value.dtype):
                out.const = value
        return outs

    # -- consumers --

    def sample_site(self, eqn, ins, ctx) -> list:
        score = eqn.params.get("estimator") == "score"
        self.consume(ctx, self.key_ids(ins[0], eqn.invars[0].aval), eqn, sample=True, score=score)
        return self.default(eqn, ins, ctx, consume=False)

    def _random_bits(self, eqn, ins, ctx) -> list:
        self.consume(ctx, self.key_ids(ins[0], eqn.invars[0].aval), eqn)
        return self.default(eqn, ins, ctx, consume=False)

    def _random_split(self, eqn, ins, ctx) -> list:
        parents = self.key_ids(ins[0], eqn.invars[0].aval)
        self.consume(ctx, parents, eqn)
        return [AV(ids=self.split_children(parents, tuple(eqn.params["shape"])))]

    def _random_fold_in(self, eqn, ins, ctx) -> list:
        parents = self.key_ids(ins[0], eqn.invars[0].aval)
        self.consume(ctx, parents, eqn)
        dshape = tuple(eqn.invars[1].aval.shape)
        data = self.data_elems(ins[1], dshape, np.broadcast_shapes(dshape, parents.shape))
        return [AV(ids=self.fold(np.broadcast_to(parents, data.shape), data))]

    def _random_seed(self, eqn, ins, ctx) -> list:
        shape = tuple(eqn.invars[0].aval.shape)
        data = self.data_elems(ins[0], shape, shape)
        return [AV(ids=self.seeded(str(eqn.params.get("impl")), data))]

    def _random_wrap(self, eqn, ins, ctx) -> list:
        return [AV(ids=self.key_ids(ins[0], eqn.invars[0].aval))]

    def _random_unwrap(self, eqn, ins, ctx) -> list:
        return [AV(ids=self.key_ids(ins[0], eqn.invars[0].aval))]

    def _threefry(self, eqn, ins, ctx) -> list:
        k1, k2 = ins[0], ins[1]
        if (
            k1.half == 0
            and k2.half == 1
            and k1.ids is not None
            and k2.ids is not None
            and k1.ids.shape == k2.ids.shape
            and np.array_equal(k1.ids, k2.ids)
        ):
            self.consume(ctx, np.unique(k1.ids), eqn)
        return self.default(eqn, ins, ctx, consume=False)

    # -- element-moving ops --

    def moves(self, eqn, ins, ctx) -> list:
        name = eqn.primitive.name
        moving_spec, control_spec = _MOVES[name]
        n = len(ins)
        moving = list(
            range(n)
            if moving_spec is None
            else (range(1, n) if moving_spec == "rest" else moving_spec)
        )
        named: dict[Any, Any] = {"rest": range(1, n), "rest2": range(2, n)}
        control = list(named.get(control_spec, control_spec))
        # Plain values: evaluate when known.
        if all(a.const is not None for a in ins) and all(
            _kind(v.aval) == "data" for v in eqn.outvars
        ):
            return self.default(eqn, ins, ctx, consume=False)
        keyish = [
            i
            for i in moving
            if _kind(eqn.invars[i].aval) in ("key", "raw") or ins[i].ids is not None
        ]
        if not keyish or len(keyish) != len(moving):
            return self.default(eqn, ins, ctx, consume=False)
        out_avals = [v.aval for v in eqn.outvars]
        if any(_kind(a) not in ("key", "raw", "data") for a in out_avals) or any(
            _kind(a) == "data" and a.dtype != np.uint32 for a in out_avals
        ):
            return self.default(eqn, ins, ctx, consume=False)
        # Positions: operand i's keys are numbered from offsets[i] on.
        tables, offset = [], 0
        values: list[Any] = [None] * n
        for i in moving:
            a, aval = ins[i], eqn.invars[i].aval
            if a.half is not None:
                layout, ids = ("half", a.half), a.ids
            else:
                layout, ids = ("key" if _kind(aval) == "key" else "raw"), self.key_ids(a, aval)
            values[i] = _codes(layout, ids.shape, offset)
            tables.append(ids.reshape(-1))
            offset += ids.size
        if offset * 2 > _MAX_EMULATE:
            return self.default(eqn, ins, ctx, consume=False)
        table = np.concatenate(tables) if tables else _EMPTY
        known = all(ins[i].const is not None for i in control)
        if known:
            for i in control:
                values[i] = np.asarray(ins[i].const)
            outs = _emulate(eqn, values)
            if outs is not None:
                return [self._decoded(o, aval, table) for o, aval in zip(outs, out_avals)]
        if name in ("gather", "dynamic_slice") and len(out_avals) == 1:
            return [self._picks(eqn, ins, out_avals[0])]
        if name == "select_n" and len(out_avals) == 1:
            return [self._select(eqn, ins, out_avals[0])]
        return self.default(eqn, ins, ctx, consume=False)

    def _decoded(self, codes, aval, table) -> AV:
        kind = _kind(aval)
        if kind == "key":
            return AV(ids=table[codes >> 1])
        if kind == "raw":
            ids = _decode(codes, "raw", table)
            if ids is not None:
                return AV(ids=ids)
        w = codes & 1
        if codes.size and np.all(w == w.reshape(-1)[0]):
            return AV(ids=table[codes >> 1], half=int(w.reshape(-1)[0]))
        return AV(vn=self.keyarr(_mix(table[codes >> 1], (codes & 1).astype(np.uint64)), "words"))

    def _picks(self, eqn, ins, aval) -> AV:
        layout = "key" if _kind(aval) == "key" else "raw"
        in_layout = "key" if _kind(eqn.invars[0].aval) == "key" else "raw"
        arr = self.keyarr(self.key_ids(ins[0], eqn.invars[0].aval), in_layout)
        kids = (arr, *(self.vn(a) for a in ins[1:]))
        sig = _params_sig(eqn.params)
        shape = _key_shape(aval)
        n = int(np.prod(shape, dtype=np.int64))
        ids = [self.pick(eqn, sig, p, layout, kids) for p in range(n)]
        return AV(ids=np.array(ids, np.uint64).reshape(shape))

    def _select(self, eqn, ins, aval) -> AV:
        shape = _key_shape(aval)
        cases = [
            np.broadcast_to(self.key_ids(a, v.aval), shape) for a, v in zip(ins[1:], eqn.invars[1:])
        ]
        pred = ins[0]
        scalar = not eqn.invars[0].aval.shape
        pv = self.vn(pred)
        ids = []
        for p in range(int(np.prod(shape, dtype=np.int64))):
            instance = pv if scalar else _h("selected", pv, p)
            ids.append(self.phi(instance, tuple(int(c.reshape(-1)[p]) for c in cases)))
        return AV(ids=np.array(ids, np.uint64).reshape(shape))

    # -- control flow --

    def _cond(self, eqn, ins, ctx) -> list:
        branches = [_compat.open_jaxpr(b) for b in eqn.params["branches"]]
        index, ops = ins[0], ins[1:]
        inner = ctx.child(stack=ctx.stack + (eqn,))
        if index.const is not None:
            b = int(np.clip(int(np.asarray(index.const).reshape(())), 0, len(branches) - 1))
            jaxpr, consts = branches[b]
            return self.run(
                jaxpr, [self.from_const(c, v) for c, v in zip(consts, jaxpr.constvars)], ops, inner
            )
        instance = self.vn(index)
        results = []
        for b, (jaxpr, consts) in enumerate(branches):
            results.append(
                self.run(
                    jaxpr,
                    [self.from_const(c, v) for c, v in zip(consts, jaxpr.constvars)],
                    ops,
                    inner.child(path=ctx.path + ((instance, b),)),
                )
            )
        outs = []
        for j, v in enumerate(eqn.outvars):
            alts = [r[j] for r in results]
            if _kind(v.aval) in ("key", "raw"):
                ids = [self.key_ids(a, v.aval) for a in alts]
                if all(np.array_equal(ids[0], x) for x in ids[1:]):
                    outs.append(AV(ids=ids[0]))
                    continue
                merged = [
                    self.phi(instance, tuple(int(x.reshape(-1)[p]) for x in ids))
                    for p in range(ids[0].size)
                ]
                outs.append(AV(ids=np.array(merged, np.uint64).reshape(ids[0].shape)))
            else:
                vn = self.phi(instance, tuple(self.vn(a) for a in alts))
                out = AV(vn=vn)
                value = self.lits.get(vn)
                if value is not None and _is_intlike(value.dtype):
                    out.const = value
                outs.append(out)
        return outs

    def _scan(self, eqn, ins, ctx) -> list:
        params = eqn.params
        num_consts, num_carry = _compat.scan_layout(params)
        jaxpr, jconsts = _compat.open_jaxpr(params["jaxpr"])
        length, reverse = int(params["length"]), bool(params["reverse"])
        consts = ins[:num_consts]
        init = ins[num_consts : num_consts + num_carry]
        xs = ins[num_consts + num_carry :]
        if length == 0:
            return self.default(eqn, ins, ctx, consume=False)
        loop = _Loop(self, eqn, "scan", ins)
        carry_vars = jaxpr.invars[num_consts : num_consts + num_carry]
        xs_vars = jaxpr.invars[num_consts + num_carry :]
        carry = [loop.carry_symbol(j, v.aval, a) for j, (v, a) in enumerate(zip(carry_vars, init))]
        xs_body = [
            loop.xs_symbol(j, v.aval, a, eqn.invars[num_consts + num_carry + j].aval, reverse)
            for j, (v, a) in enumerate(zip(xs_vars, xs))
        ]
        body_ctx = ctx.child(events=[], stack=ctx.stack + (eqn,))
        loop.enter()
        outs = self.run(
            jaxpr,
            [self.from_const(c, v) for c, v in zip(jconsts, jaxpr.constvars)],
            consts + carry + xs_body,
            body_ctx,
        )
        loop.leave()
        loop.carry_outputs(outs[:num_carry], carry_vars)
        dmax = min(2, length - 1)
        final = loop.finish(body_ctx.events, ctx, dmax, outs[:num_carry], carry_vars)
        ys = [
            loop.stacked(j, o, v.aval, length)
            for j, (o, v) in enumerate(zip(outs[num_carry:], eqn.outvars[num_carry:]))
        ]
        return final + ys

    def _shard_map(self, eqn, ins, ctx) -> list:
        """The body is read once, as one shard: an operand that `in_specs` shards is a
        block of new keys (each shard's own); a replicated one is the same key in the
        body. (That a draw's key must also differ *between* shards is checked by the
        shard_map rule, `_shard_map._check_keys_vary`.) Outputs are new values."""
        jaxpr, consts = _compat.open_jaxpr(eqn.params["jaxpr"])
        args, sharded = [], []
        for i, (a, spec) in enumerate(zip(ins, eqn.params["in_specs"])):
            if any(e is not None for e in tuple(spec)):
                args.append(AV(vn=_h("shard_map block", id(eqn), i)))
                sharded.append(i)
            else:
                args.append(a)
        if _key_relevant(jaxpr):
            inner = [self.from_const(c, v) for c, v in zip(consts, jaxpr.constvars)]
            self.run(jaxpr, inner, args, ctx.child(stack=ctx.stack + (eqn,)))
        # The sharded key operands are consumed here, by their blocks.
        for i in sharded:
            v = eqn.invars[i]
            if _kind(getattr(v, "aval", None)) == "key":
                self.consume(ctx, self.key_ids(ins[i], v.aval), eqn)
        return self.default(eqn, ins, ctx, consume=False)

    def _while(self, eqn, ins, ctx) -> list:
        params = eqn.params
        cn, bn = params["cond_nconsts"], params["body_nconsts"]
        cond_jaxpr, cond_consts = _compat.open_jaxpr(params["cond_jaxpr"])
        body_jaxpr, body_consts = _compat.open_jaxpr(params["body_jaxpr"])
        cconsts, bconsts, init = ins[:cn], ins[cn : cn + bn], ins[cn + bn :]
        loop = _Loop(self, eqn, "while_loop", ins)
        carry_vars = body_jaxpr.invars[bn:]
        carry = [loop.carry_symbol(j, v.aval, a) for j, (v, a) in enumerate(zip(carry_vars, init))]
        body_ctx = ctx.child(events=[], stack=ctx.stack + (eqn,))
        loop.enter()
        self.run(
            cond_jaxpr,
            [self.from_const(c, v) for c, v in zip(cond_consts, cond_jaxpr.constvars)],
            cconsts + carry,
            body_ctx,
        )
        outs = self.run(
            body_jaxpr,
            [self.from_const(c, v) for c, v in zip(body_consts, body_jaxpr.constvars)],
            bconsts + carry,
            body_ctx,
        )
        loop.leave()
        loop.carry_outputs(outs, carry_vars)
        return loop.finish(body_ctx.events, ctx, 2, outs, carry_vars)

    # -- conflicts --

    def check(self, events: list) -> None:
        """Raises for two events consuming one key (at least one a score draw), in
        branches that can both run, or a score draw whose lanes share a key."""
        owners: dict[int, list] = {}
        for i, ev in enumerate(events):
            for node in ev.ids.tolist():
                for leaf, full in self.expand(node, ev.path):
                    for j, other_path in owners.get(leaf, ()):
                        if j == i:
                            if ev.score and _compatible(full, other_path):
                                raise ValueError(_lanes_message(ev))
                            continue
                        if (ev.score or events[j].score) and _compatible(full, other_path):
                            raise ValueError(_pair_message(events[j], ev))
                    owners.setdefault(leaf, []).append((i, full))


def _compatible(p: tuple, q: tuple) -> bool:
    """Whether the branch choices `p` and `q` ((instance, branch), ...) can both hold."""
    if not p or not q:
        return True
    chosen = dict(p)
    return all(chosen.get(inst, b) == b for inst, b in q)


def _aff_operands(eqn, ins):
    """(base, offset) when `eqn` adds or subtracts a known integer scalar."""
    out = eqn.outvars[0].aval
    if not _is_intlike(getattr(out, "dtype", None)) or getattr(out, "shape", None) != ():
        return None
    a, b = ins
    if b.const is not None and b.const.size == 1 and a.const is None:
        c = int(b.const.reshape(()))
        return a, (c if eqn.primitive.name == "add" else -c)
    if (
        eqn.primitive.name == "add"
        and a.const is not None
        and a.const.size == 1
        and b.const is None
    ):
        return b, int(a.const.reshape(()))
    return None


def _params_sig(params: dict) -> int:
    try:
        return hash(tuple(params.items()))
    except TypeError:
        parts = []
        for k, v in params.items():
            try:
                parts.append((k, hash(v)))
            except TypeError:
                parts.append((k, id(v)))
        return hash(tuple(parts))


def _as_call(eqn, subs):
    """(jaxpr, consts) when `eqn` calls one sub-jaxpr on its operands, shape for shape."""
    if len(subs) != 1:
        return None
    jaxpr, consts = subs[0]
    if len(jaxpr.invars) != len(eqn.invars) or len(jaxpr.outvars) != len(eqn.outvars):
        return None
    for inner, outer in zip((*jaxpr.invars, *jaxpr.outvars), (*eqn.invars, *eqn.outvars)):
        a, b = getattr(inner, "aval", None), getattr(outer, "aval", None)
        if getattr(a, "shape", None) != getattr(b, "shape", None):
            return None
    return jaxpr, consts


# -- Position codes: the emulation of element-moving ops ----------------------------------


def _codes(layout, shape, offset: int) -> np.ndarray:
    """Positions of an operand's elements: 2·(key number) + (word of the key)."""
    n = int(np.prod(shape, dtype=np.int64))
    keys = (np.arange(n, dtype=np.int64) + offset).reshape(shape) * 2
    if layout == "raw":
        return keys[..., None] + np.array([0, 1], np.int64)
    if isinstance(layout, tuple):  # ("half", w)
        return keys + layout[1]
    return keys


def _decode(codes, layout, table):
    """Key identities from positions; None when the output is not whole keys."""
    if layout == "key":
        return table[codes >> 1]
    if codes.ndim == 0 or codes.shape[-1] != 2:
        return None
    first, second = codes[..., 0], codes[..., 1]
    if np.all(first % 2 == 0) and np.all(second == first + 1):
        return table[first >> 1]
    return None


def _emulate(eqn, values: list):
    """The outputs of an element-moving or integer equation on known numpy values, or
    None when it is not modelled (or too big)."""
    name = eqn.primitive.name
    p = eqn.params
    try:
        with np.errstate(all="ignore"):
            if name in _ELEMENTWISE:
                out = _ELEMENTWISE[name](*values)
                return [np.asarray(out).astype(eqn.outvars[0].aval.dtype)]
            fn = _EMULATORS.get(name)
            if fn is None:
                return None
            outs = fn(p, *values)
    except Exception:  # an unexpected layout: not modelled
        return None
    if outs is None:
        return None
    outs = outs if isinstance(outs, list) else [outs]
    if any(np.size(o) > _MAX_EMULATE for o in outs):
        return None
    return [np.asarray(o) for o in outs]


def _evaluate(eqn, values: list):
    """`_emulate` for integer value numbering (only small integer results)."""
    if any(v.size > _MAX_CONST for v in values):
        return None
    if not all(_is_intlike(getattr(v.aval, "dtype", None)) for v in eqn.outvars):
        return None
    name = eqn.primitive.name
    if name == "convert_element_type":
        return [np.asarray(values[0]).astype(eqn.params["new_dtype"])]
    return _emulate(eqn, values)


def _np_div(a, b):
    q = np.abs(a) // np.where(b == 0, 1, np.abs(b))
    return np.where(b == 0, 0, np.sign(a) * np.sign(b) * q)


_ELEMENTWISE = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "neg": np.negative,
    "max": np.maximum,
    "min": np.minimum,
    "lt": np.less,
    "le": np.less_equal,
    "gt": np.greater,
    "ge": np.greater_equal,
    "eq": np.equal,
    "ne": np.not_equal,
    "and": np.bitwise_and,
    "or": np.bitwise_or,
    "xor": np.bitwise_xor,
    "not": np.invert,
    "abs": np.abs,
    "sign": np.sign,
    "rem": np.fmod,
    "div": _np_div,
    "clamp": lambda lo, x, hi: np.clip(x, lo, hi),
}


def _np_broadcast_in_dim(p, x, *dyn):
    if dyn:
        return None
    shape, dims = tuple(p["shape"]), tuple(p["broadcast_dimensions"])
    expanded = [1] * len(shape)
    for i, d in enumerate(dims):
        expanded[d] = x.shape[i]
    return np.broadcast_to(x.reshape(expanded), shape)


def _np_reshape(p, x, *dyn):
    if dyn:
        return None
    if p.get("dimensions") is not None:
        x = np.transpose(x, p["dimensions"])
    return x.reshape(tuple(p["new_sizes"]))


def _np_slice(p, x):
    strides = p.get("strides") or (1,) * x.ndim
    return x[
        tuple(slice(s, e, st) for s, e, st in zip(p["start_indices"], p["limit_indices"], strides))
    ]


def _starts(x_shape, sizes, idx):
    return [int(np.clip(int(i), 0, d - s)) for i, d, s in zip(idx, x_shape, sizes)]


def _np_dynamic_slice(p, x, *idx):
    sizes = tuple(p["slice_sizes"])
    if len(idx) != x.ndim:
        return None
    starts = _starts(x.shape, sizes, idx)
    return x[tuple(slice(s, s + n) for s, n in zip(starts, sizes))]


def _np_dynamic_update_slice(p, x, update, *idx):
    if len(idx) != x.ndim:
        return None
    starts = _starts(x.shape, update.shape, idx)
    out = np.array(np.broadcast_to(x, x.shape))
    out[tuple(slice(s, s + n) for s, n in zip(starts, update.shape))] = update
    return out


def _np_select_n(p, pred, *cases):
    which = np.asarray(pred).astype(np.int64)
    return np.choose(
        np.broadcast_to(which, np.broadcast_shapes(which.shape, *(np.shape(c) for c in cases))),
        [np.asarray(c) for c in cases],
    )


def _np_gather(p, operand, indices):
    dn = p["dimension_numbers"]
    offset_dims = tuple(dn.offset_dims)
    collapsed = tuple(dn.collapsed_slice_dims)
    start_index_map = tuple(dn.start_index_map)
    obatch = tuple(getattr(dn, "operand_batching_dims", ()))
    ibatch = tuple(getattr(dn, "start_indices_batching_dims", ()))
    sizes = tuple(p["slice_sizes"])
    fill = "FILL" in str(p.get("mode", ""))
    indices = np.asarray(indices)
    batch_shape = indices.shape[:-1]
    window = [d for d in range(operand.ndim) if d not in collapsed and d not in obatch]
    out_rank = len(batch_shape) + len(offset_dims)
    out_shape, bi, wi = [], iter(batch_shape), iter(window)
    for i in range(out_rank):
        out_shape.append(sizes[next(wi)] if i in offset_dims else next(bi))
    if int(np.prod(out_shape, dtype=np.int64)) > _MAX_EMULATE:
        return None
    out = np.empty(out_shape, operand.dtype)
    for idx in np.ndindex(*out_shape):
        b = tuple(idx[i] for i in range(out_rank) if i not in offset_dims)
        o = [idx[i] for i in offset_dims]
        vec = indices[b] if b else indices
        start = [0] * operand.ndim
        for k, d in enumerate(start_index_map):
            start[d] = int(vec[k])
        for od, ib in zip(obatch, ibatch):
            start[od] = b[ib]
        for d in range(operand.ndim):
            hi = operand.shape[d] - sizes[d]
            if not 0 <= start[d] <= hi:
                if fill:
                    return None
                start[d] = min(max(start[d], 0), hi)
        full = list(start)
        for k, d in enumerate(window):
            full[d] += o[k]
        out[idx] = operand[tuple(full)]
    return out


def _np_split(p, x):
    sizes = [int(s) for s in p["sizes"]]
    return list(np.split(x, np.cumsum(sizes)[:-1], axis=p["axis"]))


def _np_iota(p):
    shape, dim = tuple(p["shape"]), p["dimension"]
    if int(np.prod(shape, dtype=np.int64)) > _MAX_CONST:
        return None
    r = np.arange(shape[dim], dtype=np.dtype(p["dtype"]))
    return np.broadcast_to(r.reshape([-1 if i == dim else 1 for i in range(len(shape))]), shape)


_EMULATORS = {
    "broadcast_in_dim": _np_broadcast_in_dim,
    "reshape": _np_reshape,
    "squeeze": lambda p, x: np.squeeze(x, axis=tuple(p["dimensions"])),
    "expand_dims": lambda p, x: np.expand_dims(x, tuple(p["dimensions"])),
    "transpose": lambda p, x: np.transpose(x, p["permutation"]),
    "rev": lambda p, x: np.flip(x, axis=tuple(p["dimensions"])),
    "slice": _np_slice,
    "concatenate": lambda p, *xs: np.concatenate(xs, axis=p["dimension"]),
    "stack": lambda p, *xs: np.stack(xs, axis=p["axis"]),
    "split": _np_split,
    "unstack": lambda p, x: [np.take(x, i, axis=p["axis"]) for i in range(x.shape[p["axis"]])],
    "dynamic_slice": _np_dynamic_slice,
    "dynamic_update_slice": _np_dynamic_update_slice,
    "select_n": _np_select_n,
    "gather": _np_gather,
    "convert_element_type": lambda p, x: x,
    "iota": _np_iota,
}


# -- Loops ---------------------------------------------------------------------------------


class _Loop:
    """One `scan` / `while` being read: its symbols (the carries and the scanned slices
    of one iteration), the substitution σ that maps an iteration's values to the next's,
    and ι, which maps them to the first iteration's, in the enclosing scope's terms."""

    def __init__(self, pass_: _Pass, eqn, what: str, ins: list):
        self.p, self.eqn, self.what = pass_, eqn, what
        # The loop's outputs are new values of its inputs (for an enclosing loop's σ).
        self.in_vns = tuple(pass_.vn(a) for a in ins)
        pass_.serial += 1
        self.serial = self.end = pass_.serial
        self.parent_birth = pass_.birth
        self.sigma: dict[int, int] = {}
        self.sigma_memo: dict[int, int] = {}
        self.iota: dict[int, int] = {}
        self.iota_memo: dict[int, int] = {}
        self.direct: dict[int, np.ndarray] = {}  # a scanned key -> that key in every row
        self.carry_syms: list = []  # per carry: ("keys", ids) or ("vn", vn)
        self.consumed: dict[int, Event] = {}  # key -> the first body event consuming it
        self.ctx: _Ctx | None = None

    def enter(self) -> None:
        self.p.birth = self.serial

    def leave(self) -> None:
        self.end = self.p.serial

    def _symbols(self, tag, shape) -> np.ndarray:
        n = int(np.prod(shape, dtype=np.int64))
        return _mix(np.uint64(_h("sym", self.serial, tag)), _salts(_ELEM, n)).reshape(shape)

    def carry_symbol(self, j: int, aval, init: AV) -> AV:
        if _kind(aval) in ("key", "raw"):
            ids = self._symbols(("c", j), _key_shape(aval))
            start = self.p.key_ids(init, aval)
            self.iota.update(zip(ids.reshape(-1).tolist(), start.reshape(-1).tolist()))
            self.carry_syms.append(("keys", ids))
            return AV(ids=ids)
        vn = _h("sym", self.serial, ("c", j))
        self.iota[vn] = self.p.vn(init)
        self.carry_syms.append(("vn", vn))
        return AV(vn=vn)

    def xs_symbol(self, j: int, aval, xs: AV, xs_aval, reverse: bool) -> AV:
        """Row t of a scanned operand: a symbol that σ moves to row t + 1, unless the
        rows repeat (then the same in every iteration)."""
        first = -1 if reverse else 0
        if _kind(aval) in ("key", "raw"):
            rows = self.p.key_ids(xs, xs_aval)
            flat = rows.reshape(rows.shape[0], -1)
            ordered = np.sort(flat, axis=0)
            repeats = bool(np.any(ordered[1:] == ordered[:-1]))
            ids = [self._symbols(("x", j, d), _key_shape(aval)) for d in range(3)]
            if not repeats:
                for d in range(2):
                    self.sigma.update(
                        zip(ids[d].reshape(-1).tolist(), ids[d + 1].reshape(-1).tolist())
                    )
            for i, node in enumerate(ids[0].reshape(-1).tolist()):
                self.iota[node] = int(flat[first, i])
                self.direct[node] = flat[:, i]
            return AV(ids=ids[0])
        distinct = True
        if xs.const is not None:
            rows = np.asarray(xs.const)
            flat = rows.reshape(rows.shape[0], -1)
            if np.all(flat == flat[:1]):
                return self.p.value_av(rows[0])
            distinct = len({r.tobytes() for r in flat}) == len(flat)
        syms = [_h("sym", self.serial, ("x", j, d)) for d in range(3)]
        if distinct:
            self.sigma.update({syms[0]: syms[1], syms[1]: syms[2]})
        self.iota[syms[0]] = (
            self.p.lit(np.asarray(xs.const)[first])
            if xs.const is not None
            else _h("row", self.p.vn(xs), first)
        )
        return AV(vn=syms[0])

    def carry_outputs(self, outs: list, carry_vars) -> None:
        """σ for the carries: iteration t's carry-out is iteration t + 1's carry-in."""
        for (kind, sym), out, v in zip(self.carry_syms, outs, carry_vars):
            if kind == "keys":
                new = self.p.key_ids(out, v.aval)
                self.sigma.update(
                    (a, b)
                    for a, b in zip(sym.reshape(-1).tolist(), new.reshape(-1).tolist())
                    if a != b
                )
            elif self.p.vn(out) != sym:
                self.sigma[sym] = self.p.vn(out)

    def _shift(self, ids: np.ndarray) -> np.ndarray:
        return self.p.replay_array(ids, self.sigma, self.serial, self.end, self.sigma_memo)

    def _first(self, ids: np.ndarray) -> np.ndarray:
        return self.p.replay_array(ids, self.iota, self.serial, self.end, self.iota_memo)

    def _invariant(self, ids: np.ndarray) -> bool:
        return bool(np.array_equal(self._shift(ids), ids))

    def finish(self, events: list, ctx: _Ctx, dmax: int, outs: list, carry_vars) -> list:
        """Checks iterations t and t + d (d ≤ dmax) against each other, lifts the first
        iteration's events (and every row of scanned keys consumed as they are) into
        `ctx`, and returns the final carries."""
        p, where = self.p, _where_eqn(self.eqn)
        owners: dict[int, list] = {}
        for i, ev in enumerate(events):
            for node in ev.ids.tolist():
                for leaf, _ in p.expand(node, ev.path):
                    owners.setdefault(leaf, []).append(i)
        invariant = []
        for i, ev in enumerate(events):
            shifted = self._shift(ev.ids)
            invariant.append(bool(np.array_equal(shifted, ev.ids)))
            for d in range(1, dmax + 1):
                if d > 1:
                    shifted = self._shift(shifted)
                for node in shifted.tolist():
                    for leaf, _ in p.expand(node, ev.path):
                        for j in owners.get(leaf, ()):
                            if ev.score or events[j].score:
                                raise ValueError(
                                    _loop_message(events[j], ev, d, self.what, where, i == j)
                                )
        p.birth = self.parent_birth
        self.ctx = ctx
        for ev, inv in zip(events, invariant):
            ids = []
            for node in ev.ids.tolist():
                self.consumed.setdefault(node, ev)
                if node in self.direct:
                    ids.extend(self.direct[node].tolist())
                else:
                    ids.append(p.replay(node, self.iota, self.serial, self.end, self.iota_memo))
            when = "every iteration" if inv else "the first iteration"
            note = ev.note or f" (in {when} of the {_LOOPS[self.what]} at {where})"
            ctx.events.append(dataclasses.replace(ev, ids=np.array(ids, np.uint64), note=note))
        return [
            self._output(("carry", j), out, v.aval, None)
            for j, (out, v) in enumerate(zip(outs, carry_vars))
        ]

    def _lift_consumed(self, ids_body: np.ndarray, ids_out: np.ndarray, when: str) -> None:
        """Keys of an output that the body consumed are consumed outside the loop too."""
        flat = ids_out.reshape(-1, ids_body.size)
        for i, node in enumerate(ids_body.reshape(-1).tolist()):
            ev = self.consumed.get(node)
            if ev is not None:
                assert self.ctx is not None
                self.ctx.events.append(
                    dataclasses.replace(
                        ev,
                        ids=np.asarray(flat[:, i], np.uint64),
                        note=f" (in {when} of the {_LOOPS[self.what]} at {_where_eqn(self.eqn)})",
                    )
                )

    def _output(self, tag, out: AV, aval, length) -> AV:
        """An output: the final carry (`length` None) or a stacked `scan` output. The
        same in every iteration: its first iteration's value; else a new value."""
        p = self.p
        if _kind(aval) in ("key", "raw"):
            body_aval = aval if length is None else _Shaped(tuple(aval.shape[1:]), aval.dtype)
            ids = p.key_ids(out, body_aval)
            if self._invariant(ids):
                first = self._first(ids)
                return AV(
                    ids=first if length is None else np.broadcast_to(first, (length,) + first.shape)
                )
            new = p.elems(p.loopout(self.eqn, tag, self.in_vns), _key_shape(aval))
            self._lift_consumed(
                ids, new, "the last iteration" if length is None else "an iteration"
            )
            return AV(ids=new)
        vn = np.array(p.vn(out), np.uint64)
        if self._invariant(vn):
            first = int(self._first(vn))
            value = p.lits.get(first)
            if value is not None and _is_intlike(value.dtype):
                return p.value_av(
                    value if length is None else np.broadcast_to(value, (length,) + value.shape)
                )
            return AV(vn=first if length is None else _h("stacked", first, length))
        return AV(vn=p.loopout(self.eqn, tag, self.in_vns))

    def stacked(self, j: int, out: AV, aval, length: int) -> AV:
        return self._output(("ys", j), out, aval, length)


@dataclasses.dataclass(frozen=True)
class _Shaped:
    shape: tuple
    dtype: Any


_RULES = {
    "random_bits": _Pass._random_bits,
    "random_gamma": _Pass._random_bits,
    "random_split": _Pass._random_split,
    "random_fold_in": _Pass._random_fold_in,
    "random_seed": _Pass._random_seed,
    "random_wrap": _Pass._random_wrap,
    "random_unwrap": _Pass._random_unwrap,
    "threefry2x32": _Pass._threefry,
    "cond": _Pass._cond,
    "scan": _Pass._scan,
    "while": _Pass._while,
    "shard_map": _Pass._shard_map,
}


# -- Messages ------------------------------------------------------------------------------


def _fmt(frames) -> str:
    return ", called from ".join(f"{f}:{line} ({fn})" for f, line, fn in frames)


def _where_eqn(eqn) -> str:
    frames = _compat.user_frames(eqn)
    return _fmt(frames[:1]) if frames else (_compat.source_info(eqn) or "an unknown line")


def _chain(ev: Event) -> list:
    """The user's frames of an event, innermost first: the consumer's own, then those of
    the enclosing calls (numpyro's and JAX's jitted samplers keep no user frames)."""
    chain: list = []
    for eqn in (ev.eqn, *reversed(ev.stack)):
        chain.extend(f for f in _compat.user_frames(eqn) if f not in chain)
    return chain


def _where(ev: Event, other: Event | None = None) -> str:
    """Where an event happened: its innermost user frames, down to the first one that
    it does not share with `other` (so two calls of one helper are told apart)."""
    chain = _chain(ev)
    if not chain:
        return _compat.source_info(ev.eqn) or "an unknown line"
    n = 2
    if other is not None:
        theirs = _chain(other)
        shared = 0
        while shared < min(len(chain), len(theirs)) and chain[-1 - shared] == theirs[-1 - shared]:
            shared += 1
        n = len(chain) - shared or 2  # the same chain: one line, e.g. `f(k) + f(k)`
    return _fmt(chain[: min(n, 3)])


def _what(ev: Event) -> str:
    if ev.sample:
        name = ev.eqn.params.get("name")
        named = f", name={name!r}" if name else ""
        est = "score function" if ev.score else "pathwise"
        return f"scg.sample(key, {ev.eqn.params.get('spec')}{named}) [{est}]"
    return _CONSUMER_WORDS.get(ev.eqn.primitive.name, f"`{ev.eqn.primitive.name}`")


_LOOPS = {"scan": "lax.scan / fori_loop", "while_loop": "lax.while_loop / fori_loop"}
_BIASED = (
    "so what is drawn from it is not independent; a score-function term assumes "
    "that its draw is, and its gradient estimate would be biased"
)
_FIX = (
    "Give each draw its own key: split it, e.g. `k1, k2 = jax.random.split(key)`, and "
    "pass k1 to one and k2 to the other (a baseline drawn with `d.sample` needs a key "
    "of its own too)."
)
_LOOP_FIX = (
    "Derive a fresh key in every iteration: carry the key and split it each step "
    "(`key, sub = jax.random.split(key)`), scan over `jax.random.split(key, n)`, "
    "or use `jax.random.fold_in(key, i)` with the loop counter."
)


def _pair_message(a: Event, b: Event) -> str:
    return (
        f"scgjax: PRNG key reuse: one key is consumed twice, {_BIASED}.\n"
        f"  first:  {_what(a)} at {_where(a, b)}{a.note}\n"
        f"  second: {_what(b)} at {_where(b, a)}{b.note}\n{_FIX}"
    )


def _lanes_message(ev: Event) -> str:
    return (
        f"scgjax: PRNG key reuse: {_what(ev)} at {_where(ev)}{ev.note} has the same key "
        "in several lanes of jax.vmap (a key that is not batched is broadcast to every "
        "lane), so those lanes draw the same value and its score-function term would be "
        "biased. Split the key into one per lane, e.g. `keys = jax.random.split(key, "
        "n)`, and vmap over `keys` (pathwise draws may share a key)."
    )


def _loop_message(a: Event, b: Event, d: int, what: str, where: str, same: bool) -> str:
    loop = f"the {_LOOPS.get(what, what)} at {where}"
    if same:
        every = "every iteration" if d == 1 else "every other iteration"
        return (
            f"scgjax: PRNG key reuse: {_what(b)} at {_where(b)} consumes the same key in "
            f"{every} of {loop} (a key closed over by the loop body, carried through "
            f"it unchanged, or scanned over with repeated rows), so the iterations draw "
            f"the same value and its score-function term would be biased.\n{_LOOP_FIX}"
        )
    later = "the next iteration" if d == 1 else f"{d} iterations later"
    return (
        f"scgjax: PRNG key reuse: in {loop}, a key consumed in one iteration is consumed "
        f"again in {later}, {_BIASED}.\n"
        f"  first:  {_what(a)} at {_where(a, b)}\n"
        f"  second: {_what(b)} at {_where(b, a)} ({later})\n{_LOOP_FIX}"
    )


# -- Entry point ---------------------------------------------------------------------------


def check_key_reuse(jaxpr: Any) -> None:
    """Raises a `ValueError` naming both source lines when two consumers of one PRNG key
    in the traced program, at least one of them a score-function `scg.sample`, can both
    run (see the module docstring for the rules).

    `jaxpr` is the top-level jaxpr of the traced program: open (its constants are then
    unknown, each one a distinct value) or closed (small integer constants, e.g. an
    index array, are read)."""
    jaxpr, values = _compat.open_jaxpr(jaxpr)
    if not _has_sample(jaxpr):
        return
    p = _Pass()
    ctx = _Ctx(events=[])
    if len(values) == len(jaxpr.constvars):
        consts = [p.from_const(c, v) for c, v in zip(values, jaxpr.constvars)]
    else:
        consts = [AV(vn=_h("constvar", i)) for i in range(len(jaxpr.constvars))]
    args = [AV(vn=_h("input", i)) for i in range(len(jaxpr.invars))]
    p.run(jaxpr, consts, args, ctx)
    p.check(ctx.events)
