"""Estimators per site, for `scg.sample(key, d, estimator=...)`.

A name picks an estimator with its default options (`estimator="gumbel_softmax"`); an
object sets them (`estimator=scg.estimators.GumbelSoftmax(temperature=0.3)`).

* `Score` (`"score"`): score function (REINFORCE), with automatic plates and causality.
* `Pathwise` (`"pathwise"`): reparameterization.
* `Enum` (`"enum"`): the site summed out exactly over its finite support.
* `GumbelSoftmax` (`"gumbel_softmax"`), `StraightThrough` (`"straight_through"`):
  relaxations of Bernoulli and Categorical draws, biased by design.
* `ARM` (`"arm"`), `DisARM` (`"disarm"`): antithetic estimators for Bernoulli draws;
  `ARSM` (`"arsm"`, `ARSM(reference=j)` for ARS): their counterpart for Categorical draws;
  `MeasureValued` (`"measure_valued"`): weak derivatives for Bernoulli and Normal draws.
  Unbiased, first derivatives only (a second derivative through them raises); their
  base `Alternatives` evaluates what depends on a site at a few values of it.
* `UnorderedSet` (`"unordered_set"`), `ScoreWOR` (`"score_wor"`): `k` categories drawn
  without replacement, per element; unbiased, first derivatives only.
* `REBAR` (`"rebar"`), `RELAX` (`"relax"`): control variates for Bernoulli and
  Categorical draws from relaxed values of them (and, for RELAX, a learned function);
  unbiased at every order.
  Their options may be learned arrays; `variance_gradient` gives the gradient of the
  estimate's variance with respect to them.

`register` adds an estimator class under its `name`; `names()` lists them.
"""

from ._estimators import ARM as ARM
from ._estimators import ARSM as ARSM
from ._estimators import REBAR as REBAR
from ._estimators import RELAX as RELAX
from ._estimators import Alternatives as Alternatives
from ._estimators import DisARM as DisARM
from ._estimators import Enum as Enum
from ._estimators import Estimator as Estimator
from ._estimators import GumbelSoftmax as GumbelSoftmax
from ._estimators import MeasureValued as MeasureValued
from ._estimators import Pathwise as Pathwise
from ._estimators import Score as Score
from ._estimators import ScoreWOR as ScoreWOR
from ._estimators import StraightThrough as StraightThrough
from ._estimators import UnorderedSet as UnorderedSet
from ._estimators import names as names
from ._estimators import register as register
from ._surrogate import variance_gradient as variance_gradient

__all__ = [
    "ARM",
    "ARSM",
    "REBAR",
    "RELAX",
    "Alternatives",
    "DisARM",
    "Enum",
    "Estimator",
    "GumbelSoftmax",
    "MeasureValued",
    "Pathwise",
    "Score",
    "ScoreWOR",
    "StraightThrough",
    "UnorderedSet",
    "names",
    "register",
    "variance_gradient",
]
