"""Storchastic's estimators on ``estimators.py``'s workloads (issue 9's peer column).

Run with a Python that has torch and storchastic (not scgjax's; see benchmarks/README.md):

    python benchmarks/estimators.py --export inputs.npz        # scgjax's Python
    python benchmarks/peers_storchastic.py inputs.npz --save storch_params.npz
    python benchmarks/estimators.py --evaluate storch_params.npz   # same scoring as scgjax

``inputs.npz`` carries the data, the initial parameters, the minibatch schedule and the
exact gradients, so the workloads here are those of ``estimators.py``: the same models
written in torch (checked at start-up against the exported costs at fixed latents), the
same variance protocol (``--draws`` estimates at the initial parameters on the first
100 images; log10 of the mean per-entry variance; the largest |mean − exact| / s.e.
where the exact gradient is known), the median time of one gradient step (forward +
``storch.backward``), and the discrete objective after ``--steps`` Adam steps (lr 0.05
for the toy, 0.01 for the models) on the exported minibatch schedule. The objective
printed here is a torch Monte Carlo estimate (20 draws per image); ``--save`` keeps the
trained parameters so that ``estimators.py --evaluate`` scores them with scgjax's keys.

Storchastic's estimators are ``storch.method`` objects, one per sample site; the sample
is drawn by calling the method on a torch distribution, the cost is registered with
``storch.add_cost`` and ``storch.backward()`` fills ``.grad``. The images are a plate
(``storch.denote_independent``), so each image's score is weighted by its own cost.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import traceback

import numpy as np
import torch

torch.set_num_threads(1)
torch.distributions.Distribution.set_default_validate_args(False)

import storch  # noqa: E402
from storch.method import (  # noqa: E402
    ARM,
    REBAR,
    RELAX,
    DisARM,
    Expect,
    GumbelSoftmax,
    RaoBlackwellSF,
    ScoreFunction,
    ScoreFunctionWOR,
    UnorderedSetEstimator,
)
from torch.distributions import Bernoulli, OneHotCategorical  # noqa: E402

LATENTS, CATS = 32, 10


def rows(workload):
    """Row name -> a factory of a fresh storch method (methods carry state: baselines)."""
    bern = workload in ("toy", "sbn")
    r = {
        "score": lambda: ScoreFunction("z", n_samples=1, baseline_factory="none"),
        "score, moving average (0.95)": lambda: ScoreFunction(
            "z", n_samples=1, baseline_factory="moving_average"
        ),
        "score, batch average K=4 (= LOO)": lambda: ScoreFunction(
            "z", n_samples=4, baseline_factory="batch_average"
        ),
        "enum (Expect)": lambda: Expect("z"),
        "gumbel_softmax (τ=0.5)": lambda: GumbelSoftmax(
            "z", initial_temperature=0.5, annealing_rate=0.0
        ),
        "straight_through (τ=1)": lambda: GumbelSoftmax(
            "z", straight_through=True, initial_temperature=1.0, annealing_rate=0.0
        ),
    }
    if bern:
        r["arm"] = lambda: ARM("z")
        r["disarm"] = lambda: DisARM("z")
        r["rebar"] = lambda: REBAR("z")
        r["relax (c_phi: MLP 50)"] = lambda: RELAX("z", in_dim=1 if workload == "toy" else LATENTS)
    else:
        r["unordered_set k=4"] = lambda: UnorderedSetEstimator("z", k=4)
        r["score_wor k=4 (default biased=True)"] = lambda: ScoreFunctionWOR("z", k=4)
        r["score_wor k=4 (biased=False)"] = lambda: ScoreFunctionWOR("z", k=4, biased=False)
        r["rao_blackwell k=4 (Liu et al.)"] = lambda: RaoBlackwellSF("z", n_samples=4)
    return r


# -- Models, as in estimators.py ---------------------------------------------------------


def sbn_cost_at(p, x, z):
    logits_q = x @ p["W"] + p["b"]
    log_q = Bernoulli(logits=logits_q).log_prob(z).sum(-1)
    log_prior = Bernoulli(logits=torch.zeros(LATENTS)).log_prob(z).sum(-1)
    log_lik = Bernoulli(logits=z @ p["V"] + p["c"]).log_prob(x).sum(-1)
    return log_q - log_prior - log_lik  # per image; the batch mean is the plate's


def catvae_cost_at(p, x, onehot):
    log_q = (onehot * torch.log_softmax(x @ p["W"] + p["b"], -1)).sum(-1)
    log_prior = -np.log(CATS)
    log_lik = Bernoulli(logits=onehot @ p["V"]).log_prob(x).sum(-1)
    return log_q - log_prior - log_lik


def as_float(z):
    # DisARM's samples are bool tensors (``z > 0``); the models compute with floats
    return z.float() if z.dtype == torch.bool else z


def toy_surrogate(p, x, method, target=0.499):
    # θ has shape (1,): REBAR/RELAX need a batch dimension (a 0-d θ fails inside them)
    b = as_float(method(Bernoulli(logits=p["theta"])))
    storch.add_cost((b - target) ** 2, "cost")


# The toy's signal at θ = 0 (0.0005) is far below one estimate's noise (0.1 for the score
# function), so 2000 draws cannot see a bias there. The bias check also runs the toy at
# θ = 0.5 with target 0.3: exact gradient σ'(0.5)·(1 − 2·0.3) = 0.0940.
CHECK_THETA, CHECK_TARGET = 0.5, 0.3


def toy_check_exact():
    s = 1 / (1 + np.exp(-CHECK_THETA))
    return s * (1 - s) * (1 - 2 * CHECK_TARGET)


def toy_check_surrogate(p, x, method):
    toy_surrogate(p, x, method, target=CHECK_TARGET)


def sbn_surrogate(p, x, method):
    x = storch.denote_independent(x, 0, "data")
    z = as_float(method(Bernoulli(logits=x @ p["W"] + p["b"])))
    storch.add_cost(sbn_cost_at(p, x, z), "cost")


def catvae_surrogate(p, x, method):
    x = storch.denote_independent(x, 0, "data")
    z = method(OneHotCategorical(logits=x @ p["W"] + p["b"]))
    storch.add_cost(catvae_cost_at(p, x, z), "cost")


def toy_objective(p):
    q = torch.sigmoid(p["theta"])
    return float(q * 0.501**2 + (1 - q) * 0.499**2)


def mc_objective(cost_at, sampler, data, draws=20, seed=99):
    """The discrete model's negative ELBO over the data set (``draws`` draws per image)."""

    def evaluate(p):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            vals = [cost_at(p, data, sampler(p, data, g)).mean() for _ in range(draws)]
        return float(torch.stack(vals).mean())

    return evaluate


