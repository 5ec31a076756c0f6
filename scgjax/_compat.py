"""Every read of JAX internals that depends on the JAX version lives here.

scgjax runs on the JAX that installs by default (0.10.x), on the 0.11.x that GPU machines
carry, and on the newest release (0.12.x). Differences are met by feature detection, never
by version-number comparisons, so that a new release fails loudly in one place.
"""

from __future__ import annotations

import functools
import os
import sysconfig
from collections.abc import Iterator
from typing import Any

import jax
import jax.core
import jax.numpy as jnp
from jax.extend import core as jex
from jax.interpreters import ad as _ad

Jaxpr = jex.Jaxpr
ClosedJaxpr = jex.ClosedJaxpr
Literal = jex.Literal
DropVar = jex.DropVar
Primitive = jex.Primitive
primitives = jex.primitives
ShapedArray = jax.core.ShapedArray
try:  # pragma: no cover - depends on the JAX version
    from jax._src.shard_map import shard_map_p
except ImportError:  # pragma: no cover
    shard_map_p = None

# `jax.grad` / `jax.vjp` trace through `LinearizeTracer` where JAX linearizes directly
# (0.10 and newer); `jax.jvp` / `jax.jacfwd` trace through `JVPTracer`. Only the former
# needs a transpose, which `lax.while_loop` does not have.
try:  # pragma: no cover - depends on the JAX version
    from jax._src.interpreters.ad import LinearizeTracer as _LinearizeTracer
except ImportError:  # pragma: no cover
    _LinearizeTracer = None


def is_reverse_mode_tracer(x: Any) -> bool:
    """Whether `x` is being traced for reverse-mode differentiation (`jax.grad`)."""
    if _LinearizeTracer is not None and isinstance(x, _LinearizeTracer):
        return True
    # Older JAX: a JVP tracer whose tangent is being staged out for transposition.
    if isinstance(x, _ad.JVPTracer):
        return type(x.tangent).__name__ == "JaxprTracer"
    return False


def open_jaxpr(j: Jaxpr | ClosedJaxpr) -> tuple[Jaxpr, list[Any]]:
    """A sub-jaxpr param as `(jaxpr, consts)`: 0.10 stores `ClosedJaxpr`s, 0.12 `Jaxpr`s."""
    if isinstance(j, ClosedJaxpr):
        return j.jaxpr, list(j.consts)
    return j, []


def shape_struct(aval: Any, drop_leading: bool = False) -> jax.ShapeDtypeStruct:
    """`aval` as a `ShapeDtypeStruct` that keeps its sharding (Explicit meshes) and its
    varying manual axes (`shard_map`), so `jax.eval_shape` propagates both. With
    `drop_leading`, the struct of one slice along the leading axis (varying axes kept,
    the sharding left to JAX)."""
    shape = tuple(aval.shape)[1:] if drop_leading else tuple(aval.shape)
    sharding = getattr(aval, "sharding", None)
    if drop_leading and sharding is not None:
        try:
            spec = tuple(sharding.spec)[1:]
            sharding = sharding.update(spec=jax.sharding.PartitionSpec(*spec))
        except Exception:  # pragma: no cover - a sharding without a spec
            sharding = None
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        try:
            return jax.ShapeDtypeStruct(shape, aval.dtype, sharding=sharding, manual_axis_type=mat)
        except TypeError:  # pragma: no cover - a JAX without manual axis types
            pass
    try:
        return jax.ShapeDtypeStruct(shape, aval.dtype, sharding=sharding)
    except (TypeError, ValueError):  # pragma: no cover - a sharding it cannot take
        return jax.ShapeDtypeStruct(shape, aval.dtype)


def batch_axis_spec(x: Any, axis: int) -> Any:
    """The mesh axes that an Explicit sharding shards `x`'s `axis` over (None when it is
    not sharded, or not Explicit)."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec is None or axis >= len(spec):
        return None
    return spec[axis]


def broadcast_leading(x: Any, size: int, spec_entry: Any) -> Any:
    """`x` broadcast along a new leading axis of `size`, sharded like `spec_entry` (the
    batch axis of the operands that a batching rule maps): under an Explicit mesh,
    `vmap` needs every mapped operand's batch axis sharded the same."""
    out = jnp.broadcast_to(x, (size, *jnp.shape(x)))
    if spec_entry is None:
        return out
    return jax.sharding.reshard(out, jax.sharding.PartitionSpec(spec_entry))


def varying_axes(x: Any) -> frozenset:
    """The manual mesh axes along which `x`'s type says it varies (`shard_map` with
    `check_vma=True`); empty elsewhere."""
    mat = getattr(jax.typeof(x), "manual_axis_type", None)
    return frozenset(getattr(mat, "varying", ()) or ())


