"""What every meta-learner shares: functional calls of the model, batching over tasks, ``.grad``.

A meta-learner holds an ``nn.Module`` whose parameters θ are the meta-parameters (the
initialisation every task adapts from). The model is only ever called functionally,
``torch.func.functional_call(model, (φ, frozen, buffers), (x,))``, so any module works and
adapted parameters φ are plain dicts ``name → Tensor``. A subclass supplies two per-task
rules, written for one task and run either for all tasks at once under
``torch.func.vmap`` or task by task:

* ``_task_terms(meta, context, x_s, y_s, x_q, y_q) -> (surrogate, query_loss)`` where
  the gradient of ``surrogate`` with respect to the meta-parameters is the task's
  meta-gradient;
* ``_adapt(meta, context, x_s, y_s) -> φ``.

``meta`` maps names to meta-parameters, ``context`` holds the frozen parameters and the
buffer copies of the step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, cast

import torch
from torch import nn

from .distributed import all_reduce_mean

Tensor = torch.Tensor
Task = Tuple[Tensor, Tensor, Tensor, Tensor]
Params = Dict[str, Tensor]

__all__ = ["MetaLearner"]


class MetaLearner:
    """Base class of :class:`IMAML`, :class:`MAML`, :class:`FOMAML`, :class:`Reptile`, :class:`JointTraining`.

    Subclasses implement the adaptation and the per-task meta-gradient; this class runs
    them over a meta-batch, averages, all-reduces across processes and writes ``.grad``.

    Args:
        model: any ``nn.Module``; its parameters that require grad are the meta-parameters
            θ and the parameters a task adapts; the others stay fixed and are passed
            through.
        loss_fn: ``loss_fn(model_output, target) -> scalar Tensor``, e.g.
            ``torch.nn.functional.mse_loss`` or ``cross_entropy`` (mean-reduced, so that
            step sizes do not depend on the number of examples).
        batched: run the tasks of a meta-batch at once with ``torch.func.vmap``
            (``True``), one after the other (``False``), or decide per call (``None``):
            batched when the tasks have equal shapes and the model holds no module that
            cannot be vmapped correctly in its current mode (see :func:`vmappable`:
            BatchNorm updating running statistics, active dropout, and for second-order
            MAML also LayerNorm and batch-statistics BatchNorm).
        all_reduce: when ``torch.distributed`` is initialised, average the meta-gradient
            and the loss over the processes of ``process_group`` in :meth:`meta_step`.
        process_group: the group to all-reduce over; ``None`` is the default group.

    Buffers (e.g. BatchNorm running statistics) are passed to every functional call as
    copies made once per call of :meth:`meta_step` or :meth:`adapt`: the module's own
    buffers are never modified. A BatchNorm layer in training mode normalises with the
    statistics of the batch it sees (the support set in the inner loop, the query set in
    the outer loss) — the transductive convention of the MAML reference code; in eval mode
    it uses the running statistics as they are.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        *,
        batched: Optional[bool] = None,
        all_reduce: bool = True,
        process_group: Any = None,
    ) -> None:
        name = type(self).__name__
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name}: model must be a torch.nn.Module, got {type(model).__name__}.")
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(
                f"{name}: the model has no parameter that requires grad, so there is nothing to "
                "meta-learn. Leave at least one parameter trainable."
            )
        if not callable(loss_fn):
            raise TypeError(f"{name}: loss_fn must be callable as loss_fn(output, target) -> scalar Tensor.")
        if batched not in (None, True, False):
            raise ValueError(f"{name}: batched must be None (automatic), True or False, got {batched!r}.")
        self.model = model
        self.loss_fn = loss_fn
        self.batched = batched
        self.all_reduce = bool(all_reduce)
        self.process_group = process_group

    # ------------------------------------------------------------------ public interface
    def meta_step(self, tasks: Sequence[Task]) -> Tensor:
        """Writes the mean meta-gradient over ``tasks`` into ``.grad`` and returns the mean query loss.

        ``.grad`` of every meta-parameter (see :meth:`named_meta_parameters`) is
        *overwritten*, not accumulated: call ``optimizer.step()`` right after, without
        ``zero_grad()``. When ``torch.distributed`` is initialised (and ``all_reduce``),
        each process passes its own shard of the meta-batch and all processes receive the
        mean over every task of every process (weighted by the number of tasks per
        process), so they take identical optimizer steps.

        Args:
            tasks: a non-empty sequence of ``(x_support, y_support, x_query, y_query)``.

        Returns:
            The mean query loss after adaptation, a detached 0-d tensor (global mean when
            all-reduced).
        """
        grads, loss = self.meta_gradient(tasks)
        names = list(grads)
        values = [grads[n] for n in names]
        if self.all_reduce:
            values, loss = all_reduce_mean(values, loss, len(tasks), self.process_group)
        meta = dict(self.named_meta_parameters())
        for name, value in zip(names, values):
            meta[name].grad = value.detach()
        return loss.detach()

    def meta_gradient(self, tasks: Sequence[Task]) -> Tuple[Params, Tensor]:
        """The mean meta-gradient and query loss over ``tasks`` of this process only.

        Nothing is written into ``.grad`` and nothing is all-reduced (see
        :meth:`meta_step`).

        Args:
            tasks: a non-empty sequence of ``(x_support, y_support, x_query, y_query)``.

        Returns:
            ``(grads, loss)``: a dict ``name → Tensor`` keyed like
            :meth:`named_meta_parameters`, and the mean query loss (detached, 0-d).
        """
        tasks = _check_tasks(tasks, type(self).__name__)
        meta = dict(self.named_meta_parameters())
        context = self._context()
        batched = self._use_vmap(tasks)
        with torch.enable_grad():
            if batched:
                stacked = [torch.stack(parts) for parts in zip(*tasks)]

                def one(x_s, y_s, x_q, y_q):
                    return self._task_terms(meta, context, x_s, y_s, x_q, y_q)

                surrogates, losses = torch.func.vmap(one)(*stacked)
            else:
                terms = [self._task_terms(meta, context, *task) for task in tasks]
                surrogates = torch.stack([t[0] for t in terms])
                losses = torch.stack([t[1] for t in terms])
            names = list(meta)
            values = torch.autograd.grad(
                surrogates.mean(), [meta[n] for n in names], allow_unused=True, materialize_grads=True
            )
        return dict(zip(names, values)), losses.detach().mean()

    def adapt(self, x_support: Tensor, y_support: Tensor) -> Params:
        """Adapts the meta-parameters to one task's support set.

        Differentiable with respect to the meta-parameters when autograd is recording
        (call under ``torch.no_grad()`` for evaluation), and usable under
        ``torch.func.vmap`` to adapt to a batch of tasks at once.

        Args:
            x_support: support inputs, first dimension the examples.
            y_support: support targets.

        Returns:
            The adapted parameters, a dict ``name → Tensor`` over every parameter of the
            model (the frozen ones unchanged): pass it to :meth:`predict` or to
            ``torch.func.functional_call(model, params, x)``.
        """
        meta = dict(self.named_meta_parameters())
        adapted = self._adapt(meta, self._context(), x_support, y_support)
        return {**self._frozen(), **adapted}

    def adaptation_loss(self, params: Params, x_support: Tensor, y_support: Tensor) -> Tensor:
        """The objective :meth:`adapt` minimises over ``params``: the support loss.

        :class:`IMAML` adds its proximal term. Handy to trace an adaptation step by step.
        """
        return self._loss(params, self._context(), x_support, y_support)

    def predict(self, params: Params, x: Tensor) -> Tensor:
        """The model's output on ``x`` with parameters ``params`` (e.g. from :meth:`adapt`).

        Parameters missing from ``params`` take the model's values.
        """
        return self._forward(params, self._context(), x)

    def named_meta_parameters(self) -> Iterator[Tuple[str, Tensor]]:
        """``(name, tensor)`` of every meta-parameter: the model's trainable parameters."""
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                yield name, p

    def meta_parameters(self) -> Iterator[Tensor]:
        """The meta-parameters, e.g. for ``torch.optim.Adam(learner.meta_parameters())``."""
        for _, p in self.named_meta_parameters():
            yield p

    def state_dict(self) -> Dict[str, Any]:
        """State of the learner beyond the model (empty here; learnable λ for IMAML)."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores :meth:`state_dict`."""
        if state:
            raise ValueError(f"{type(self).__name__} has no state beyond the model; got keys {sorted(state)}.")

    # ------------------------------------------------------------------ for subclasses
    def _task_terms(self, meta: Params, context: Params, x_s, y_s, x_q, y_q) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _adapt(self, meta: Params, context: Params, x_s, y_s) -> Params:
        raise NotImplementedError

    def _trainable(self, meta: Params) -> Params:
        """The model's parameters among ``meta`` (subclasses may add other meta-parameters)."""
        names = {name for name, p in self.model.named_parameters() if p.requires_grad}
        return {k: v for k, v in meta.items() if k in names}

    def _frozen(self) -> Params:
        return {n: p for n, p in self.model.named_parameters() if not p.requires_grad}

    def _context(self) -> Params:
        """Frozen parameters and copies of the buffers, shared by the calls of one step."""
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}
        return {**self._frozen(), **buffers}

    def _forward(self, params: Params, context: Params, x: Tensor) -> Tensor:
        merged = {**context, **params}
        return torch.func.functional_call(self.model, merged, (x,))

    def _loss(self, params: Params, context: Params, x: Tensor, y: Tensor) -> Tensor:
        return self.loss_fn(self._forward(params, context, x), y)

    def _descend(self, params: Params, context: Params, x: Tensor, y: Tensor, lr: float, steps: int) -> Params:
        """``steps`` of gradient descent on the loss of ``(x, y)``, differentiable through the steps."""
        # The context is an argument, not a capture: BatchNorm may update its buffer copies in place.
        grad = torch.func.grad(lambda p, c: self._loss(p, c, x, y))
        for _ in range(steps):
            g = grad(params, context)
            params = {k: v - lr * g[k] for k, v in params.items()}
        return params

    def _use_vmap(self, tasks: List[Task]) -> bool:
        same = all(
            tuple(a.shape) == tuple(b.shape) and a.dtype == b.dtype
            for task in tasks[1:]
            for a, b in zip(task, tasks[0])
        )
        if self.batched is False:
            return False
        possible = vmappable(self.model, self._differentiates_gradients)
        if self.batched is True:
            if not same:
                raise ValueError(
                    f"{type(self).__name__}(batched=True) stacks the tasks of a meta-batch, but their "
                    "shapes differ. Give every task the same number of examples, or pass batched=None."
                )
            if not possible:
                raise ValueError(
                    f"{type(self).__name__}(batched=True): this model cannot run correctly under "
                    "torch.func.vmap in its current mode (see ig.meta.vmappable). Pass batched=None to "
                    "run its tasks one by one."
                )
            return True
        return same and len(tasks) > 1 and possible

    @property
    def _differentiates_gradients(self) -> bool:
        """Whether the meta-gradient differentiates inner gradients taken under ``vmap`` (MAML)."""
        return False


