r"""Few-shot sinusoid regression: iMAML against MAML, FO-MAML, Reptile and a pretrained baseline.

Each task is a sinusoid :math:`y = A \sin(x - \varphi)` with :math:`A \sim U[0.1, 5]`,
:math:`\varphi \sim U[0, \pi]`, observed at ``K`` points (Finn et al., 2017). Every method
meta-trains the same 1-40-40-1 ReLU network from the same initialisation, with the same
number of meta-steps, meta-batch size and outer optimizer (Adam):

* ``imaml`` — :class:`implicitgrad.meta.IMAML`: adaptation minimises the support loss plus
  :math:`\frac{\lambda}{2}\|\phi - \theta\|^2` (a fixed number of gradient steps); the
  meta-gradient :math:`(I + H/\lambda)^{-1}\nabla L_{\text{query}}(\phi)` comes from
  :func:`implicitgrad.implicit_solve` with a few conjugate-gradient steps;
* ``maml`` / ``fomaml`` — gradient steps on the support loss, differentiated through the
  steps / first order;
* ``reptile`` — gradient steps on support ∪ query, meta-gradient :math:`\theta - \tilde\phi`;
* ``pretrained`` — the network trained on the pooled data of all tasks, fine-tuned on the
  support set at test time (:class:`implicitgrad.meta.JointTraining`).

Training runs through :func:`implicitgrad.training.run_training`: a checkpoint every
``--checkpoint-every`` meta-steps (``--out/checkpoints``), and ``--resume`` continues an
interrupted run to the result an uninterrupted one gives. Under ``torchrun`` every process
takes a shard of each meta-batch and :meth:`~implicitgrad.meta.MetaLearner.meta_step`
all-reduces the meta-gradient.

The script reports the mean squared error on held-out tasks (mean ± 95% confidence interval
over ``--eval-tasks`` tasks, 100 query points each) and saves ``sinusoid_<K>shot.png``: the
training curves, the error after 0..20 adaptation steps, and one task's fits.

Run from the repository root: ``python examples/imaml_sinusoid.py --quick``.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from _common import example_parser, parse_args, print_summary, pyplot, save_figure, write_json

import implicitgrad as ig
import implicitgrad.meta as meta
from implicitgrad.data import Sinusoid
from implicitgrad.training import run_training

METHODS = ("imaml", "maml", "fomaml", "reptile", "pretrained")
LABELS = {"imaml": "iMAML", "maml": "MAML", "fomaml": "FO-MAML", "reptile": "Reptile", "pretrained": "pretrained"}
#: Reptile's training loss is measured after adapting on the query set too.
TRAINING_LABELS = {**LABELS, "reptile": "Reptile (query set seen)"}
COLORS = {"imaml": "C3", "maml": "C0", "fomaml": "C2", "reptile": "C1", "pretrained": "C7"}

# ----------------------------------------------------------------------------------------------
# Helpers shared with imaml_fewshot.py (examples/_common.py has no meta-learning pieces).


def add_meta_arguments(parser, steps: int, quick_steps: int, eval_tasks: int, meta_batch: int,
                       quick_meta_batch: int) -> None:
    """Options both meta-learning examples take."""
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"meta-steps per method (default {steps}; {quick_steps} with --quick)")
    parser.add_argument("--meta-batch", type=int, default=None,
                        help=f"tasks per meta-step, all processes together (default {meta_batch}; "
                             f"{quick_meta_batch} with --quick)")
    parser.add_argument("--meta-lr", type=float, default=3e-3, help="Adam step size of the outer loop")
    parser.add_argument("--eval-tasks", type=int, default=None,
                        help=f"held-out tasks for the final metrics (default {eval_tasks}; 200 with --quick)")
    parser.add_argument("--checkpoint-every", type=int, default=100, help="meta-steps between checkpoints")
    parser.add_argument("--val-every", type=int, default=None,
                        help="meta-steps between validations; the best meta-parameters are kept (default steps/10)")
    parser.add_argument("--val-tasks", type=int, default=100, help="validation tasks (held out from training)")
    parser.add_argument("--check-every", type=int, default=None,
                        help="iMAML: compare the implicit meta-gradient with the unrolled derivative of the "
                             "adaptation on one task every N meta-steps (the cosine goes to the JSON history)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the checkpoints in --out/checkpoints (finished methods are reloaded)")
    # Small models: one intra-op thread per process avoids oversubscribing the cores.
    parser.set_defaults(threads=1)
    parser.set_defaults(default_steps=steps, quick_steps=quick_steps, default_eval_tasks=eval_tasks,
                        default_meta_batch=meta_batch, quick_meta_batch=quick_meta_batch)


def resolve_meta_arguments(parser, args) -> None:
    """Fills the budget defaults and checks the method list."""
    if args.steps is None:
        args.steps = args.quick_steps if args.quick else args.default_steps
    if args.eval_tasks is None:
        args.eval_tasks = 200 if args.quick else args.default_eval_tasks
    if args.meta_batch is None:
        args.meta_batch = args.quick_meta_batch if args.quick else args.default_meta_batch
    if args.val_every is None:
        args.val_every = max(1, args.steps // 10)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown or not args.methods:
        parser.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}.")
    counts = (args.steps, args.meta_batch, args.checkpoint_every, args.val_every, args.val_tasks)
    if min(counts) < 1 or args.eval_tasks < 2:
        parser.error("--steps, --meta-batch, --checkpoint-every, --val-every and --val-tasks must be positive and "
                     "--eval-tasks at least 2.")


@contextlib.contextmanager
def distributed_processes(device: torch.device) -> Iterator[Tuple[int, int]]:
    """``(rank, world_size)`` for the ``with`` body; under torchrun, the process group around it.

    When ``WORLD_SIZE > 1`` and no group exists, initialise one (gloo on CPU, NCCL on CUDA) and,
    once the body has returned on this process, wait at a barrier for every other process before
    destroying it. Without the barrier a process could tear its gloo connections down while a
    peer's transport threads still serve the last collective, and the peer then aborts at exit
    after finishing its work. A body that raises skips the barrier (the others may never reach it)
    and lets torchrun stop the job. A group that existed before is left to its owner.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    created = world_size > 1 and not meta.is_distributed()
    if created:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend)
    if meta.is_distributed():
        yield torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        yield 0, 1
    if created:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