def _find_all_gather_invariant():
    from jax._src.lax import parallel

    # 0.10 names it `all_gather_invariant`; 0.12 made it private.
    for name in ("all_gather_invariant", "_all_gather_invariant"):
        fn = getattr(parallel, name, None)
        if fn is not None:
            return fn
    return None  # pragma: no cover


_all_gather_invariant = _find_all_gather_invariant()


def all_gather(x: Any, name: Any, axis: int, invariant: bool = False) -> Any:
    """`lax.all_gather(x, name, axis=axis)`; with `invariant`, typed invariant along
    `name` (every shard holds the same gathered array), as a value computed from a
    `psum` is: then what is gathered combines with it under `check_vma=True`."""
    if invariant and _all_gather_invariant is not None and name in varying_axes(x):
        return _all_gather_invariant(x, name, axis=axis, tiled=False)
    return jax.lax.all_gather(x, name, axis=axis)


def shard_leading(x: Any, axes: Any) -> Any:
    """`x` with its leading axis sharded over the mesh axes `axes` of the current mesh
    (`jax.set_mesh`): resharded on Explicit axes, constrained on Auto ones."""
    mesh = jax.sharding.get_abstract_mesh()
    names: tuple[str, ...] = (axes,) if isinstance(axes, str) else tuple(axes)
    missing = [a for a in names if a not in getattr(mesh, "axis_names", ())]
    if missing:
        raise ValueError(
            f"scgjax: particle_axes={axes!r} names mesh axes {missing} that the current mesh "
            f"({mesh}) does not have; run under `jax.set_mesh(mesh)`."
        )
    return place(x, jax.sharding.PartitionSpec(names if len(names) != 1 else names[0]))


def place(x: Any, sharding: Any) -> Any:
    """`x` placed as `sharding` says (a `Sharding`, or a `PartitionSpec` of the current
    mesh): resharded where the mesh axes it names are Explicit, constrained where they
    are Auto (the values are the same either way)."""
    if isinstance(sharding, jax.sharding.PartitionSpec):
        mesh = jax.sharding.get_abstract_mesh()
    else:
        mesh = getattr(sharding, "mesh", None)
    spec = sharding if isinstance(sharding, jax.sharding.PartitionSpec) else sharding.spec
    names = [a for e in spec if e is not None for a in (e if isinstance(e, tuple) else (e,))]
    types = dict(zip(getattr(mesh, "axis_names", ()), getattr(mesh, "axis_types", ())))
    if names and all(types.get(a) == jax.sharding.AxisType.Explicit for a in names):
        return jax.sharding.reshard(x, sharding)
    return jax.lax.with_sharding_constraint(x, sharding)


def vary_like(x: Any, like: Any) -> Any:
    """`x`, cast to vary along the manual axes `like` varies along and `x` does not."""
    missing = varying_axes(like) - varying_axes(x)
    if not missing:
        return x
    return jax.lax.pcast(x, tuple(sorted(missing)), to="varying")


def is_sharding(s: Any) -> bool:
    """Whether `s` is a sharding (not `jit`'s "unspecified" marker or None)."""
    return isinstance(s, jax.sharding.Sharding)


def constrain(x: Any, sharding: Any) -> Any:
    """`x` constrained to `sharding` when it is one (a `jit` param may be unspecified)."""
    if not is_sharding(sharding) or not hasattr(x, "shape"):
        return x
    return jax.lax.with_sharding_constraint(x, sharding)


def replicated(x: Any) -> Any:
    """`x` replicated, where an Explicit mesh shards it (elsewhere unchanged)."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    entries = tuple(getattr(sharding, "spec", ()) or ())
    if sharding is None or all(e is None for e in entries):
        return x
    return jax.sharding.reshard(x, sharding.update(spec=jax.sharding.PartitionSpec()))


def aval_of(struct: Any) -> Any:
    """The abstract value of `struct` (an `eval_shape` result), with its sharding and
    varying manual axes, for a primitive's abstract evaluation."""
    kwargs = {}
    if getattr(struct, "sharding", None) is not None:
        kwargs["sharding"] = struct.sharding
    mat = getattr(struct, "manual_axis_type", None)
    if mat is not None:
        kwargs["manual_axis_type"] = mat
    try:
        return ShapedArray(struct.shape, struct.dtype, **kwargs)
    except TypeError:  # pragma: no cover - an older ShapedArray signature
        return ShapedArray(struct.shape, struct.dtype)


