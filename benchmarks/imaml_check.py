"""iMAML's meta-gradient on saved meta-parameters, checked two ways.

For each checkpoint of ``examples/imaml_fewshot.py`` (digits, λ = 2) and 5 fixed training
tasks: (a) :meth:`IMAML.check_meta_gradient`, the cosine between the implicit meta-gradient
and the derivative of the adaptation that ran; (b) the cosine between the default implicit
meta-gradient and a tightly solved reference (inner L-BFGS to 1e-7, CG to 1e-9).

    python benchmarks/imaml_check.py --k-shot 5 --json out.json runs/imaml_fewshot/checkpoints/*imaml*.pt
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from imaml_fewshot import build_learner, build_model  # noqa: E402

import implicitgrad as ig  # noqa: E402
import implicitgrad.meta as meta  # noqa: E402
from implicitgrad.data import EpisodeSampler, load_digits_fewshot  # noqa: E402


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", help="checkpoints written by examples/imaml_fewshot.py")
    parser.add_argument("--k-shot", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = load_digits_fewshot(num_val_classes=6)
    tasks = EpisodeSampler(data.images, data.labels, 5, args.k_shot, 15, classes=data.train_classes).sample(
        args.tasks, generator=torch.Generator().manual_seed(99))
    out = {}
    for path in args.checkpoints:
        state = torch.load(path, weights_only=False)
        model = build_model("digits", 5)
        model.load_state_dict(state["state"]["model"])
        learner = build_learner("imaml", model, 2.0)
        tight = meta.IMAML(model, torch.nn.functional.cross_entropy, lam=2.0, on_failure="ignore",
                           inner_solver=ig.solvers.LBFGS(maxiter=1000, tol=1e-7),
                           linear_solver=ig.CG(maxiter=2000, tol=1e-9))
        checks, reference = [], []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for task in tasks:
                checks.append(learner.check_meta_gradient(task)["cosine"])
                grads = [torch.cat([g.reshape(-1) for g in lr.meta_gradient([task])[0].values()]).double()
                         for lr in (learner, tight)]
                reference.append(cosine(*grads))
        out[state["step"]] = {"check_cosine": checks, "vs_tight_reference": reference}
        print(f"step {state['step']}: check {' '.join(f'{c:.4f}' for c in checks)} | "
              f"vs tight reference {' '.join(f'{c:.6f}' for c in reference)}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
