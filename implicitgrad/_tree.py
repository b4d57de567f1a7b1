"""Pytree helpers: the one module through which the library flattens pytrees.

The flattening is ``torch.func``'s own (reached through :mod:`implicitgrad._compat`), so
a pytree means the same here as under ``torch.func.vmap`` / ``grad``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ._compat import pytree

TreeSpec = pytree.TreeSpec


def _node_registry() -> Optional[Tuple[Callable[[Any], Any], Dict[Any, Any], TreeSpec]]:
    """What :func:`tree_flatten` reads of ``torch.utils._pytree``: how a node's type is
    told, the registered node types and the leaf spec; ``None`` if this version of PyTorch
    names them otherwise."""
    node_type, nodes = getattr(pytree, "_get_node_type", None), getattr(pytree, "SUPPORTED_NODES", None)
    if not callable(node_type) or not isinstance(nodes, dict):
        return None
    return node_type, nodes, pytree.tree_flatten(0)[1]


_REGISTRY = _node_registry()


def tree_flatten(tree: Any) -> Tuple[List[Any], TreeSpec]:
    """``torch.utils._pytree.tree_flatten``, the same leaves and spec, without its nested
    recursive function: that closure refers to itself, so every call left a reference
    cycle for the garbage collector (whose full collections then cost about 0.1 ms per
    call of an implicit solve)."""
    if _REGISTRY is None:
        return pytree.tree_flatten(tree)
    leaves: List[Any] = []
    return leaves, _flatten(tree, leaves, *_REGISTRY)


def _flatten(node: Any, leaves: List[Any], node_type: Callable[[Any], Any], nodes: Dict[Any, Any],
             leaf: TreeSpec) -> TreeSpec:
    kind = node_type(node)
    entry = nodes.get(kind)
    if entry is None:  # a leaf: any type not registered as a node
        leaves.append(node)
        return leaf
    children, context = entry.flatten_fn(node)
    return TreeSpec(kind, context, [_flatten(child, leaves, node_type, nodes, leaf) for child in children])


def tree_unflatten(leaves: List[Any], spec: TreeSpec) -> Any:
    return pytree.tree_unflatten(leaves, spec)


def unflattener(spec: TreeSpec) -> Callable[[Sequence[Any]], Any]:
    """``leaves ↦ tree_unflatten(leaves, spec)`` for many calls with one ``spec``: the
    walk of the spec is done once, here, and each call only rebuilds the containers (the
    leaves' count is not checked again: the callers pass ``spec.num_leaves`` of them)."""
    if _REGISTRY is None:
        return lambda leaves: pytree.tree_unflatten(list(leaves), spec)
    if spec.is_leaf():
        return _first
    build = _builder(spec, _REGISTRY[1])
    return lambda leaves: build(iter(leaves))


def _first(leaves: Sequence[Any]) -> Any:
    return leaves[0]


def _builder(spec: TreeSpec, nodes: Dict[Any, Any]) -> Callable[[Iterator[Any]], Any]:
    if spec.is_leaf():
        return next
    children = [_builder(spec.child(i), nodes) for i in range(spec.num_children)]
    rebuild, context = nodes[spec.type].unflatten_fn, spec.context
    return lambda it: rebuild([child(it) for child in children], context)


def tree_leaf_names(tree: Any, prefix: str = "") -> List[str]:
    """A readable path per leaf, e.g. ``prefix[0]['w']``."""
    with_path, _ = pytree.tree_flatten_with_path(tree)
    return [f"{prefix}{pytree.keystr(path)}" for path, _ in with_path]


def is_float_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())


def describe(spec: TreeSpec, leaves: List[Any]) -> str:
    """A short readable summary of a pytree's structure and leaf shapes."""
    shapes = [
        tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in leaves
    ]
    return f"{spec} with leaves {shapes}"
