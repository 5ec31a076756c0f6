"""scgjax: gradient estimation in stochastic computation graphs as a JAX transformation.

Draw random variables with `sample`; `scg_grad(f)` then returns an unbiased estimate of
the gradient of `E[f]` (Schulman et al. 2015), and `surrogate(f)` the DiCE objective whose
derivatives of every order are unbiased (Foerster et al. 2018).
"""

import os as _os

from . import _compat

_compat.hide_frames_of(_os.path.dirname(__file__))

from . import baselines as baselines
from . import estimators as estimators
from . import infer as infer
from ._draw import Drawing as Drawing
from ._draw import draw as draw
from ._lint import LostGradientWarning as LostGradientWarning
from ._multisample import iwae as iwae
from ._sample import sample as sample
from ._surrogate import Site as Site
from ._surrogate import Trace as Trace
from ._surrogate import describe as describe
from ._surrogate import gradient_variance as gradient_variance
from ._surrogate import scg_grad as scg_grad
from ._surrogate import scg_value_and_grad as scg_value_and_grad
from ._surrogate import surrogate as surrogate
from ._surrogate import trace as trace

__version__ = "0.1.0.dev0"

__all__ = [
    "Drawing",
    "LostGradientWarning",
    "Site",
    "Trace",
    "baselines",
    "describe",
    "draw",
    "estimators",
    "gradient_variance",
    "infer",
    "iwae",
    "sample",
    "scg_grad",
    "scg_value_and_grad",
    "surrogate",
    "trace",
]
