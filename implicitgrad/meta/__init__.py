r"""Gradient-based meta-learning on any ``nn.Module``: iMAML, MAML, FOMAML, Reptile.

Every learner learns an initialisation :math:`\theta` (the model's trainable parameters)
from which a few-shot task adapts, and shares one interface:

* ``meta_step(tasks)``: for a list of ``(x_support, y_support, x_query, y_query)``,
  writes the mean meta-gradient into the ``.grad`` of every meta-parameter (overwriting
  it; all-reduced over processes when ``torch.distributed`` is initialised) and returns
  the mean query loss; follow it with ``optimizer.step()``.
* ``adapt(x_support, y_support)``: the adapted parameters, a dict name → Tensor for
  :meth:`~MetaLearner.predict` or ``torch.func.functional_call``.

.. list-table::
   :header-rows: 1

   * - learner
     - adaptation
     - meta-gradient
   * - :class:`IMAML`
     - argmin of support loss + λ/2‖φ − θ‖², by any solver
     - (I + H/λ)⁻¹∇L_query(φ*) by the implicit function theorem; memory constant in the
       number of inner steps
   * - :class:`MAML`
     - K gradient steps on the support loss
     - exact derivative through the K steps
   * - :class:`FOMAML`
     - K gradient steps on the support loss
     - ∇L_query(φ_K)
   * - :class:`Reptile`
     - K gradient steps on support ∪ query
     - θ − φ̃
   * - :class:`JointTraining`
     - none during training; K steps at test time
     - gradient of the pooled loss at θ (the pretrained baseline)

A meta-batch of tasks with equal shapes runs batched under ``torch.func.vmap`` (one
block-diagonal conjugate-gradient solve for all iMAML tasks at once); models that cannot
be vmapped in their current mode (BatchNorm updating running statistics, active dropout)
run task by task.
"""

from ._base import MetaLearner, vmappable
from .distributed import all_reduce_mean, is_distributed, shard_tasks
from .imaml import IMAML
from .maml import FOMAML, MAML
from .reptile import JointTraining, Reptile

__all__ = [
    "FOMAML",
    "IMAML",
    "JointTraining",
    "MAML",
    "MetaLearner",
    "Reptile",
    "all_reduce_mean",
    "is_distributed",
    "shard_tasks",
    "vmappable",
]
