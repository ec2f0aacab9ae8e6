"""``FactoredSGD``: the torch optimizer that applies the exact factored updates of ``FactoredLinear`` heads."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable

import torch
from torch import nn
from torch.optim import optimizer as torch_optimizer

from .._engine import check_lr, check_scalar
from .distributed import broadcast_state, check_group
from .modules import FactoredLinear

# Options of torch.optim.SGD and others that need a dense per-coordinate state of W, with why they cannot be exact.
_UNSUPPORTED = {
    "momentum": "momentum keeps a dense D x d velocity, which is not of the factored form",
    "dampening": "dampening only matters with momentum, which is not supported",
    "nesterov": "Nesterov momentum keeps a dense D x d velocity, which is not of the factored form",
    "maximize": "maximize is not supported; negate the loss instead",
    "betas": "Adam-style moments are per-coordinate D x d state, which is not of the factored form",
    "eps": "Adam-style normalisation is per coordinate, which is not of the factored form",
}


_EMPTY = ("FactoredSGD got no FactoredLinear head{what}. A FactoredLinear keeps its weights as W = V U + 1 omega^T, "
          "not as nn.Parameters, so head.parameters() is empty and torch optimizers cannot train it: pass "
          "the head itself, FactoredSGD(head, lr=...), or a module containing heads, FactoredSGD(model, lr=...)")


def _heads(params: Any) -> list[FactoredLinear]:
    """The heads in ``params``: a head, a module (every FactoredLinear in it), or an iterable of those."""
    items = [params] if isinstance(params, (nn.Module, torch.Tensor)) else list(params)
    heads: list[FactoredLinear] = []
    for item in items:
        if isinstance(item, FactoredLinear):
            found = [item]
        elif isinstance(item, nn.Module):
            found = [m for m in item.modules() if isinstance(m, FactoredLinear)]
            if not found:
                raise ValueError(f"FactoredSGD got a {type(item).__name__} that contains no FactoredLinear head: "
                                 "give its parameters to a torch optimizer, and the heads to FactoredSGD")
        elif isinstance(item, torch.Tensor):
            raise TypeError(f"FactoredSGD got a tensor ({type(item).__name__} of shape {tuple(item.shape)}), such as "
                            "model.parameters() yields. A FactoredLinear head's weights are not "
                            "parameters: pass the head, FactoredSGD(head, lr=...), or the model, FactoredSGD(model, "
                            "lr=...) trains every FactoredLinear in it; give model.parameters() (the rest of the "
                            "model) to a torch optimizer")
        else:
            raise TypeError(f"FactoredSGD trains FactoredLinear heads only, got {type(item).__name__}: pass heads or "
                            "modules containing them, and give the other parameters of the model to a torch optimizer")
        heads += [head for head in found if all(head is not h for h in heads)]
    if not heads:
        raise ValueError(_EMPTY.format(what=" (an empty list)" if not items else ""))
    return heads


class FactoredSGD(torch.optim.Optimizer):
    """Exact SGD with L2 weight decay for :class:`FactoredLinear` heads: W <- (1 - lr wd) W - lr dL/dW, the rule of
    ``torch.optim.SGD(lr=lr, weight_decay=wd)``, applied in O(m d^2 + nnz d) instead of O(D d).

    Args:
        params: a head, a module (every :class:`FactoredLinear` in it, e.g. the whole model), an iterable of those,
            or an iterable of dicts ``{"params": head(s) or module(s), "lr": ..., "weight_decay": ...}`` (parameter
            groups, as for torch optimizers). Not ``head.parameters()``: a head's weights are not parameters, so
            torch's parameter lists do not contain them (and ``torch.optim.Adam(head.parameters())`` reports an empty
            parameter list); the rest of the model goes to a torch optimizer as usual.
        lr: learning rate (a param-group option: ``torch.optim.lr_scheduler`` works on it).
        weight_decay: L2 penalty (param-group option).
        process_group: a ``torch.distributed`` process group for data-parallel training (the default group is
            ``torch.distributed.group.WORLD``; None: single process). Every ``step()`` all-gathers the recorded
            updates of all ranks of the group (O(m d + nnz) per rank, never the D x d weight) and every rank
            applies the same update, averaged over the ranks as ``DistributedDataParallel`` averages dense
            gradients, so the heads stay bit-identical across ranks. ``step()`` and ``zero_grad()`` are then
            called on every rank; the heads' state is broadcast from the group's first rank once, here (as DDP
            does at construction).

    Each ``backward()`` records its gradient on the heads; ``step()`` applies the sum of all recorded gradients
    (gradient accumulation, exact), and ``zero_grad()`` discards them. Call ``zero_grad()`` after every ``step()``:
    re-applying the previous gradients, as dense SGD would without it, is impossible once the weights moved, so a
    backward or step on uncleared gradients raises. Momentum, Nesterov and Adam-style options need a dense D x d
    state and are refused.
    """

    def __init__(self, params: Any, lr: float, weight_decay: float = 0.0, *, process_group: Any = None,
                 **unsupported: Any) -> None:
        for name in unsupported:
            if name in _UNSUPPORTED and unsupported[name] not in (0, 0.0, False, None):
                raise ValueError(f"FactoredSGD does not support {name}: {_UNSUPPORTED[name]}. Only plain SGD with "
                                 "weight decay keeps the weight factored (exact, O(d^2) per example)")
        unknown = [k for k in unsupported if k not in _UNSUPPORTED]
        if unknown:
            raise TypeError(f"FactoredSGD got unexpected arguments {unknown}; it takes lr, weight_decay and "
                            "process_group")
        if process_group is not None:
            check_group(process_group, "FactoredSGD's process_group")
        self.process_group = process_group
        self._head_of: dict[int, FactoredLinear] = {}
        defaults = {"lr": check_scalar(lr, "lr"), "weight_decay": check_scalar(weight_decay, "weight_decay")}
        if isinstance(params, (nn.Module, torch.Tensor)):
            groups: Iterable[Any] = [{"params": [params]}]
        else:
            groups = list(params)
            if not groups:
                raise ValueError(_EMPTY.format(what=" (an empty parameter list: was it head.parameters()?)"))
            if not isinstance(groups[0], dict):
                groups = [{"params": groups}]
        super().__init__(groups, defaults)  # add_param_group broadcasts the heads' state over process_group

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group ``{"params": head(s) or module(s), "lr": ..., "weight_decay": ...}`` (heads, not tensors)."""
        group = dict(param_group)
        heads = _heads(group["params"])
        for name in ("lr", "weight_decay"):
            if name in group:
                group[name] = check_scalar(group[name], name)
        group_of_ranks = getattr(self, "process_group", None)
        if group_of_ranks is not None and any(_shares_ranks(h, group_of_ranks) for h in heads):
            raise ValueError("FactoredSGD's process_group shares ranks with a head's vocab-parallel group: those ranks "
                             "hold different rows of W, which data parallelism would overwrite with the first rank's; "
                             "give FactoredSGD the data-parallel group (each of its ranks in another vocab-parallel "
                             "group), or none")
        # torch.optim keeps tensors: each head is represented by its V tensor.
        group["params"] = [head.V for head in heads]
        super().add_param_group(group)
        for head in heads:
            self._head_of[id(head.V)] = head
            head._owners.add(self)
        if group_of_ranks is not None:  # data parallel: every rank starts from the first rank's weights
            for head in heads:
                broadcast_state(head._state_tensors(), group_of_ranks)
                head._changed("the broadcast of the first rank's weights")

    def _head(self, V: torch.Tensor) -> FactoredLinear:
        head = self._head_of.get(id(V))
        if head is None or head.V is not V:
            raise RuntimeError("a FactoredLinear head was moved or converted (.to(), .double(), ...) after its "
                               "FactoredSGD was created; create the optimizer after moving the model")
        return head

    def heads(self) -> list[FactoredLinear]:
        """The heads this optimizer trains, in parameter-group order."""
        return [self._head(V) for group in self.param_groups for V in group["params"]]

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Apply every head's recorded gradients with its group's lr and weight_decay (one exact step per head).
        A head whose update is refused (e.g. ``SingularUpdateError``) is left unchanged with its gradients kept.
        With a process group, a collective call: every rank applies the averaged updates of all ranks. Step hooks
        (``register_step_pre_hook`` / ``register_step_post_hook``, global ones too) and the profiler's record work
        as for any torch optimizer."""
        if _wrapper_has_work(self):
            return _STEP_WITH_HOOKS(self) if closure is None else _STEP_WITH_HOOKS(self, closure=closure)
        return self._step(closure)

    # torch.optim.Optimizer wraps step() in a hook-and-profiler layer unless it is marked as wrapped. That layer costs
    # more than a small step itself, so step() takes it (_STEP_WITH_HOOKS) only when it has something to do.
    step.hooked = True  # type: ignore[attr-defined]

    def _step(self, closure: Callable[[], float] | None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # every group's options and heads checked before any head moves: a refused group changes nothing
        steps = [(check_lr(group["lr"], group["weight_decay"]), [self._head(V) for V in group["params"]])
                 for group in self.param_groups]
        for _, heads in steps:
            for head in heads:
                head._check_step()
        for (lr, weight_decay), heads in steps:
            for head in heads:
                head._apply_pending(lr, weight_decay, self.process_group)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Discard the recorded gradients of every head. (The parameters torch.optim sees are the heads' V tensors,
        which never hold a ``.grad``: the gradients are the heads' recorded updates, so ``set_to_none`` changes
        nothing.)"""
        for head in self.heads():  # all found before any is cleared: a moved head raises with nothing changed
            head._discard_pending()


def _shares_ranks(head: FactoredLinear, group: Any) -> bool:
    """True when ``group`` holds another rank of ``head``'s vocab-parallel group besides this one."""
    if head._shard is None:
        return False
    if head._shard.group is group:
        return True
    ranks = torch.distributed.get_process_group_ranks
    return len(set(ranks(head._shard.group)) & set(ranks(group))) > 1


def _step_of(opt: FactoredSGD, closure: Callable[[], float] | None = None) -> float | None:
    return opt._step(closure)


_STEP_WITH_HOOKS = torch.optim.Optimizer.profile_hook_step(_step_of)


def _wrapper_has_work(opt: FactoredSGD) -> bool:
    """True when torch's step wrapper would do something: step hooks (the optimizer's own or global ones) or the
    autograd profiler recording (any doubt, e.g. a torch without these attributes, answers True)."""
    return bool(getattr(opt, "_optimizer_step_pre_hooks", True) or getattr(opt, "_optimizer_step_post_hooks", True)
                or getattr(torch_optimizer, "_global_optimizer_pre_hooks", True)
                or getattr(torch_optimizer, "_global_optimizer_post_hooks", True)
                or torch.autograd._profiler_enabled())
