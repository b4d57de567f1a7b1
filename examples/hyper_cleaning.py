r"""Data hyper-cleaning: learn a weight per training example so that noisy labels stop hurting.

Half of the training labels of scikit-learn's 8×8 digits are replaced by a random *other*
class. Each training example :math:`i` gets a weight :math:`s_i = \sigma(a_i)` (a sigmoid of a
learnable logit), and the inner problem is a weighted, L2-regularised softmax regression

.. math::

    W^\star(a) = \arg\min_W \; \frac{1}{n} \sum_{i=1}^n s_i\, \ell(y_i, W^\top x_i)
    + \frac{\mu}{2} \|W\|^2 ,

strictly convex thanks to :math:`\mu > 0`. The outer problem minimises the cross-entropy of
:math:`W^\star(a)` on a small *clean* validation set over all the logits :math:`a` — one
hyperparameter per training example, each with its exact implicit hypergradient. The inner
problem is solved by L-BFGS, warm-started from the previous solution; the backward system by CG.

The script reports three models — trained on all the noisy data (baseline), on the clean half
only (oracle, which needs to know which labels are wrong), and with the learned weights
(cleaned) — and how well the weights find the corrupted examples: an example is flagged as
corrupted when its weight is below 0.5, and the F1 score of those flags is reported.

Run from the repository root: ``python examples/hyper_cleaning.py --quick``.

References:
    Franceschi et al., Forward and Reverse Gradient-Based Hyperparameter Optimization, 2017.
"""

from __future__ import annotations

import functools
from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from _common import (
    example_parser,
    parse_args,
    print_summary,
    progress,
    pyplot,
    save_figure,
    split_indices,
    write_json,
)

import implicitgrad as ig

DTYPE = torch.float64
NUM_CLASSES = 10


def load_data(n_train: int, n_val: int, noise: float, seed: int, device: torch.device) -> Dict[str, object]:
    """Digits split into train / clean validation / test; a fraction ``noise`` of train labels corrupted.

    A corrupted label is drawn uniformly among the nine wrong classes. Pixels are scaled to [0, 1].
    """
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    train, val, test = split_indices(len(y), [n_train, n_val, -1], seed)
    rng = np.random.default_rng(seed + 1)
    y_noisy = y[train].copy()
    corrupted = np.zeros(n_train, dtype=bool)
    corrupted[rng.permutation(n_train)[: int(round(noise * n_train))]] = True
    y_noisy[corrupted] = (y_noisy[corrupted] + rng.integers(1, NUM_CLASSES, corrupted.sum())) % NUM_CLASSES

    def features(idx):
        return torch.as_tensor(X[idx], dtype=DTYPE, device=device)

    def labels(a):
        return torch.as_tensor(a, dtype=torch.long, device=device)

    return {
        "train": (features(train), labels(y_noisy)),
        "val": (features(val), labels(y[val])),
        "test": (features(test), labels(y[test])),
        "corrupted": torch.as_tensor(corrupted, device=device),
    }


def logits(model: Dict[str, torch.Tensor], X: torch.Tensor) -> torch.Tensor:
    return X @ model["W"] + model["b"]


def penalty(model: Dict[str, torch.Tensor], mu: float) -> torch.Tensor:
    return 0.5 * mu * ((model["W"] ** 2).sum() + (model["b"] ** 2).sum())


def inner_objective(model: Dict[str, torch.Tensor], weight_logits: torch.Tensor, X: torch.Tensor,
                    y: torch.Tensor, mu: float) -> torch.Tensor:
    """``(1/n) Σ_i σ(a_i) ℓ_i`` plus ``μ/2`` times the squared norm of W and b.

    Dividing by ``n`` rather than by ``Σ_i σ(a_i)`` keeps a price on discarding examples: a
    smaller total weight means relatively more regularisation. With the normalised sum,
    discarding any example is free, and the weights end up dropping clean ones too.
    """
    s = torch.sigmoid(weight_logits)
    loss = F.cross_entropy(logits(model, X), y, reduction="none")
    return (s * loss).mean() + penalty(model, mu)


def plain_objective(model: Dict[str, torch.Tensor], X: torch.Tensor, y: torch.Tensor, mu: float) -> torch.Tensor:
    """The unweighted objective (every weight 1) of the baseline and oracle models."""
    return F.cross_entropy(logits(model, X), y) + penalty(model, mu)


def cross_entropy(model: Dict[str, torch.Tensor], X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits(model, X), y)