class BestState:
    """The meta-parameters with the best validation score so far (early stopping), checkpointable."""

    def __init__(self, learner: meta.MetaLearner) -> None:
        self.learner, self.score, self.step, self.state = learner, -math.inf, 0, None

    def offer(self, score: float, step: int) -> None:
        if score > self.score:
            self.score, self.step = score, step
            self.state = {"model": {k: v.detach().clone() for k, v in self.learner.model.state_dict().items()},
                          "learner": self.learner.state_dict()}

    def restore(self) -> None:
        if self.state is not None:
            self.learner.model.load_state_dict(self.state["model"])
            self.learner.load_state_dict(self.state["learner"])

    def state_dict(self) -> dict:
        return {"score": self.score, "step": self.step, "state": self.state}

    def load_state_dict(self, state: dict) -> None:
        self.score, self.step, self.state = state["score"], state["step"], state["state"]


def train_learner(name: str, learner: meta.MetaLearner, sample_tasks: Callable[[], list], generator: torch.Generator,
                  args, checkpoint: Path, rank: int, validate: Callable[[], float]) -> Dict[str, list]:
    """Meta-trains ``learner`` with Adam for ``args.steps`` meta-steps, checkpointed and resumable.

    Every process draws the whole meta-batch from the same generator and keeps its shard, so
    the task stream, and hence the result, does not depend on the number of processes. Every
    ``args.val_every`` meta-steps ``validate()`` (higher is better) scores the learner on
    held-out validation tasks; the meta-parameters with the best score are restored at the
    end (early stopping). iMAML's meta-gradient checks (``--check-every``) go to the history.
    """
    optimizer = torch.optim.Adam(learner.meta_parameters(), lr=args.meta_lr)
    best = BestState(learner)
    history: Dict[str, list] = {}

    def step(i: int) -> dict:
        start = time.perf_counter()
        loss = learner.meta_step(meta.shard_tasks(sample_tasks()))
        # A meta-batch whose inner solve diverged (a non-finite loss or meta-gradient) is
        # dropped rather than allowed to turn the meta-parameters into NaN; it is counted.
        finite = math.isfinite(float(loss)) and all(
            bool(torch.isfinite(p.grad).all()) for p in learner.meta_parameters() if p.grad is not None
        )
        if finite:
            optimizer.step()
        record = {"loss": loss, "seconds": time.perf_counter() - start, "skipped": int(not finite)}
        checks = getattr(learner, "gradient_checks", [])
        if checks and checks[-1]["step"] == learner.meta_steps:
            history.setdefault("check_step", []).append(i)
            history.setdefault("cosine", []).append(checks[-1]["cosine"])
        if (i + 1) % args.val_every == 0 or i + 1 == args.steps:
            score = validate()
            history.setdefault("val_step", []).append(i + 1)
            history.setdefault("val_score", []).append(score)
            best.offer(score, i + 1)
        if isinstance(learner, meta.IMAML):
            record["inner_converged"] = learner.inner_converged_fraction
        return record

    # A method that had not started before an interruption has no checkpoint yet: start it afresh.
    resume = args.resume and checkpoint.is_file()
    run_training(
        step, args.steps, checkpoint_path=checkpoint, checkpoint_every=args.checkpoint_every, resume=resume,
        state_objects={"model": learner.model, "optimizer": optimizer, "learner": learner, "best": best},
        generators={"tasks": generator}, history=history, progress=rank == 0, description=f"{name:>10}",
    )
    best.restore()
    history["best_step"] = best.step
    return history


