r"""Dataset distillation: learn one synthetic 8×8 image per digit that is enough to train a classifier.

Ten synthetic images :math:`S = (s_0, \dots, s_9)`, :math:`s_c` labelled :math:`c`, are the
only training data of an L2-regularised softmax regression on the 64 pixels,

.. math::

    W^\star(S) = \arg\min_{W, b} \; \frac{1}{10} \sum_{c=0}^{9} \ell\big(c, W^\top s_c + b\big)
    + \frac{\mu}{2} \big(\|W\|^2 + \|b\|^2\big) ,

solved to stationarity by L-BFGS (strictly convex for :math:`\mu > 0`). The outer problem
minimises the cross-entropy of :math:`W^\star(S)` on the real training digits over the *pixels*
of :math:`S`: the images are the parameters of the inner problem and receive their gradient
through the implicit solve, never through the L-BFGS iterations. The classifier trained on the
ten learned images is then evaluated on the real test digits and compared with classifiers
trained on ten other images: the random initialisation, one real digit per class, and the
mean image of each class.

Run from the repository root: ``python examples/dataset_distillation.py --quick``.

References:
    Wang et al., Dataset Distillation, 2018.
"""

from __future__ import annotations

import functools
from typing import Dict, Optional, Sequence

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


def load_data(n_train: int, seed: int, device: torch.device) -> Dict[str, tuple]:
    """Digits with pixels in [0, 1], split at random into train (for the outer loss) and test."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    train, test = split_indices(len(y), [n_train, -1], seed)

    def pair(idx):
        return (torch.as_tensor(X[idx] / 16.0, dtype=DTYPE, device=device),
                torch.as_tensor(y[idx], dtype=torch.long, device=device))

    return {"train": pair(train), "test": pair(test)}


def logits(model: Dict[str, torch.Tensor], X: torch.Tensor) -> torch.Tensor:
    return X @ model["W"] + model["b"]


def inner_objective(model: Dict[str, torch.Tensor], images: torch.Tensor, labels: torch.Tensor,
                    mu: float) -> torch.Tensor:
    """Mean cross-entropy on the synthetic images plus ``μ/2`` times the squared norm of W and b."""
    penalty = 0.5 * mu * ((model["W"] ** 2).sum() + (model["b"] ** 2).sum())
    return F.cross_entropy(logits(model, images), labels) + penalty


def accuracy(model: Dict[str, torch.Tensor], X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((logits(model, X).argmax(dim=1) == y).to(DTYPE).mean())


class Distiller:
    """Synthetic images trained by Adam on the implicit hypergradient of the real-data loss."""

    def __init__(self, images0: torch.Tensor, mu: float, lr: float) -> None:
        self.images = images0.detach().clone().requires_grad_(True)
        self.labels = torch.arange(NUM_CLASSES, device=images0.device)
        self.objective = functools.partial(inner_objective, mu=mu)
        self.optimizer = torch.optim.Adam([self.images], lr=lr)
        self.solver = ig.solvers.TorchOptimizer(torch.optim.LBFGS, history_size=50, max_iter=100)
        self.model = self.zeros()

    def zeros(self) -> Dict[str, torch.Tensor]:
        like = self.images.detach()
        return {"W": torch.zeros(like.shape[1], NUM_CLASSES, dtype=like.dtype, device=like.device),
                "b": torch.zeros(NUM_CLASSES, dtype=like.dtype, device=like.device)}

    def fit(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None, x0=None):
        """The classifier trained on ``images`` alone, differentiable in the pixels.

        ``labels`` default to ``0, …, 9``; ``x0`` defaults to the previous classifier.
        """
        labels = self.labels if labels is None else labels
        return ig.implicit_solve(self.objective, self.model if x0 is None else x0, images, labels,
                                 solver=self.solver, linear_solver=ig.CG(maxiter=1000), return_info=True)

    def step(self, X: torch.Tensor, y: torch.Tensor) -> float:
        """One Adam step on the pixels; afterwards ``self.model`` is the classifier of the images before it."""
        self.optimizer.zero_grad()
        model, _ = self.fit(self.images)
        loss = F.cross_entropy(logits(model, X), y)
        loss.backward()
        self.optimizer.step()
        self.model = {k: v.detach() for k, v in model.items()}
        return loss.item()

    def test_accuracy(self, images: torch.Tensor, X_test: torch.Tensor, y_test: torch.Tensor,
                      labels: Optional[torch.Tensor] = None) -> float:
        """Test accuracy of the classifier trained from scratch on ``images`` (labelled ``0, …, 9`` by default)."""
        with torch.no_grad():
            model, _ = self.fit(images, labels, x0=self.zeros())
        return accuracy(model, X_test, y_test)


def plot_images(rows: Dict[str, torch.Tensor], out, name: str):
    """A grid: one row per set of ten images, one column per class; each image on its own grey scale."""
    plt = pyplot()
    fig, axes = plt.subplots(len(rows), NUM_CLASSES, figsize=(NUM_CLASSES * 1.1, len(rows) * 1.3), squeeze=False)
    for r, (title, images) in enumerate(rows.items()):
        for c in range(NUM_CLASSES):
            ax = axes[r, c]
            ax.imshow(images[c].detach().cpu().numpy().reshape(8, 8), cmap="gray_r")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(str(c))
        axes[r, 0].set_ylabel(title, rotation=0, ha="right", va="center", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out, name)


def plot_curves(history, references, out):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    axes[0].plot(history["loss"])
    axes[0].set(xlabel="outer step", ylabel="cross-entropy on real training digits", title="outer loss")
    axes[1].plot(history["test_accuracy"], label="learned images")
    for (name, value), color in zip(references.items(), ("C3", "C2", "C4", "k")):
        axes[1].axhline(value, ls="--", color=color, label=f"{name} ({value:.3f})")
    axes[1].axhline(0.1, ls=":", color="gray", label="chance")
    axes[1].set(xlabel="outer step", ylabel="test accuracy", title="classifier trained on 10 images")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out, "dataset_distillation_curves.png")


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = example_parser(__file__, "Distil the digits into one learned 8×8 image per class.",
                            quick_time="about 30 s on one CPU core")
    parser.add_argument("--steps", type=int, default=None, help="outer steps (default 30 quick, 400 full)")
    parser.add_argument("--lr", type=float, default=0.05, help="Adam step size on the pixels")
    parser.add_argument("--mu", type=float, default=1e-2, help="L2 strength of the inner softmax regression")
    parser.add_argument("--n-train", type=int, default=1000, help="real digits for the outer loss; the rest is test")
    parser.set_defaults(threads=1)
    args = parse_args(parser, argv)
    steps = args.steps or (30 if args.quick else 400)

    data = load_data(args.n_train, args.seed, args.device)
    (X, y), (X_test, y_test) = data["train"], data["test"]
    generator = torch.Generator().manual_seed(args.seed)
    noise = (0.5 + 0.05 * torch.randn(NUM_CLASSES, X.shape[1], generator=generator, dtype=DTYPE)).to(args.device)
    distiller = Distiller(noise, args.mu, args.lr)

    # Ten-image training sets to compare with: one real digit per class, and the class means.
    first = torch.stack([torch.nonzero(y == c)[0, 0] for c in range(NUM_CLASSES)])
    class_means = torch.stack([X[y == c].mean(dim=0) for c in range(NUM_CLASSES)])
    references = {
        "random-noise initialisation": distiller.test_accuracy(noise, X_test, y_test),
        "one real digit per class": distiller.test_accuracy(X[first], X_test, y_test),
        "class-mean images": distiller.test_accuracy(class_means, X_test, y_test),
    }
    # For scale: the same model trained on every real training digit.
    all_real = distiller.test_accuracy(X, X_test, y_test, labels=y)
    references[f"all {len(y)} real digits"] = all_real

    history: Dict[str, list] = {"loss": [], "test_accuracy": []}
    bar = progress(range(steps), desc="outer steps")
    for _ in bar:
        history["loss"].append(distiller.step(X, y))
        history["test_accuracy"].append(accuracy(distiller.model, X_test, y_test))
        bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", test_acc=f"{history['test_accuracy'][-1]:.3f}",
                        refresh=False)

    learned = distiller.images.detach()
    with torch.no_grad():
        final, _ = distiller.fit(learned, x0=distiller.zeros())
        history["loss"].append(F.cross_entropy(logits(final, X), y).item())
    test_accuracy = accuracy(final, X_test, y_test)
    history["test_accuracy"].append(test_accuracy)
    grid = plot_images({"initial noise": noise, "one real digit": X[first], "class mean": class_means,
                        "learned": learned}, args.out, "dataset_distillation.png")
    curves = plot_curves(history, references, args.out)

    metrics = {
        "test_accuracy": test_accuracy,
        "test_accuracy_init": references["random-noise initialisation"],
        "test_accuracy_one_real_per_class": references["one real digit per class"],
        "test_accuracy_class_means": references["class-mean images"],
        "test_accuracy_all_real": all_real,
        "train_loss_before": history["loss"][0],
        "train_loss_after": history["loss"][-1],
        "outer_steps": steps,
    }
    write_json(args.json, metrics)
    print_summary(
        f"Dataset distillation on digits: 10 learned images, {len(y)} real training digits for the outer loss, "
        f"{len(y_test)} test digits, {steps} outer steps",
        [
            ("test accuracy, trained on the 10 learned images", test_accuracy),
            ("test accuracy, trained on the 10 initial noise images", references["random-noise initialisation"]),
            ("test accuracy, trained on one real digit per class", references["one real digit per class"]),
            ("test accuracy, trained on the 10 class-mean images", references["class-mean images"]),
            (f"test accuracy, trained on all {len(y)} real training digits", all_real),
            ("cross-entropy on real training digits, before / after",
             f"{metrics['train_loss_before']:.4f} / {metrics['train_loss_after']:.4f}"),
        ],
        notes=["Chance is 0.1. Each classifier is the same L2-regularised softmax regression, trained to",
               "stationarity on the images listed; the learned pixels got their gradients through the implicit solve.",
               f"Figures: {grid}, {curves}"],
    )
    return metrics


if __name__ == "__main__":
    main()