def accuracy(model: Dict[str, torch.Tensor], X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((logits(model, X).argmax(dim=1) == y).to(DTYPE).mean())


def f1_score(flagged: torch.Tensor, corrupted: torch.Tensor) -> Dict[str, float]:
    """Precision, recall and F1 of ``flagged`` as a detector of ``corrupted`` (boolean tensors)."""
    true_positive = float((flagged & corrupted).sum())
    precision = true_positive / max(float(flagged.sum()), 1.0)
    recall = true_positive / max(float(corrupted.sum()), 1.0)
    f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1}


class Cleaner:
    """Weighted softmax regression whose per-example weights are learned by hypergradient descent."""

    def __init__(self, data: Dict[str, object], mu: float, lr: float) -> None:
        self.data = data
        self.objective = functools.partial(inner_objective, mu=mu)
        self.plain_objective = functools.partial(plain_objective, mu=mu)
        X, _ = data["train"]
        self.weight_logits = torch.zeros(len(X), dtype=DTYPE, device=X.device, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.weight_logits], lr=lr)
        self.solver = ig.solvers.TorchOptimizer(torch.optim.LBFGS, history_size=50, max_iter=100)
        self.model = self.zeros()

    def zeros(self) -> Dict[str, torch.Tensor]:
        X, _ = self.data["train"]
        return {"W": torch.zeros(X.shape[1], NUM_CLASSES, dtype=DTYPE, device=X.device),
                "b": torch.zeros(NUM_CLASSES, dtype=DTYPE, device=X.device)}

    def fit(self, weight_logits: torch.Tensor, X: torch.Tensor, y: torch.Tensor, x0=None):
        return ig.implicit_solve(self.objective, self.model if x0 is None else x0, weight_logits, X, y,
                                 solver=self.solver, linear_solver=ig.CG(maxiter=1000), return_info=True)

    def train_plain(self, X: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The unweighted model on ``(X, y)`` (through ``implicit_solve`` for its convergence check)."""
        with torch.no_grad():
            return ig.implicit_solve(self.plain_objective, self.zeros(), X, y, solver=self.solver)

    def step(self) -> Dict[str, float]:
        self.optimizer.zero_grad()
        model, info = self.fit(self.weight_logits, *self.data["train"])
        loss = cross_entropy(model, *self.data["val"])
        loss.backward()
        self.optimizer.step()
        self.model = {k: v.detach() for k, v in model.items()}
        return {"val_loss": loss.item(), "test_accuracy": accuracy(self.model, *self.data["test"]),
                "inner_iterations": info.forward_iterations, "cg_iterations": info.backward.iterations}

    def weights(self) -> torch.Tensor:
        return torch.sigmoid(self.weight_logits.detach())


def plot(history, baseline, oracle, weights, corrupted, out):
    plt = pyplot()
    # Two panels above one, 10 inches wide: legible at page width.
    fig, axes = plt.subplot_mosaic([["accuracy", "weights"], ["detection", "detection"]], figsize=(10, 8))
    axes = [axes["accuracy"], axes["weights"], axes["detection"]]

    ax = axes[0]
    ax.plot(history["test_accuracy"], label="cleaned (learned weights)")
    ax.axhline(baseline, color="C3", ls="--", label=f"baseline: all noisy data ({baseline:.3f})")
    ax.axhline(oracle, color="C2", ls=":", label=f"oracle: clean half only ({oracle:.3f})")
    ax.set(xlabel="outer step", ylabel="test accuracy", title="test accuracy")
    ax.legend(fontsize=8, loc="center right")

    ax = axes[1]
    bins = np.linspace(0, 1, 41)
    ax.hist(weights[~corrupted], bins=bins, alpha=0.7, label="clean label")
    ax.hist(weights[corrupted], bins=bins, alpha=0.7, label="corrupted label")
    ax.axvline(0.5, color="k", ls=":", label="threshold 0.5")
    ax.set(xlabel=r"learned weight $\sigma(a_i)$", ylabel="training examples", title="learned weights")
    ax.legend(fontsize=8, loc="upper center")

    ax = axes[2]
    ax.plot(history["f1"], label="F1")
    ax.plot(history["precision"], label="precision")
    ax.plot(history["recall"], label="recall")
    ax.set(xlabel="outer step", ylim=(0, 1.02), title="finding corrupted labels (weight < 0.5)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, out, "hyper_cleaning.png")


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = example_parser(__file__, "Data hyper-cleaning on digits: learn one weight per training example.",
                            quick_time="about 50 s on one CPU core")
    parser.add_argument("--steps", type=int, default=None, help="outer steps (default 20 quick, 200 full)")
    parser.add_argument("--lr", type=float, default=0.2, help="Adam step size on the weight logits")
    parser.add_argument("--mu", type=float, default=3e-3, help="L2 strength of the inner problem")
    parser.add_argument("--n-train", type=int, default=None, help="training examples (default 500 quick, 1000 full)")
    parser.add_argument("--n-val", type=int, default=300, help="clean validation examples")
    parser.add_argument("--noise", type=float, default=0.5, help="fraction of training labels corrupted")
    parser.set_defaults(threads=1)
    args = parse_args(parser, argv)
    if not 0 < args.noise < 1:
        parser.error(f"--noise must be strictly between 0 and 1, got {args.noise}.")
    steps = args.steps or (20 if args.quick else 200)
    n_train = args.n_train or (500 if args.quick else 1000)

    data = load_data(n_train, args.n_val, args.noise, args.seed, args.device)
    X, y = data["train"]
    corrupted = data["corrupted"]
    cleaner = Cleaner(data, args.mu, args.lr)
    baseline = accuracy(cleaner.train_plain(X, y), *data["test"])
    oracle = accuracy(cleaner.train_plain(X[~corrupted], y[~corrupted]), *data["test"])

    history: Dict[str, list] = {k: [] for k in ("val_loss", "test_accuracy", "inner_iterations", "cg_iterations",
                                                "precision", "recall", "f1")}
    bar = progress(range(steps), desc="outer steps")
    for _ in bar:
        for key, value in cleaner.step().items():
            history[key].append(value)
        for key, value in f1_score(cleaner.weights() < 0.5, corrupted).items():
            history[key].append(value)
        bar.set_postfix(val_loss=f"{history['val_loss'][-1]:.3f}", test_acc=f"{history['test_accuracy'][-1]:.3f}",
                        f1=f"{history['f1'][-1]:.2f}", refresh=False)

    with torch.no_grad():
        final, _ = cleaner.fit(cleaner.weight_logits.detach(), X, y)
    weights = cleaner.weights()
    detection = f1_score(weights < 0.5, corrupted)
    metrics = {
        "baseline_accuracy": baseline,
        "oracle_accuracy": oracle,
        "cleaned_accuracy": accuracy(final, *data["test"]),
        "f1": detection["f1"],
        "precision": detection["precision"],
        "recall": detection["recall"],
        "val_loss_before": history["val_loss"][0],
        "val_loss_after": cross_entropy(final, *data["val"]).item(),
        "mean_weight_clean": float(weights[~corrupted].mean()),
        "mean_weight_corrupted": float(weights[corrupted].mean()),
        "inner_iterations_mean": float(np.mean(history["inner_iterations"])),
        "cg_iterations_mean": float(np.mean(history["cg_iterations"])),
        "outer_steps": steps,
        "n_train": n_train,
    }
    write_json(args.json, metrics)
    figure = plot(history, baseline, oracle, weights.cpu().numpy(), corrupted.cpu().numpy(), args.out)

    print_summary(
        f"Data hyper-cleaning on digits: {n_train} training examples, {int(corrupted.sum())} with a wrong label; "
        f"{args.n_val} clean validation examples; {steps} outer steps",
        [
            ("test accuracy, baseline (all noisy data)", metrics["baseline_accuracy"]),
            ("test accuracy, oracle (clean part only)", metrics["oracle_accuracy"]),
            ("test accuracy, cleaned (learned weights)", metrics["cleaned_accuracy"]),
            ("validation loss before / after", f"{metrics['val_loss_before']:.4f} / {metrics['val_loss_after']:.4f}"),
            ("mean weight of clean / corrupted examples",
             f"{metrics['mean_weight_clean']:.3f} / {metrics['mean_weight_corrupted']:.3f}"),
            ("corrupted examples found (weight < 0.5): F1", metrics["f1"]),
            ("  precision / recall", f"{metrics['precision']:.3f} / {metrics['recall']:.3f}"),
            ("mean L-BFGS / CG iterations per outer step",
             f"{metrics['inner_iterations_mean']:.0f} / {metrics['cg_iterations_mean']:.0f}"),
        ],
        notes=[f"One weight per training example ({n_train} hyperparameters), each with an implicit hypergradient.",
               f"Figure: {figure}"],
    )
    return metrics


if __name__ == "__main__":
    main()
