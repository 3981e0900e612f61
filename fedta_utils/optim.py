"""SparseSGDM: SGD with momentum that never moves frozen entries.

Sparse fine-tuning (task-arithmetic style: train only the entries a mask
selects, e.g. the least sensitive ones) needs an optimizer under which a frozen
entry stays *exactly* at its pre-trained value: no gradient step, no weight
decay, no momentum leaking into it. Masking the gradient alone is not enough
(weight decay and momentum buffers would still move frozen weights), and
restoring weights after each step costs a copy of the model. SparseSGDM masks
the update direction inside the SGD recurrence instead, and for the trainable
entries performs the very same floating-point operations as
``torch.optim.SGD`` (an all-ones mask gives bit-identical results).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim.sgd import sgd as _functional_sgd

try:  # private helpers of torch.optim: reuse them so the choices match SGD's exactly
    from torch.optim.optimizer import _default_to_fused_or_foreach, _use_grad_for_differentiable
except ImportError:  # pragma: no cover - other torch versions

    def _default_to_fused_or_foreach(params, differentiable, use_fused=False):
        foreach = not differentiable and all(
            p is None or (type(p) in (Tensor, torch.nn.Parameter) and p.is_cuda) for p in params
        )
        return False, foreach

    def _use_grad_for_differentiable(func):
        return torch.no_grad()(func)

__all__ = ["SparseSGDM", "count_trainable"]


def _flat_params(param_groups: Sequence[dict[str, Any]]) -> list[Tensor]:
    return [p for group in param_groups for p in group["params"]]


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def _validate_masks(masks: Iterable[Tensor | None] | None, params: Sequence[Tensor]) -> list[Tensor | None]:
    """Check `masks` against `params` and return them as bool tensors on each parameter's device.

    Every check runs before anything is converted, so a bad list changes nothing.
    """
    if masks is None:
        return [None] * len(params)
    if isinstance(masks, Tensor):
        raise TypeError("masks must be a list with one tensor (or None) per parameter, not a single tensor")
    masks = list(masks)
    if len(masks) != len(params):
        raise ValueError(
            f"masks has {len(masks)} entries but the optimizer has {len(params)} parameters; "
            f"expected {len(params)} (one per parameter, in param-group order, None for a dense one)"
        )
    for i, (m, p) in enumerate(zip(masks, params)):
        if m is None:
            continue
        if not isinstance(m, Tensor):
            raise TypeError(f"masks[{i}] must be a tensor or None, got {type(m).__name__}")
        if m.shape != p.shape:
            raise ValueError(f"masks[{i}] has shape {_shape(m)} but its parameter has shape {_shape(p)}")
        if m.dtype != torch.bool:
            # One host sync per mask, at configuration time only (never in step()).
            binary = (m == 0) | (m == 1)
            if not bool(binary.all()):
                bad = m[~binary].flatten()[0].item()
                raise ValueError(
                    f"masks[{i}] (parameter shape {_shape(p)}) must contain only 0 and 1 "
                    f"(1 = trainable, 0 = frozen); found {bad!r}"
                )
    return [
        None if m is None else m.detach().to(device=p.device, dtype=torch.bool, copy=True)
        for m, p in zip(masks, params)
    ]


def count_trainable(masks: Iterable[Tensor | None] | None, params: Iterable[Tensor]) -> int:
    """Number of parameter entries that can move under `masks` (1 = trainable, None = dense).

    `masks` is validated like SparseSGDM's. Synchronises with the device (returns a Python int).
    """
    params = list(params)
    checked = _validate_masks(masks, params)
    total = 0
    for m, p in zip(checked, params):
        total += p.numel() if m is None else int(m.sum().item())
    return total


class SparseSGDM(torch.optim.SGD):
    """``torch.optim.SGD`` (momentum, dampening, Nesterov, weight decay, maximize) with per-entry masks.

    ``masks`` is a list aligned with the flattened parameters of ``params``
    (param groups in order, one entry per parameter): a tensor shaped like its
    parameter (bool or 0/1 numbers; stored as bool on the parameter's device),
    or None for a dense parameter. ``masks=None`` means all dense.
    Convention: 1 = the entry is updated, 0 = the entry is frozen.

    A frozen entry never moves: its update direction is set to exactly 0
    before the momentum recurrence, so its momentum buffer entry stays 0 and
    ``param - lr * 0`` is ``param`` bit for bit. Weight decay is masked too,
    because a frozen weight must not shrink towards 0 either. Trainable entries
    follow the documented SGD pseudo-code with the same floating-point
    operations as ``torch.optim.SGD`` (same ``foreach`` setting), so all-ones
    masks are bit-identical to SGD. Non-finite gradients at frozen entries do
    not leak into them (the direction is selected with ``torch.where``, not
    multiplied by the mask).

    Masks live in the optimizer state (``state[p]["mask"]``), so
    ``state_dict()`` / ``load_state_dict()`` carry them: an optimizer built
    with ``masks=None`` continues exactly after loading a saved state.
    ``fused=True`` is not supported; ``foreach`` True/False/None is, as in SGD.
    The plain ``GradScaler`` path (unscale, then ``step()``) works.
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        masks: Sequence[Tensor | None] | None = None,
        fused: bool | None = None,
    ) -> None:
        if fused:
            raise ValueError("SparseSGDM does not support fused=True; use foreach=True (or None) instead")
        super().__init__(
            params,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=False,
            fused=None,
        )
        self.set_masks(masks)

    # ------------------------------------------------------------------ masks
    def set_masks(self, masks: Sequence[Tensor | None] | None) -> None:
        """Replace all masks (same alignment and validation as the constructor).

        Momentum buffer entries of newly frozen positions are zeroed, so they
        stop moving from the next step on.
        """
        params = _flat_params(self.param_groups)
        checked = _validate_masks(masks, params)
        for p, m in zip(params, checked):
            if m is None:
                if p in self.state:
                    self.state[p].pop("mask", None)
                continue
            state = self.state[p]
            state["mask"] = m
            buf = state.get("momentum_buffer")
            if buf is not None:
                buf.masked_fill_(m.logical_not(), 0)

    def get_masks(self) -> list[Tensor | None]:
        """Copies of the masks (bool), aligned with the flattened parameters; None = dense."""
        out: list[Tensor | None] = []
        for p in _flat_params(self.param_groups):
            m = self.state.get(p, {}).get("mask")
            out.append(None if m is None else m.clone())
        return out

    @property
    def masks(self) -> list[Tensor | None]:
        """Same as :meth:`get_masks`."""
        return self.get_masks()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by ``state_dict()``, masks included (they replace the current ones)."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            if group.get("fused"):
                group["fused"] = None  # e.g. a fused SGD's state: fall back to foreach/for-loop selection
        # Optimizer.load_state_dict casts state tensors to the parameter's dtype: masks back to bool.
        for p in _flat_params(self.param_groups):
            state = self.state.get(p)
            if not state or state.get("mask") is None:
                continue
            m = state["mask"]
            if m.shape != p.shape:
                raise ValueError(
                    f"loaded mask has shape {_shape(m)} but its parameter has shape {_shape(p)}"
                )
            m = m.to(device=p.device, dtype=torch.bool)
            state["mask"] = m
            buf = state.get("momentum_buffer")
            if buf is not None:
                buf.masked_fill_(m.logical_not(), 0)

    # ------------------------------------------------------------------- step
    @_use_grad_for_differentiable
    def step(self, closure=None):
        """Perform a single optimization step (see the class docstring for the masking)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            momentum = group["momentum"]
            weight_decay = group["weight_decay"]
            maximize = group["maximize"]

            dense_params: list[Tensor] = []
            dense_grads: list[Tensor] = []
            dense_bufs: list[Tensor | None] = []
            has_sparse_grad = False
            masked_params: list[Tensor] = []
            masked_grads: list[Tensor] = []
            masked_bufs: list[Tensor | None] = []
            masks: list[Tensor] = []

            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state.get(p)
                mask = None if state is None else state.get("mask")
                if mask is None:
                    dense_params.append(p)
                    dense_grads.append(p.grad)
                    if p.grad.is_sparse:
                        has_sparse_grad = True
                    if momentum != 0:
                        dense_bufs.append(self.state[p].get("momentum_buffer"))
                else:
                    if p.grad.is_sparse:
                        raise RuntimeError(
                            f"SparseSGDM: a masked parameter of shape {_shape(p)} has a sparse gradient, "
                            "which masks do not support"
                        )
                    masked_params.append(p)
                    masked_grads.append(p.grad)
                    masks.append(mask)
                    if momentum != 0:
                        masked_bufs.append(state.get("momentum_buffer"))

            if not dense_params and not masked_params:
                continue

            # The same implementation choice torch.optim.sgd.sgd makes for the whole group.
            foreach = group["foreach"]
            if foreach is None and group.get("fused") is None:
                _, foreach = _default_to_fused_or_foreach(
                    dense_params + masked_params, differentiable=False, use_fused=False
                )
            foreach = bool(foreach)

            common = dict(
                momentum=momentum,
                lr=group["lr"],
                dampening=group["dampening"],
                nesterov=group["nesterov"],
                foreach=foreach,
                fused=False,
            )
            if dense_params:
                _functional_sgd(
                    dense_params,
                    dense_grads,
                    dense_bufs,
                    has_sparse_grad=has_sparse_grad,
                    weight_decay=weight_decay,
                    maximize=maximize,
                    **common,
                )
            if masked_params:
                directions = _masked_directions(
                    masked_params,
                    masked_grads,
                    masks,
                    weight_decay=weight_decay,
                    maximize=maximize,
                    foreach=foreach,
                )
                # Sign and weight decay are already in `directions`, in SGD's own rounding.
                _functional_sgd(
                    masked_params,
                    directions,
                    masked_bufs,
                    has_sparse_grad=False,
                    weight_decay=0.0,
                    maximize=False,
                    **common,
                )

            if momentum != 0:
                for p, buf in zip(dense_params, dense_bufs):
                    self.state[p]["momentum_buffer"] = buf
                for p, buf in zip(masked_params, masked_bufs):
                    self.state[p]["momentum_buffer"] = buf

        return loss


def _masked_directions(
    params: list[Tensor],
    grads: list[Tensor],
    masks: list[Tensor],
    *,
    weight_decay: float | Tensor,
    maximize: bool,
    foreach: bool,
) -> list[Tensor]:
    """SGD's ``g = (-)grad + weight_decay * param`` (same ops, same rounding), then 0 where frozen.

    Never writes into ``p.grad``. ``torch.where`` keeps trainable entries bit for bit
    (including -0.0 and nan) and writes +0.0 at frozen ones, even where the gradient is inf/nan.
    """
    if foreach:
        directions = list(torch._foreach_neg(grads)) if maximize else list(grads)
        if weight_decay != 0:
            if maximize:
                torch._foreach_add_(directions, params, alpha=weight_decay)
            else:
                directions = list(torch._foreach_add(directions, params, alpha=weight_decay))
    else:
        directions = []
        for p, g in zip(params, grads):
            d = -g if maximize else g
            if weight_decay != 0:
                d = d.add(p, alpha=weight_decay)
            directions.append(d)
    for i, m in enumerate(masks):
        # Replace in place in the list so a temporary is freed as soon as it is masked.
        directions[i] = torch.where(m, directions[i], 0.0)
    return directions
