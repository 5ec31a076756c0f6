"""Learned baselines for score-function estimators, trained beside the model.

`nvil(f, baseline_fn)` applies NVIL's variance reduction (Mnih & Gregor 2014) to every
score-function node of a program `f` — the same `f` you give `scg_grad` — and returns an
`NVIL(init, update)` pair of plain JAX functions:

* a learned, input-dependent baseline per node, `baseline_fn(φ, *inputs)[name]`, computed
  from `f`'s arguments without the key (so it cannot depend on the draws it corrects) and
  regressed onto the node's downstream cost `Q̂_w` (the regression target
  `scg_grad(f, downstream=True)` returns);
* a running mean of the residual, subtracted too (`center=True`);
* optionally, NVIL's variance normalisation of the learning signal (`normalize=True`).

```python
nv = scg.baselines.nvil(f, baseline_fn)                  # f(params, x, key)
state = nv.init(params, x, key)
g, g_phi, state, info = jax.jit(nv.update)(phi, state, params, x, key)
params = optax.apply_updates(params, opt.update(g, s1)[0])   # ... and phi with g_phi
```

Without `normalize`, `g` is an unbiased estimate of `∇E[f]` whatever `φ` and the state
are; `g_phi` is the gradient of the regression loss. `nvil`'s docstring states exactly
what holds with `normalize=True`.

Sharp edges: a baseline that depends on earlier draws (NVIL's per-layer baselines given
the layer above, a value function of the state of a rollout) cannot be computed outside
the program; pass it with `scg.sample(..., baseline=b)` and regress it yourself on
`scg_grad(f, downstream=True)`'s downstream costs (`examples/baselines.py`). Sites
evaluated at several values (`"enum"`, `"arm"`, ...) have no downstream costs yet and are
refused.
"""

from ._nvil import NVIL as NVIL
from ._nvil import NVILInfo as NVILInfo
from ._nvil import NVILState as NVILState
from ._nvil import nvil as nvil

__all__ = ["NVIL", "NVILInfo", "NVILState", "nvil"]
