r"""Few-shot classification: iMAML against MAML, FO-MAML, Reptile and a pretrained baseline.

N-way K-shot episodes (default 5-way 1-shot, 15 query images per class) from scikit-learn's
8×8 digits with their 90°/180°/270° rotations as extra classes — 40 classes, 30 for
meta-training and 10 held out for meta-testing (:func:`implicitgrad.data.load_digits_fewshot`,
bundled data, nothing downloaded) — or from a local copy of Omniglot
(``--dataset omniglot --root PATH``, images resized to 28×28). Every method meta-trains the
same network from the same initialisation with the same number of meta-steps, meta-batch
size and outer optimizer (Adam); see ``imaml_sinusoid.py`` for the methods. The network is
a two-hidden-layer ReLU perceptron for digits and a four-block convolutional network (no
batch normalisation, so that the meta-batch runs under ``torch.func.vmap``) for Omniglot.

The script reports the accuracy on ``--eval-tasks`` held-out episodes (mean ± 95%
confidence interval) and saves ``fewshot_<dataset>_<N>way<K>shot.png``: the training curves
and the accuracy after 0..20 adaptation steps.

Checkpoints and ``--resume`` as in ``imaml_sinusoid.py``. Data-parallel over processes::

    torchrun --nproc_per_node=2 examples/imaml_fewshot.py --quick

Every process takes a shard of each meta-batch, the meta-gradient is all-reduced (gloo on
CPU, NCCL on CUDA), and process 0 evaluates and writes the outputs.

Run from the repository root: ``python examples/imaml_fewshot.py --quick``.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
from _common import example_parser, parse_args, print_summary, pyplot, save_figure, write_json
from imaml_sinusoid import (
    COLORS,
    LABELS,
    TRAINING_LABELS,
    adaptation_curve,
    add_meta_arguments,
    batched_eval,
    distributed_processes,
    make_learner,
    mean_ci,
    plot_cosine,
    resolve_meta_arguments,
    smooth,
    train_learner,
    training_summary,
)

import implicitgrad.meta as meta
from implicitgrad.data import EpisodeSampler, load_digits_fewshot, load_omniglot

#: Inner step size and steps of the gradient-step methods (training and test alike).
INNER_LR, INNER_STEPS = 0.2, 5
#: iMAML: proximal strength (the inner and backward solves are IMAML's defaults).
IMAML_LAM = 2.0
#: The adaptation curves run this many gradient steps.
CURVE_STEPS = 20


def build_model(dataset: str, n_way: int) -> torch.nn.Module:
    # Smooth layers only (GELU, average pooling): iMAML's meta-gradient needs a twice-differentiable
    # support loss; with ReLU the proximal problem's gradient norm plateaus at a kink.
    if dataset == "digits":
        return torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 128),
            torch.nn.GELU(), torch.nn.Linear(128, n_way),
        )
    blocks: list = []
    channels = 1
    for _ in range(4):
        blocks += [torch.nn.Conv2d(channels, 64, 3, padding=1), torch.nn.GELU(), torch.nn.AvgPool2d(2)]
        channels = 64
    return torch.nn.Sequential(*blocks, torch.nn.Flatten(), torch.nn.Linear(64, n_way))


def build_learner(method: str, model: torch.nn.Module, lam: float, check_every: Optional[int] = None):
    return make_learner(method, model, torch.nn.functional.cross_entropy, lam, inner_lr=INNER_LR,
                        inner_steps=INNER_STEPS, check_every=check_every)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(-1) == labels).to(logits.dtype).mean()


def load(args, device):
    if args.dataset == "omniglot":
        data = load_omniglot(args.root, image_size=28)
    else:
        # 24 classes to meta-train on, 6 to validate on (early stopping), 10 to test on.
        data = load_digits_fewshot(num_val_classes=6)
    return data._replace(images=data.images.to(device))


def evaluate_accuracy(learner: meta.MetaLearner, tasks) -> tuple:
    """Mean and 95% CI of the query accuracy after the learner's own adaptation."""

    def adapted_accuracy(x_s, y_s, x_q, y_q):
        return accuracy(learner.predict(learner.adapt(x_s, y_s), x_q), y_q)

    return mean_ci(batched_eval(adapted_accuracy, tasks))


def evaluate(method: str, learner: meta.MetaLearner, tasks) -> tuple:
    """Held-out accuracy after the learner's own adaptation, and the mean accuracy after 0..CURVE_STEPS steps."""

    mean, ci = evaluate_accuracy(learner, tasks)
    result = {"accuracy": mean, "ci95": ci}
    if method == "imaml":
        learner.adapt(tasks[0][0], tasks[1][0])
        info = learner.last_info[0]
        result["inner_relative_residual"] = info.forward_residual / max(1.0, info.initial_residual)
    return result, adaptation_curve(learner, CURVE_STEPS, accuracy, tasks).cpu()


