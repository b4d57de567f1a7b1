"""Reptile, and the non-meta-learning baseline trained jointly on all tasks."""

from __future__ import annotations

import torch

from ._base import GradientStepLearner, linear_surrogate

__all__ = ["JointTraining", "Reptile"]


class Reptile(GradientStepLearner):
    r"""Reptile: move the initialisation towards the parameters adapted to each task.

    A task runs ``inner_steps`` = :math:`K` full-batch gradient steps of size ``inner_lr``
    from :math:`\theta` on the loss of *all* its examples (support ∪ query), giving
    :math:`\tilde\phi`; the meta-gradient is

    .. math::

        g = \theta - \tilde\phi ,

    so ``torch.optim.SGD(lr=ε)`` applied to it is the Reptile update
    :math:`\theta \leftarrow \theta + \varepsilon(\tilde\phi - \theta)`, and any other
    ``torch.optim`` optimizer applies it as well. No second derivative is computed.
    :meth:`adapt` runs the same :math:`K` steps on the support set only. The loss returned
    by :meth:`meta_step` is the query loss at :math:`\tilde\phi`, which has been trained on
    the query set too (a training loss, lower than a held-out one).

    Args:
        model: the ``nn.Module`` whose trainable parameters are :math:`\theta`.
        loss_fn: ``loss_fn(output, target) -> scalar``, mean-reduced.
        inner_lr: inner step size, positive.
        inner_steps: :math:`K \ge 0`.
        batched, all_reduce, process_group: see :class:`MetaLearner`.

    Example:
        >>> import torch
        >>> from implicitgrad import meta
        >>> model = torch.nn.Linear(2, 1)
        >>> reptile = meta.Reptile(model, torch.nn.functional.mse_loss, inner_lr=0.1, inner_steps=5)
        >>> task = (torch.randn(5, 2), torch.randn(5, 1), torch.randn(5, 2), torch.randn(5, 1))
        >>> before = model.weight.detach().clone()
        >>> loss = reptile.meta_step([task])
        >>> adapted = reptile.adapt(torch.cat([task[0], task[2]]), torch.cat([task[1], task[3]]))
        >>> torch.allclose(model.weight.grad, before - adapted["weight"])
        True

    References:
        Nichol et al., On First-Order Meta-Learning Algorithms, 2018.
    """

    def _task_terms(self, meta, context, x_s, y_s, x_q, y_q):
        theta = {k: v.detach() for k, v in self._trainable(meta).items()}
        phi = self._descend(theta, context, torch.cat([x_s, x_q]), torch.cat([y_s, y_q]),
                            self.inner_lr, self.inner_steps)
        phi = {k: v.detach() for k, v in phi.items()}
        loss = self._loss(phi, context, x_q, y_q)
        return linear_surrogate(meta, {k: theta[k] - phi[k] for k in theta}), loss.detach()


class JointTraining(GradientStepLearner):
    r"""The baseline without meta-learning: pretrain on all the tasks' data, fine-tune at test time.

    :meth:`meta_step` writes the gradient of the loss of :math:`\theta` itself on the
    pooled examples of each task (support ∪ query, averaged over tasks) — ordinary
    training on the union of the tasks, with no adaptation in the loop — and returns the
    query loss of :math:`\theta` before adaptation. :meth:`adapt` fine-tunes by
    ``inner_steps`` gradient steps of size ``inner_lr`` on the support set, like the
    other learners, so the comparison isolates what meta-learning adds. This is the
    "pretrained" baseline of Finn et al. (2017).

    Arguments as :class:`Reptile`.

    Example:
        >>> import torch
        >>> from implicitgrad import meta
        >>> model = torch.nn.Linear(2, 1)
        >>> joint = meta.JointTraining(model, torch.nn.functional.mse_loss, inner_lr=0.1, inner_steps=5)
        >>> task = (torch.randn(5, 2), torch.randn(5, 1), torch.randn(5, 2), torch.randn(5, 1))
        >>> loss = joint.meta_step([task])
        >>> model.weight.grad.shape
        torch.Size([1, 2])

    References:
        Finn et al., Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks, 2017.
    """

    def _task_terms(self, meta, context, x_s, y_s, x_q, y_q):
        theta = self._trainable(meta)
        pooled = self._loss(theta, context, torch.cat([x_s, x_q]), torch.cat([y_s, y_q]))
        query = self._loss(theta, context, x_q, y_q)
        return pooled, query.detach()