def sbn_sampler(p, x, g):
    probs = torch.sigmoid(x @ p["W"] + p["b"])
    return (torch.rand(probs.shape, generator=g) < probs).float()


def catvae_sampler(p, x, g):
    probs = torch.softmax(x @ p["W"] + p["b"], -1)
    k = torch.multinomial(probs, 1, generator=g).squeeze(-1)
    return torch.nn.functional.one_hot(k, CATS).float()


# -- Measurements --------------------------------------------------------------------------


def fresh(params):
    return {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}


def grad_once(surrogate, p, x, method):
    for v in p.values():
        v.grad = None
    surrogate(p, x, method)
    storch.backward()
    return torch.cat(
        [v.grad.reshape(-1) if v.grad is not None else torch.zeros(v.numel()) for v in p.values()]
    )


def variance_and_bias(surrogate, params, x, make, draws, exact, warmup):
    torch.manual_seed(11)
    method = make()
    p = fresh(params)
    for _ in range(warmup):  # a moving-average baseline starts at 0: let it settle
        grad_once(surrogate, p, x, method)
    g = torch.stack([grad_once(surrogate, p, x, method) for _ in range(draws)]).double()
    var = g.var(0, unbiased=False)
    lv = float(np.log10(max(float(var.mean()), 1e-300)))
    bias = None
    if exact is not None:
        floor = 1e-5 * float(exact.abs().max())
        se = torch.sqrt(var / draws + floor**2)
        bias = float(((g.mean(0) - exact).abs() / se).max())
    return lv, bias


def time_step(surrogate, params, x, make, repeats):
    method = make()
    p = fresh(params)
    grad_once(surrogate, p, x, method)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        grad_once(surrogate, p, x, method)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def train(surrogate, params, data, make, steps, lr, idx, evaluate):
    torch.manual_seed(3)
    method = make()
    p = fresh(params)
    # RELAX / REBAR carry their own parameters (c_phi, temperature): trained alongside
    opt = torch.optim.Adam(list(p.values()) + list(method.parameters()), lr=lr)
    for step in range(steps):
        opt.zero_grad()
        x = None if data is None else data[idx[step]]
        surrogate(p, x, method)
        storch.backward()
        opt.step()
    return evaluate(p), {k: v.detach().numpy() for k, v in p.items()}


