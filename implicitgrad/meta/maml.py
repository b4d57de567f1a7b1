"""MAML (second order, through the inner steps) and its first-order approximation FOMAML."""

from __future__ import annotations

import torch

from ._base import GradientStepLearner, linear_surrogate

__all__ = ["FOMAML", "MAML"]


class MAML(GradientStepLearner):
    r"""Model-agnostic meta-learning, differentiated through the inner gradient steps.

    A task adapts :math:`\theta` by ``inner_steps`` = :math:`K` steps of gradient descent
    on the support loss, :math:`\phi_0 = \theta`,
    :math:`\phi_{k+1} = \phi_k - \alpha \nabla \mathcal{L}_{\text{support}}(\phi_k)`, and
    the meta-gradient is the exact derivative of the query loss through those steps,

    .. math::

        \frac{d\, \mathcal{L}_{\text{query}}(\phi_K)}{d\theta} =
        \prod_{k=0}^{K-1} \big(I - \alpha \nabla^2 \mathcal{L}_{\text{support}}(\phi_k)\big)
        \, \nabla \mathcal{L}_{\text{query}}(\phi_K)

    (the product ordered from :math:`k = 0` on the left), computed by automatic
    differentiation of the unrolled loop (``torch.func.grad`` inside, so it runs under
    ``torch.func.vmap`` over tasks). Memory grows linearly with :math:`K`.

    Args:
        model: the ``nn.Module`` whose trainable parameters are :math:`\theta`.
        loss_fn: ``loss_fn(output, target) -> scalar``, mean-reduced.
        inner_lr: the inner step size :math:`\alpha > 0`.
        inner_steps: :math:`K \ge 0` (0: no adaptation, the meta-gradient is
            :math:`\nabla \mathcal{L}_{\text{query}}(\theta)`).
        batched, all_reduce, process_group: see :class:`MetaLearner`.

    Raises:
        ValueError: a non-positive ``inner_lr`` or negative ``inner_steps``.

    Example:
        >>> import torch
        >>> from implicitgrad import meta
        >>> model = torch.nn.Linear(2, 1)
        >>> maml = meta.MAML(model, torch.nn.functional.mse_loss, inner_lr=0.1, inner_steps=3)
        >>> task = (torch.randn(5, 2), torch.randn(5, 1), torch.randn(5, 2), torch.randn(5, 1))
        >>> loss = maml.meta_step([task, task])
        >>> model.weight.grad.shape
        torch.Size([1, 2])

    References:
        Finn et al., Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks, 2017.
    """

    first_order = False

    @property
    def _differentiates_gradients(self) -> bool:
        return not self.first_order

    def _task_terms(self, meta, context, x_s, y_s, x_q, y_q):
        if not self.first_order:
            phi = self._adapt(meta, context, x_s, y_s)
            loss = self._loss(phi, context, x_q, y_q)
            return loss, loss
        theta = {k: v.detach() for k, v in self._trainable(meta).items()}
        phi = self._descend(theta, context, x_s, y_s, self.inner_lr, self.inner_steps)
        grad, loss = torch.func.grad_and_value(lambda p, c: self._loss(p, c, x_q, y_q))(phi, context)
        return linear_surrogate(meta, grad), loss


class FOMAML(MAML):
    r"""First-order MAML: the query gradient at the adapted parameters, the Jacobian taken as I.

    Adaptation as :class:`MAML`; the meta-gradient drops the second-order terms,

    .. math::

        g = \nabla \mathcal{L}_{\text{query}}(\phi_K), \qquad \text{i.e. }
        \frac{d\phi_K}{d\theta} \approx I ,

    so no Hessian-vector product is computed and the inner loop keeps no graph. Arguments
    as :class:`MAML`.

    Example:
        >>> import torch
        >>> from implicitgrad import meta
        >>> model = torch.nn.Linear(2, 1)
        >>> fomaml = meta.FOMAML(model, torch.nn.functional.mse_loss, inner_lr=0.1, inner_steps=3)
        >>> task = (torch.randn(5, 2), torch.randn(5, 1), torch.randn(5, 2), torch.randn(5, 1))
        >>> loss = fomaml.meta_step([task])
        >>> model.bias.grad.shape
        torch.Size([1])

    References:
        Finn et al., Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks, 2017.
        Nichol et al., On First-Order Meta-Learning Algorithms, 2018.
    """

    first_order = True