def scan_layout(params: dict[str, Any]) -> tuple[int, int]:
    """`(num_consts, num_carry)` of a `scan` equation."""
    if "num_consts" in params:
        return params["num_consts"], params["num_carry"]
    # 0.12: `ft_in` is a flat tree `(consts, carry, xs)`: a tuple of three flat trees
    # (`.elts`) as traced, or one pytree of the three (`FTPyTree`) once re-bound.
    ft = params["ft_in"]
    elts = getattr(ft, "elts", None)
    if elts is not None:
        consts, carry, _ = elts
        return len(consts), len(carry)
    consts, carry, _ = jax.tree_util.tree_unflatten(ft.tree, list(range(len(ft))))
    return len(jax.tree_util.tree_leaves(consts)), len(jax.tree_util.tree_leaves(carry))


def iter_subjaxprs(params: dict[str, Any]) -> Iterator[Jaxpr]:
    """Every (open) sub-jaxpr in an equation's params."""
    for j in jex.jaxprs_in_params(params):
        yield j.jaxpr if isinstance(j, ClosedJaxpr) else j


def bind_equation(eqn: Any, invals: list[Any]) -> list[Any]:
    """Re-binds `eqn` unchanged on new inputs; always returns a list of outputs."""
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    subfuns = ()
    if isinstance(bind_params, tuple):  # older JAX: (subfuns, params)
        subfuns, bind_params = bind_params
    manager = getattr(getattr(eqn, "ctx", None), "manager", None)
    if manager is None:
        out = eqn.primitive.bind(*subfuns, *invals, **bind_params)
    else:
        with manager:
            out = eqn.primitive.bind(*subfuns, *invals, **bind_params)
    return list(out) if eqn.primitive.multiple_results else [out]


def is_key_array(x: Any) -> bool:
    """Whether `x` is a typed PRNG key array (`jax.random.key`)."""
    return jnp.issubdtype(jnp.result_type(x), jax.dtypes.prng_key)


def source_info(eqn: Any) -> str:
    """`file:line:col (function)` of an equation's innermost user frame outside installed
    libraries (the user's `numpyro.sample` call in a guide, not numpyro's handler that
    draws it), else its innermost user frame; '' when JAX does not say."""
    frames = source_frames(eqn)
    for file_name, text in frames:
        if not in_installed_library(file_name):
            return text
    return frames[0][1] if frames else ""


_INSTALLED_DIRS = tuple(
    os.path.normcase(os.path.realpath(p)) + os.sep
    for p in {sysconfig.get_paths().get(k) for k in ("purelib", "platlib", "stdlib", "platstdlib")}
    if p
)


@functools.lru_cache(maxsize=1024)
def in_installed_library(filename: str) -> bool:
    """Whether `filename` is in the standard library or an installed package
    (site-packages), i.e. not the user's code."""
    path = os.path.normcase(os.path.realpath(filename))
    return (
        path.startswith(_INSTALLED_DIRS)
        or f"{os.sep}site-packages{os.sep}" in path
        or f"{os.sep}dist-packages{os.sep}" in path
    )


def hide_frames_of(path: str) -> None:
    """Makes JAX's source info (and filtered tracebacks) skip frames under `path`, so a
    node's `source` is the user's `scg.sample` call, not scgjax's own code."""
    try:
        from jax._src import source_info_util, traceback_util

        source_info_util.register_exclusion(path)
        traceback_util.register_exclusion(path)
    except Exception:  # pragma: no cover - best effort only
        pass


def zero_tangent(primal: Any) -> Any:
    """A symbolic zero tangent for `primal` (`ad.Zero`, whose constructor differs by
    version)."""
    from_primal = getattr(_ad.Zero, "from_primal_value", None)
    if from_primal is not None:  # pragma: no cover - depends on the JAX version
        return from_primal(primal)
    return _ad.Zero(jax.typeof(primal).to_tangent_aval())


# -- Trace-time checks (_lint.py) ----------------------------------------------------------

# The tracers of forward- and reverse-mode differentiation. `jax.grad`/`jax.vjp` trace
# through `LinearizeTracer` (0.10 and newer), `jax.jvp`/`jax.jacfwd` through `JVPTracer`;
# either holds a tangent, which is a symbolic `Zero` where nothing is differentiated.
_DIFFERENTIATION_TRACERS = tuple(t for t in (_ad.JVPTracer, _LinearizeTracer) if t is not None)
_ZERO_TANGENTS = tuple(
    t
    for t in (getattr(_ad, "Zero", None), getattr(_ad, "SymbolicZero", None))
    if isinstance(t, type)
)
try:  # pragma: no cover - depends on the JAX version
    Tracer = jax.core.Tracer
except AttributeError:  # pragma: no cover
    from jax._src.core import Tracer


