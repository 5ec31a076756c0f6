"""Four stochastic computation graphs drawn with `scg.draw`.

    python examples/draw_graph.py [OUTDIR]

writes `figure1.svg`, `vae.svg`, `policy.svg` and `mixture_svi.svg` to OUTDIR (default
`.`) when Graphviz's `dot` is installed (`apt install graphviz`), else their DOT text
(`.dot`). The README's figures are `figure1.svg` (`docs/draw_example.svg`) and
`mixture_svi.svg` (`docs/draw_numpyro.svg`): a NumPyro model and guide drawn through
`scgjax.infer.TraceSCG_ELBO`.
"""

from __future__ import annotations

import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from jax import lax
from numpyro.distributions import constraints

import scgjax as scg
from scgjax.infer import TraceSCG_ELBO


def figure1(theta, phi, key):
    """In the manner of the paper's figure 1: a cost downstream of x only, one downstream
    of x, z and the pathwise y, and one that no draw influences."""
    k1, k2, k3 = jax.random.split(key, 3)
    x = scg.sample(k1, dist.Bernoulli(logits=theta), name="x")  # score
    z = scg.sample(k2, dist.Bernoulli(logits=phi + x), name="z")  # score
    y = scg.sample(k3, dist.Normal(phi * z, 1.0), name="y")  # pathwise
    return (x - 0.3) ** 2 + (y - 1.0) ** 2 + phi**2


B, D, H = 32, 16, 8


def vae(params, x, key):
    """A discrete VAE: a (B, H) Bernoulli code, a per-row cost, the mean over rows."""
    logits = x @ params["enc"]["w"] + params["enc"]["b"]
    z = scg.sample(key, dist.Bernoulli(logits=logits).to_event(1), name="z")
    recon = z @ params["dec"]["w"] + params["dec"]["b"]
    log_px = jnp.asarray(dist.Bernoulli(logits=recon).to_event(1).log_prob(x))
    log_pz = jnp.asarray(dist.Bernoulli(probs=0.5 * jnp.ones(H)).to_event(1).log_prob(z))
    log_qz = jnp.asarray(dist.Bernoulli(logits=logits).to_event(1).log_prob(z))
    return -(log_px + log_pz - log_qz).mean()


T = 20


def policy(w, key):
    """REINFORCE in a scan: the action's logits depend on a state the earlier actions
    moved; the return is accumulated in the carry."""

    def step(carry, k):
        s, total = carry
        a = scg.sample(k, dist.CategoricalLogits(logits=s @ w), name="a")
        r = -jnp.abs(s[0] - 1.0) + 0.1 * a
        return (s + jax.nn.one_hot(a, 3), total + r), None

    (_, total), _ = lax.scan(step, (jnp.zeros(3), 0.0), jax.random.split(key, T))
    return -total


def mixture_model(data):
    """A NumPyro mixture: the means are latent (a pathwise guide), the weights a
    parameter, each point's assignment latent in a subsampled plate."""
    w = numpyro.param("weights", jnp.ones(2) / 2, constraint=constraints.simplex)
    locs = numpyro.sample("locs", dist.Normal(0.0, 5.0).expand([2]).to_event(1))
    with numpyro.plate("data", len(data), subsample_size=8) as i:
        z = numpyro.sample("z", dist.CategoricalProbs(jnp.asarray(w)))
        numpyro.sample("x", dist.Normal(jnp.asarray(locs)[z], 1.0), obs=data[i])


def mixture_guide(data):
    m = numpyro.param("m", jnp.array([-1.0, 1.0]))
    logits = jnp.asarray(numpyro.param("assign_logits", jnp.zeros((len(data), 2))))
    numpyro.sample("locs", dist.Normal(jnp.asarray(m), 0.5).to_event(1))  # pathwise
    with numpyro.plate("data", len(data), subsample_size=8) as i:
        numpyro.sample("z", dist.CategoricalLogits(logits[i]))  # score function


def drawings() -> dict[str, scg.Drawing]:
    key = jax.random.key(0)
    params = {
        "enc": {"w": jnp.zeros((D, H)), "b": jnp.zeros(H)},
        "dec": {"w": jnp.zeros((H, D)), "b": jnp.zeros(D)},
    }
    mixture_params = {  # as svi.get_params(state) gives them
        "weights": jnp.ones(2) / 2,
        "m": jnp.array([-1.0, 1.0]),
        "assign_logits": jnp.zeros((32, 2)),
    }
    return {
        "figure1": scg.draw(figure1)(jnp.array(0.1), jnp.array(0.2), key),
        "vae": scg.draw(vae)(params, jnp.ones((B, D)), key),
        "policy": scg.draw(policy)(jnp.zeros((3, 3)), key),
        # the program of one particle of the ELBO: cost(params, key, data)
        "mixture_svi": scg.draw(TraceSCG_ELBO().program(mixture_model, mixture_guide))(
            mixture_params, key, jnp.linspace(-2.0, 2.0, 32)
        ),
    }


def main(outdir: str = ".") -> None:
    out = pathlib.Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = ".svg" if shutil.which("dot") else ".dot"
    for name, d in drawings().items():
        print(d.save(out / f"{name}{suffix}"), d)


if __name__ == "__main__":
    main(*sys.argv[1:2])