def check_models(inp, sbn0, cat0, batch):
    """The torch models give estimators.py's costs at fixed latents (float32 rounding)."""
    u = torch.tensor(inp["check_u"])
    z = (u < torch.sigmoid(batch @ sbn0["W"] + sbn0["b"])).float()
    got = {
        "sbn cost at fixed z": (
            float(sbn_cost_at(sbn0, batch, z).mean()),
            float(inp["sbn_check_cost"]),
        ),
        "catvae cost at fixed z": (
            float(
                catvae_cost_at(
                    cat0,
                    batch,
                    torch.nn.functional.one_hot(torch.tensor(inp["check_z"]), CATS).float(),
                ).mean()
            ),
            float(inp["catvae_check_cost"]),
        ),
    }
    q = torch.softmax(batch @ cat0["W"] + cat0["b"], -1)
    cost_k = torch.stack(
        [
            catvae_cost_at(
                cat0,
                batch,
                torch.nn.functional.one_hot(torch.full((batch.shape[0],), k), CATS).float(),
            )
            for k in range(CATS)
        ],
        -1,
    )
    got["catvae exact -ELBO (100 images)"] = (
        float((q * cost_k).sum(-1).mean()),
        float(inp["catvae_exact_neg_elbo"]),
    )
    for name, (mine, theirs) in got.items():
        rel = abs(mine - theirs) / abs(theirs)
        print(f"# check {name}: torch {mine:.6f}, scgjax {theirs:.6f}, rel. diff {rel:.1e}")
        assert rel < 1e-5, name


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs")
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--workloads", default="toy,sbn,catvae")
    ap.add_argument("--rows", default=None, help="comma-separated substrings of row names")
    ap.add_argument("--save", metavar="NPZ", help="save the trained parameters")
    args = ap.parse_args()

    inp = np.load(args.inputs)
    T = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    data = T(inp["data"])
    batch = data[:100]
    idx = torch.tensor(inp["train_idx"][: args.steps])
    assert idx.shape[0] == args.steps, "inputs.npz holds fewer steps: export with --steps"
    sbn0 = {k: T(inp[f"sbn_{k}"]) for k in "WbVc"}
    cat0 = {k: T(inp[f"catvae_{k}"]) for k in "WbV"}
    check_models(inp, sbn0, cat0, batch)
    print(
        f"# objective at init (scgjax): sbn {float(inp['sbn_objective_init']):.4f}, "
        f"catvae {float(inp['catvae_objective_init']):.4f}"
    )
    exact_cat = torch.cat([T(inp[f"catvae_exact_{k}"]).reshape(-1) for k in "WbV"]).double()
    workloads = {
        "toy": (
            toy_surrogate,
            {"theta": torch.zeros(1)},
            None,
            None,
            0.05,
            toy_objective,
            T(inp["toy_exact"]).reshape(1).double(),
        ),
        "sbn": (
            sbn_surrogate,
            sbn0,
            batch,
            data,
            0.01,
            mc_objective(sbn_cost_at, sbn_sampler, data),
            None,
        ),
        "catvae": (
            catvae_surrogate,
            cat0,
            batch,
            data,
            0.01,
            mc_objective(catvae_cost_at, catvae_sampler, data),
            exact_cat,
        ),
    }
    print(
        f"# peers_storchastic.py on {platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, storchastic 0.3.7; {args.draws} draws, {args.steps} steps"
    )
    saved = {}
    for name in args.workloads.split(","):
        surrogate, params, x, full, lr, evaluate, exact = workloads[name]
        if full is not None:
            init = evaluate(params)
            print(f"# {name}: objective at init, torch MC: {init:.4f}")
        print(f"\n## {name}\n")
        check = name == "toy"
        print(
            "| estimator | log10 var | bias (max |z|) | ms/step | objective after training |"
            + (" check: mean − exact at θ=0.5, t=0.3 (z) |" if check else "")
        )
        print("|---|---|---|---|---|" + ("---|" if check else ""))
        for row, make in rows(name).items():
            if args.rows and not any(s in row for s in args.rows.split(",")):
                continue
            try:
                warm = 100 if "moving" in row else 0
                lv, bias = variance_and_bias(surrogate, params, x, make, args.draws, exact, warm)
                ms = time_step(surrogate, params, x, make, args.repeats)
                obj, trained = train(surrogate, params, full, make, args.steps, lr, idx, evaluate)
                if full is not None:
                    saved.update({f"{name}/{row}/{k}": v for k, v in trained.items()})
                b = "-" if bias is None else f"{bias:.1f}"
                lv_s = "exact (rounding)" if lv < -12 else f"{lv:.2f}"
                extra = ""
                if check:
                    torch.manual_seed(12)
                    method, pc = (
                        make(),
                        {"theta": torch.full((1,), CHECK_THETA, requires_grad=True)},
                    )
                    g = torch.stack(
                        [
                            grad_once(toy_check_surrogate, pc, None, method)
                            for _ in range(args.draws)
                        ]
                    ).double()
                    ex = toy_check_exact()
                    se = max(float(g.std() / np.sqrt(args.draws)), 1e-5 * ex)
                    extra = f" {float(g.mean()) - ex:+.4f} ({(float(g.mean()) - ex) / se:+.1f}) |"
                print(f"| {row} | {lv_s} | {b} | {ms:.2f} | {obj:.4f} |{extra}", flush=True)
            except Exception as e:  # noqa: BLE001 -- a peer's failure is a result
                msg = " ".join(f"{type(e).__name__}: {e}".split())[:160]
                print(f"| {row} | failed: {msg} | | | |", flush=True)
                if os.environ.get("PEERS_DEBUG"):
                    traceback.print_exc()
            finally:
                storch.reset()
    if args.save and saved:
        np.savez(args.save, **saved)
        print(f"\n# saved {len(saved)} arrays to {args.save}")


if __name__ == "__main__":
    main()