def is_differentiated(x: Any) -> bool:
    """Whether `x` is being differentiated by an enclosing `jax.grad`, `jax.vjp`,
    `jax.jvp`, `jax.jacfwd`/`jacrev` or `jax.hessian`, also when vmap's batch tracers wrap
    the differentiation tracer or are wrapped by it, and under `jit` inside the
    differentiation. (Under `jax.grad(jax.jit(f))` the differentiation happens after `f`
    is traced, and is not visible.)"""
    for _ in range(64):  # a chain of nested transforms; bounded for safety
        if not isinstance(x, Tracer):
            return False
        if _DIFFERENTIATION_TRACERS and isinstance(x, _DIFFERENTIATION_TRACERS):
            tangent = getattr(x, "tangent", None)
            if not (_ZERO_TANGENTS and isinstance(tangent, _ZERO_TANGENTS)):
                return True
        inner = None
        # The value a tracer wraps: `primal` (JVP, linearize), `val` (vmap's BatchTracer,
        # shard_map's tracer). A tracer forwards unknown attributes to its aval, so read
        # the instance's own slots only.
        for attr in ("primal", "val"):
            try:
                v = object.__getattribute__(x, attr)
            except AttributeError:
                continue
            if isinstance(v, Tracer):
                inner = v
                break
        x = inner
    return False


def source_frames(eqn: Any) -> list[tuple[str, str]]:
    """The user frames of an equation's source info, innermost first, as `(file name,
    'file:line:col (function)')`; empty when JAX does not say (e.g. inside a cached
    `jit` sub-jaxpr)."""
    try:
        from jax._src import source_info_util

        tb = eqn.source_info.traceback
        frames = list(source_info_util.user_frames(tb)) if tb is not None else []
        summarize = getattr(source_info_util, "_summarize_frame", None)
        out = []
        for fr in frames:
            text = (
                summarize(fr)
                if summarize is not None
                else f"{fr.file_name}:{fr.start_line} ({fr.function_name})"
            )
            out.append((fr.file_name, text))
        return out
    except Exception:  # pragma: no cover - best effort only
        return []


# -- Key-reuse pass (`_keys`) ---------------------------------------------------------------


def is_key_dtype(dtype: Any) -> bool:
    """Whether `dtype` is a typed PRNG key dtype (`key<fry>`)."""
    try:
        return jnp.issubdtype(dtype, jax.dtypes.prng_key)
    except TypeError:
        return False


def iter_subjaxprs_with_consts(params: dict[str, Any]) -> Iterator[tuple[Jaxpr, list[Any]]]:
    """Every sub-jaxpr in an equation's params, as `(open jaxpr, consts)`: a `ClosedJaxpr`
    keeps its consts (`jex.jaxprs_in_params` yields its open jaxpr only)."""
    for value in params.values():
        for j in value if isinstance(value, tuple) else (value,):
            if isinstance(j, (Jaxpr, ClosedJaxpr)):
                yield open_jaxpr(j)


def _library_dirs() -> tuple[str, ...]:
    import os
    import sysconfig

    dirs = [os.path.dirname(jax.__file__), os.path.dirname(__file__)]
    for name in ("jaxlib", "numpyro"):
        try:
            mod = __import__(name)
            dirs.append(os.path.dirname(mod.__file__))
        except Exception:  # pragma: no cover - optional
            pass
    for key in ("stdlib", "platstdlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            dirs.append(path)
    return tuple(d.rstrip(os.sep) + os.sep for d in dirs)


_LIBRARY_DIRS: tuple[str, ...] | None = None


def user_frames(eqn: Any) -> list[tuple[str, int, str]]:
    """`(file, line, function)` of the frames of an equation's traceback that are the
    user's, innermost first: outside JAX, numpyro, scgjax, the standard library and
    installed packages. Empty when there are none (e.g. inside a jitted library
    function, whose traceback stops at its own entry)."""
    global _LIBRARY_DIRS
    if _LIBRARY_DIRS is None:
        _LIBRARY_DIRS = _library_dirs()
    try:
        frames = eqn.source_info.traceback.frames
    except Exception:  # pragma: no cover - no traceback kept
        return []
    out = []
    for frame in frames or ():
        path = getattr(frame, "file_name", "") or ""
        if (
            not path
            or path.startswith("<")
            or path.startswith(_LIBRARY_DIRS)
            or "site-packages" in path
            or "dist-packages" in path
        ):
            continue
        out.append((path, getattr(frame, "line_num", 0), getattr(frame, "function_name", "?")))
    return out


# numpyro's ELBO base class (`loss`, `loss_with_mutable_state`, `num_particles`,
# `vectorize_particles`), where numpyro 0.22 defines it.
from numpyro.infer.elbo import ELBO as NumpyroELBO  # noqa: E402, F401