class GradientStepLearner(MetaLearner):
    """A learner whose adaptation is ``inner_steps`` gradient steps of size ``inner_lr`` on the support loss."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        inner_lr: float,
        inner_steps: int,
        *,
        batched: Optional[bool] = None,
        all_reduce: bool = True,
        process_group: Any = None,
    ) -> None:
        super().__init__(model, loss_fn, batched=batched, all_reduce=all_reduce, process_group=process_group)
        owner = type(self).__name__
        if isinstance(inner_lr, bool) or not isinstance(inner_lr, (int, float)) or not (
            math.isfinite(inner_lr) and inner_lr > 0
        ):
            raise ValueError(f"{owner}: inner_lr must be a positive number, got {inner_lr!r}.")
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 0:
            raise ValueError(f"{owner}: inner_steps must be a non-negative integer, got {inner_steps!r}.")
        self.inner_lr = float(inner_lr)
        self.inner_steps = inner_steps

    def __repr__(self) -> str:
        return f"{type(self).__name__}(inner_lr={self.inner_lr}, inner_steps={self.inner_steps})"

    def _adapt(self, meta, context, x_s, y_s):
        theta = self._trainable(meta)
        return self._descend(theta, context, x_s, y_s, self.inner_lr, self.inner_steps)


# The public classes that normalise by batch statistics and the ones that drop at random.
_NORMS = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
    nn.LazyInstanceNorm1d, nn.LazyInstanceNorm2d, nn.LazyInstanceNorm3d,
)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def vmappable(model: nn.Module, second_order: bool = False) -> bool:
    """Whether the model's forward can run under ``torch.func.vmap`` in its current mode.

    Not with BatchNorm / InstanceNorm updating running statistics in place (training mode
    with ``track_running_stats=True``; build them with ``track_running_stats=False``, or
    see ``torch.func.replace_all_batch_norm_modules_``), nor with active dropout, whose
    random masks ``vmap`` refuses by default.

    With ``second_order`` (differentiating a gradient taken inside ``vmap``, as MAML does),
    also not with LayerNorm, nor with BatchNorm or InstanceNorm normalising by the
    statistics of their input: the batching rules of their backward passes give wrong second derivatives
    in PyTorch (pytorch/functorch issue 534), so such models run task by task.

    Args:
        model: the module.
        second_order: whether gradients of gradients are taken under ``vmap``.

    Returns:
        ``True`` if every task of a meta-batch can run in one vmapped call.
    """
    for module in model.modules():
        if second_order and isinstance(module, nn.LayerNorm):
            return False
        if isinstance(module, _NORMS):
            tracking = module.running_mean is not None
            if module.training and tracking:
                return False
            if second_order and (module.training or not tracking):
                return False
        if isinstance(module, _DROPOUTS) and module.training and module.p > 0:
            return False
    return True


def linear_surrogate(meta: Params, direction: Params) -> Tensor:
    """``Σ ⟨θ, d⟩`` with ``d`` detached: its gradient with respect to θ is exactly ``d``."""
    return cast(Tensor, sum((meta[k] * d.detach()).sum() for k, d in direction.items()))


def _check_tasks(tasks: Any, owner: str) -> List[Task]:
    if isinstance(tasks, torch.Tensor) or not isinstance(tasks, Sequence) or len(tasks) == 0:
        raise TypeError(
            f"{owner}: tasks must be a non-empty list of (x_support, y_support, x_query, y_query) "
            f"tuples, got {type(tasks).__name__}."
        )
    out = []
    for i, task in enumerate(tasks):
        if not isinstance(task, Sequence) or len(task) != 4 or not all(isinstance(t, torch.Tensor) for t in task):
            raise TypeError(
                f"{owner}: task {i} must be a tuple of 4 Tensors (x_support, y_support, x_query, y_query)."
            )
        x_s, y_s, x_q, y_q = task
        for what, x, y in (("support", x_s, y_s), ("query", x_q, y_q)):
            if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"{owner}: task {i} has {what} inputs of shape {tuple(x.shape)} and targets of shape "
                    f"{tuple(y.shape)}; both need the examples along dimension 0, in equal numbers."
                )
        out.append(tuple(task))
    return out