def main(argv: Optional[List[str]] = None) -> dict:
    parser = example_parser(__file__, "Meta-learn N-way K-shot classification with iMAML, MAML, FO-MAML, Reptile "
                                      "and a pretrained baseline; report held-out accuracy with 95% confidence "
                                      "intervals.",
                            quick_time="4 to 6 minutes on one CPU core, most of it iMAML")
    parser.add_argument("--dataset", choices=("digits", "omniglot"), default="digits",
                        help="digits: scikit-learn's 8×8 digits, bundled (offline); omniglot: a local copy (--root)")
    parser.add_argument("--root", default=None, help="Omniglot folder (images_background/, images_evaluation/)")
    parser.add_argument("--n-way", type=int, default=5, help="classes per episode")
    parser.add_argument("--k-shot", type=int, default=1, help="support images per class")
    parser.add_argument("--k-query", type=int, default=15, help="query images per class")
    parser.add_argument("--lam", type=float, default=IMAML_LAM, help="iMAML proximal strength λ")
    add_meta_arguments(parser, steps=1000, quick_steps=200, eval_tasks=600, meta_batch=16, quick_meta_batch=8)
    args = parse_args(parser, argv)
    resolve_meta_arguments(parser, args)
    if args.dataset == "omniglot" and args.root is None:
        parser.error("--dataset omniglot needs --root PATH (a local copy; nothing is downloaded).")
    with distributed_processes(args.device) as (rank, world_size):
        return run(parser, args, rank, world_size)


def run(parser, args, rank: int, world_size: int) -> dict:
    """Train, evaluate and report every method of ``args`` on this process (rank 0 reports)."""
    device = args.device
    if args.meta_batch < world_size:
        parser.error(f"--meta-batch {args.meta_batch} gives some of the {world_size} processes no task.")

    data = load(args, device)
    eval_sampler = EpisodeSampler(data.images, data.labels, args.n_way, args.k_shot, args.k_query,
                                  classes=data.test_classes)
    episodes = eval_sampler.sample(args.eval_tasks, generator=torch.Generator().manual_seed(args.seed + 10_000))
    eval_tasks = [torch.stack(parts) for parts in zip(*episodes)]
    if data.val_classes:
        val_sampler = EpisodeSampler(data.images, data.labels, args.n_way, args.k_shot, args.k_query,
                                     classes=data.val_classes)
        val_episodes = val_sampler.sample(args.val_tasks, generator=torch.Generator().manual_seed(args.seed + 20_000))
    else:  # a dataset without validation classes: validate on held-out training episodes
        val_episodes = EpisodeSampler(data.images, data.labels, args.n_way, args.k_shot, args.k_query,
                                      classes=data.train_classes).sample(
            args.val_tasks, generator=torch.Generator().manual_seed(args.seed + 20_000))
    val_tasks = [torch.stack(parts) for parts in zip(*val_episodes)]
    tag = f"{args.dataset}-{args.n_way}way{args.k_shot}shot"
    results, histories, curves = {}, {}, {}
    for method in args.methods:
        torch.manual_seed(args.seed)
        learner = build_learner(method, build_model(args.dataset, args.n_way).to(device), args.lam, args.check_every)
        sampler = EpisodeSampler(data.images, data.labels, args.n_way, args.k_shot, args.k_query,
                                 classes=data.train_classes)
        generator = torch.Generator().manual_seed(args.seed + 1)
        checkpoint = args.out / "checkpoints" / f"{tag}-{method}-rank{rank}.pt"
        histories[method] = train_learner(
            method, learner, lambda s=sampler, g=generator: s.sample(args.meta_batch, generator=g), generator,
            args, checkpoint, rank, lambda learner=learner: evaluate_accuracy(learner, val_tasks)[0])
        if rank == 0:
            results[method], curves[method] = evaluate(method, learner, eval_tasks)
            results[method].update(training_summary(method, learner, histories[method]))

    if rank != 0:
        return {}
    metrics = {"dataset": args.dataset, "n_way": args.n_way, "k_shot": args.k_shot, "steps": args.steps,
               "meta_batch": args.meta_batch, "eval_tasks": args.eval_tasks, "processes": world_size,
               "methods": results}
    figure = plot(args, histories, curves, tag)
    print_summary(
        f"{args.dataset}, {args.n_way}-way {args.k_shot}-shot: accuracy on {args.eval_tasks} held-out episodes "
        "(mean ± 95% CI)",
        [(LABELS[m], f"{100 * r['accuracy']:.1f}% ± {100 * r['ci95']:.1f}   ({r['train_seconds']:.0f} s training; "
                     f"adaptation: {r['adaptation']})") for m, r in results.items()],
        [f"{args.steps} meta-steps of {args.meta_batch} episodes per method on {world_size} process(es); "
         f"figure in {figure}"],
    )
    write_json(args.json, metrics)
    return metrics


def plot(args, histories, curves, tag) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    window = max(1, args.steps // 20)
    for method, history in histories.items():
        loss = smooth(history["loss"], window)
        axes[0].plot(np.arange(len(loss)) + window, loss, color=COLORS[method], label=TRAINING_LABELS[method])
    axes[0].set(xlabel="meta-step", ylabel="query cross-entropy (training episodes, moving median)",
                title="Meta-training")
    for method, curve in curves.items():
        axes[1].plot(range(CURVE_STEPS + 1), 100 * curve.numpy(), "o-", ms=3, color=COLORS[method],
                     label=LABELS[method])
    axes[1].axhline(100 / args.n_way, color="k", lw=0.8, ls=":", label="chance")
    axes[1].set(xlabel="adaptation steps (iMAML: iterations of its inner solver)", ylabel="held-out accuracy (%)",
                title=f"{args.n_way}-way {args.k_shot}-shot: accuracy after k steps of each method's adaptation")
    axes[1].xaxis.get_major_locator().set_params(integer=True)
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    plot_cosine(args.out, histories, f"fewshot_{tag}_cosine.png")
    return save_figure(fig, args.out, f"fewshot_{tag}.png")


if __name__ == "__main__":
    main()