def plot_cosine(out: Path, histories: Dict[str, Dict[str, list]], name: str) -> Optional[Path]:
    """iMAML's meta-gradient check (``--check-every``): cosine with the unrolled derivative per meta-step."""
    history = histories.get("imaml", {})
    if "cosine" not in history:
        return None
    fig, ax = pyplot().subplots(figsize=(6, 3.6))
    ax.plot(history["check_step"], history["cosine"], "o-", ms=3, color=COLORS["imaml"])
    ax.set(xlabel="meta-step", ylabel="cosine", ylim=(min(0.0, min(history["cosine"])), 1.02),
           title="iMAML: implicit meta-gradient vs derivative of the adaptation")
    fig.tight_layout()
    return save_figure(fig, out, name)


def mean_ci(values: torch.Tensor) -> tuple:
    """Mean and half-width of the normal 95% confidence interval of the mean."""
    values = values.double()
    return float(values.mean()), float(1.96 * values.std() / math.sqrt(len(values)))


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Moving median: the loss of single meta-batches is noisy and has rare spikes (a diverging inner loop)."""
    values = np.asarray(values, dtype=float)
    window = max(1, min(window, len(values)))
    return np.median(np.lib.stride_tricks.sliding_window_view(values, window), axis=-1)


def adaptation_curve(learner: meta.MetaLearner, steps: int, error: Callable, tasks: Sequence[torch.Tensor],
                     chunk: int = 100) -> torch.Tensor:
    """Mean query error over ``tasks`` after 0..steps steps of each method's own test-time adaptation.

    Gradient-step methods: steps of their ``inner_lr`` on the support loss. iMAML: iterations
    of its inner solver (``LBFGS``, each task with its own steps and history) on the
    proximal objective — a fixed gradient step would diverge at the sharp meta-parameters
    iMAML learns, and would not be the adaptation it uses.
    """
    if not isinstance(learner, meta.IMAML):
        lr = learner.inner_lr

        def one(x_s, y_s, x_q, y_q):
            params = {k: v.detach() for k, v in learner.model.named_parameters()}
            grad = torch.func.grad(lambda p: learner.adaptation_loss(p, x_s, y_s))
            errors = [error(learner.predict(params, x_q), y_q)]
            for _ in range(steps):
                g = grad(params)
                params = {k: v - lr * g[k] for k, v in params.items()}
                errors.append(error(learner.predict(params, x_q), y_q))
            return torch.stack(errors)

        return batched_eval(one, tasks, chunk).mean(0)
    out = []
    for start in range(0, tasks[0].shape[0], chunk):
        x_s, y_s, x_q, y_q = (t[start : start + chunk] for t in tasks)
        theta = dict(learner.named_meta_parameters())
        phi0 = {k: v.detach().expand(x_s.shape[0], *v.shape).clone() for k, v in learner._trainable(theta).items()}

        def support(phi, x_s=x_s, y_s=y_s):
            return torch.func.vmap(learner.adaptation_loss)(phi, x_s, y_s).sum()

        def query_error(phi, x_q=x_q, y_q=y_q):
            with torch.no_grad():
                return torch.func.vmap(lambda p, x, y: error(learner.predict(p, x), y))(phi, x_q, y_q)

        errors = [query_error(phi0)]
        for k in range(1, steps + 1):
            phi, _ = ig.solvers.LBFGS(maxiter=k, tol=0).run(support, phi0, batch_ndim=1)
            errors.append(query_error(phi))
        out.append(torch.stack(errors, -1))
    return torch.cat(out).mean(0)


def batched_eval(fn: Callable, tensors: Sequence[torch.Tensor], chunk: int = 100) -> torch.Tensor:
    """``fn`` vmapped over the tasks (first dimension of every tensor), in chunks, without gradients."""
    out = []
    with torch.no_grad():
        for start in range(0, tensors[0].shape[0], chunk):
            out.append(torch.func.vmap(fn)(*(t[start : start + chunk] for t in tensors)))
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# Sinusoid regression.

#: Inner step size and steps of the gradient-step methods (training and test alike).
INNER_LR, INNER_STEPS = 0.02, 5
#: iMAML: proximal strength and CG steps of the backward solve (the inner solve is IMAML's default).
IMAML_LAM, IMAML_CG = 5.0, 50
#: The adaptation curves run this many gradient steps.
CURVE_STEPS = 20


def build_model() -> torch.nn.Module:
    # GELU, not ReLU: iMAML's meta-gradient needs a twice-differentiable support loss. With
    # ReLU the proximal problem is piecewise smooth and its gradient norm plateaus at a kink
    # instead of vanishing (measured: 0.03-0.09 on digits, whatever the solver).
    return torch.nn.Sequential(
        torch.nn.Linear(1, 40), torch.nn.GELU(), torch.nn.Linear(40, 40), torch.nn.GELU(), torch.nn.Linear(40, 1)
    )


def make_learner(method: str, model: torch.nn.Module, loss: Callable, lam: float, *, inner_lr: float,
                 inner_steps: int, check_every: Optional[int] = None) -> meta.MetaLearner:
    """One of the compared methods (shared by both examples).

    iMAML keeps every diagnostic on: its inner problem is solved to the forward tolerance by
    L-BFGS with a gradient-only line search, per task (``IMAML``'s default),
    and the backward system by CG; ``check_every`` turns on its meta-gradient check.
    """
    if method == "imaml":
        return meta.IMAML(model, loss, lam=lam, linear_solver=ig.CG(maxiter=IMAML_CG), check_every=check_every)
    cls = {"maml": meta.MAML, "fomaml": meta.FOMAML, "reptile": meta.Reptile, "pretrained": meta.JointTraining}[method]
    return cls(model, loss, inner_lr=inner_lr, inner_steps=inner_steps)


def adaptation_label(method: str, learner: meta.MetaLearner) -> str:
    """How a method adapts at test time, for the results table."""
    if method == "imaml":
        return (f"proximal problem (λ={learner.lam:g}) solved to the forward tolerance, "
                f"≤{meta.imaml.DEFAULT_INNER_MAXITER} L-BFGS iterations")
    return f"{learner.inner_steps} gradient steps of {learner.inner_lr:g}"


def build_learner(method: str, model: torch.nn.Module, lam: float, check_every: Optional[int] = None):
    return make_learner(method, model, torch.nn.functional.mse_loss, lam, inner_lr=INNER_LR,
                        inner_steps=INNER_STEPS, check_every=check_every)


def main(argv: Optional[List[str]] = None) -> dict:
    parser = example_parser(__file__, "Meta-learn sinusoid regression with iMAML, MAML, FO-MAML, Reptile and a "
                                      "pretrained baseline; report held-out MSE with 95% confidence intervals.",
                            quick_time="about 1 minute on one CPU core")
    parser.add_argument("--k-shot", type=int, default=10, help="support (and training query) points per task")
    parser.add_argument("--lam", type=float, default=IMAML_LAM, help="iMAML proximal strength λ")
    add_meta_arguments(parser, steps=1500, quick_steps=300, eval_tasks=600, meta_batch=25, quick_meta_batch=10)
    args = parse_args(parser, argv)
    resolve_meta_arguments(parser, args)
    with distributed_processes(args.device) as (rank, world_size):
        return run(parser, args, rank, world_size)


def run(parser, args, rank: int, world_size: int) -> dict:
    """Train, evaluate and report every method of ``args`` on this process (rank 0 reports)."""
    device = args.device
    if args.meta_batch < world_size:
        parser.error(f"--meta-batch {args.meta_batch} gives some of the {world_size} processes no task.")

    eval_family = Sinusoid(args.k_shot, k_query=100, seed=args.seed + 10_000)
    eval_tasks, functions = eval_family.sample_batch(args.eval_tasks, device=device, return_functions=True)
    grid = torch.linspace(-5, 5, 200, device=device).unsqueeze(1)
    # The task drawn in the figure: the one whose amplitude is closest to the middle of the range.
    shown = min(range(len(functions)), key=lambda i: abs(functions[i].amplitude - 2.5))
    val_tasks = Sinusoid(args.k_shot, k_query=100, seed=args.seed + 20_000).sample_batch(args.val_tasks, device=device)
    results, histories, curves, fits = {}, {}, {}, {}
    for method in args.methods:
        torch.manual_seed(args.seed)
        learner = build_learner(method, build_model().to(device), args.lam, args.check_every)
        family = Sinusoid(args.k_shot, seed=args.seed + 1)
        checkpoint = args.out / "checkpoints" / f"sinusoid-{args.k_shot}shot-{method}-rank{rank}.pt"
        histories[method] = train_learner(
            method, learner, lambda family=family: family.sample(args.meta_batch, device=device), family.generator,
            args, checkpoint, rank, lambda learner=learner: -evaluate_error(learner, val_tasks)[0])
        if rank == 0:
            results[method], curves[method] = evaluate(method, learner, eval_tasks)
            results[method].update(training_summary(method, learner, histories[method]))
            with torch.no_grad():
                fits[method] = learner.predict(learner.adapt(eval_tasks[0][shown], eval_tasks[1][shown]), grid).cpu()

    if rank != 0:
        return {}
    metrics = {"k_shot": args.k_shot, "steps": args.steps, "meta_batch": args.meta_batch,
               "eval_tasks": args.eval_tasks, "processes": world_size, "methods": results}
    plot(args, histories, curves, fits, grid.cpu(), functions[shown],
         (eval_tasks[0][shown].cpu(), eval_tasks[1][shown].cpu()))
    print_summary(
        f"Sinusoid regression, {args.k_shot}-shot: MSE on {args.eval_tasks} held-out tasks (mean ± 95% CI)",
        [(LABELS[m], f"{r['mse_mean']:.3f} ± {r['ci95']:.3f}   ({r['train_seconds']:.0f} s training; "
                     f"adaptation: {r['adaptation']})") for m, r in results.items()],
        [f"{args.steps} meta-steps of {args.meta_batch} tasks per method; figure in "
         f"{args.out / f'sinusoid_{args.k_shot}shot.png'}"],
    )
    write_json(args.json, metrics)
    return metrics


def evaluate_error(learner: meta.MetaLearner, tasks) -> tuple:
    """Mean and 95% CI of the query MSE after the learner's own adaptation."""
    mse = torch.nn.functional.mse_loss

    def adapted_error(x_s, y_s, x_q, y_q):
        return mse(learner.predict(learner.adapt(x_s, y_s), x_q), y_q)

    return mean_ci(batched_eval(adapted_error, tasks))


def training_summary(method: str, learner: meta.MetaLearner, history: Dict[str, list]) -> dict:
    """What the results table and the JSON report beside the score, for every method."""
    out = {"train_seconds": sum(history["seconds"]), "best_step": history["best_step"],
           "adaptation": adaptation_label(method, learner)}
    if isinstance(learner, meta.IMAML):
        out["inner_converged_fraction"] = learner.inner_converged_fraction
        out["inner_resolves"] = learner.inner_resolves  # meta-batches re-solved after negative curvature
        if "cosine" in history:
            out["meta_gradient_cosine"] = {"step": history["check_step"], "cosine": history["cosine"]}
    return out


def evaluate(method: str, learner: meta.MetaLearner, tasks) -> tuple:
    """Held-out MSE after the learner's own adaptation, and the mean MSE after 0..CURVE_STEPS steps."""
    mse = torch.nn.functional.mse_loss

    mean, ci = evaluate_error(learner, tasks)
    result = {"mse_mean": mean, "ci95": ci}
    if method == "imaml":
        learner.adapt(tasks[0][0], tasks[1][0])
        info = learner.last_info[0]
        result["inner_relative_residual"] = info.forward_residual / max(1.0, info.initial_residual)
    return result, adaptation_curve(learner, CURVE_STEPS, mse, tasks).cpu()


def plot(args, histories, curves, fits, grid, function, support) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    window = max(1, args.steps // 20)
    for method, history in histories.items():
        loss = smooth(history["loss"], window)
        axes[0].plot(np.arange(len(loss)) + window, loss, color=COLORS[method], label=TRAINING_LABELS[method])
    axes[0].set(xlabel="meta-step", ylabel="query MSE (training tasks, moving median)", yscale="log",
                title="Meta-training")
    for method, curve in curves.items():
        axes[1].plot(range(CURVE_STEPS + 1), curve.numpy(), "o-", ms=3, color=COLORS[method], label=LABELS[method])
    axes[1].set(xlabel="adaptation steps (iMAML: iterations of its inner solver)", ylabel="held-out MSE",
                yscale="log", title="Error after k steps of each method's adaptation")
    axes[1].xaxis.get_major_locator().set_params(integer=True)
    axes[2].plot(grid[:, 0], function(grid)[:, 0], "k--", label="true function")
    axes[2].plot(support[0][:, 0], support[1][:, 0], "k^", label=f"{args.k_shot} support points")
    for method, fit in fits.items():
        axes[2].plot(grid[:, 0], fit[:, 0], color=COLORS[method], label=LABELS[method])
    axes[2].set(xlabel="x", ylabel="y", title="One held-out task after adaptation")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, args.out, f"sinusoid_{args.k_shot}shot.png")
    plot_cosine(args.out, histories, f"sinusoid_{args.k_shot}shot_cosine.png")


if __name__ == "__main__":
    main()
