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

Speed: the masked parameters of a group share one flat workspace for the
update direction and one flat momentum buffer (the per-parameter momentum
buffers in the state are views of it). A step therefore masks every parameter
with one operation, runs the momentum recurrence as two flat operations instead
of two per parameter, and allocates no memory; parameters whose mask is all
ones take SGD's own code path. The cost is a persistent workspace the size of
the masked parameters.
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


def _all_ones(masks: list[Tensor]) -> list[bool]:
    """Which bool masks have no frozen entry; one host sync per device (configuration time only)."""
    flags: list[bool] = [False] * len(masks)
    by_device: dict[torch.device, list[int]] = {}
    for i, m in enumerate(masks):
        by_device.setdefault(m.device, []).append(i)
    for indices in by_device.values():
        values = torch.stack([masks[i].all() for i in indices]).tolist()
        for i, value in zip(indices, values):
            flags[i] = value
    return flags


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
    operations as ``torch.optim.SGD``, so all-ones masks are bit-identical to
    SGD. Non-finite gradients at frozen entries do not leak into them (the
    frozen entries of the direction are overwritten with 0, never multiplied
    by the mask, since inf * 0 = nan).

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
        self._plan: list[tuple[list[Tensor], list[_MaskedBlock]]] | None = None
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
        self._plan = self._build_plan()

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

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As in SGD; the new parameters are dense (set masks for them with :meth:`set_masks`)."""
        super().add_param_group(param_group)
        self._plan = None  # rebuilt at the next step

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
        self._plan = self._build_plan()

    def _build_plan(self) -> list[tuple[list[Tensor], list[_MaskedBlock]]]:
        """Per param group: its dense parameters, and its masked ones as blocks (one per device and dtype).

        A parameter whose mask is all ones is dense: SGD's own code path, bit for bit.
        """
        plan = []
        for group in self.param_groups:
            params = group["params"]
            masks = [self.state[p].get("mask") if p in self.state else None for p in params]
            masked = [i for i, m in enumerate(masks) if m is not None]
            full = dict(zip(masked, _all_ones([masks[i] for i in masked]))) if masked else {}
            dense = [p for i, p in enumerate(params) if masks[i] is None or full[i]]
            by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = {}
            for i in masked:
                if not full[i]:
                    by_kind.setdefault((params[i].device, params[i].dtype), []).append(i)
            blocks = [_MaskedBlock([params[i] for i in idx], [masks[i] for i in idx]) for idx in by_kind.values()]
            plan.append((dense, blocks))
        return plan

    # ------------------------------------------------------------------- step
    @_use_grad_for_differentiable
    def step(self, closure=None):
        """Perform a single optimization step (see the class docstring for the masking)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if getattr(self, "_plan", None) is None:  # e.g. after add_param_group or unpickling
            self._plan = self._build_plan()
        for group, (dense, blocks) in zip(self.param_groups, self._plan):
            foreach = _resolve_foreach(group, dense, blocks)
            self._step_dense(group, dense, foreach)
            for block in blocks:
                block.step(group, self.state, foreach)
        return loss

    def _step_dense(self, group: dict[str, Any], params: list[Tensor], foreach: bool) -> None:
        """torch.optim.SGD's step on the group's dense parameters (same function, same arguments)."""
        params = [p for p in params if p.grad is not None]
        if not params:
            return
        momentum = group["momentum"]
        bufs = [self.state[p].get("momentum_buffer") for p in params] if momentum != 0 else []
        grads = [p.grad for p in params]
        _functional_sgd(
            params,
            grads,
            bufs,
            has_sparse_grad=any(g.is_sparse for g in grads),
            weight_decay=group["weight_decay"],
            maximize=group["maximize"],
            **_recurrence(group, foreach),
        )
        for p, buf in zip(params, bufs):
            self.state[p]["momentum_buffer"] = buf


def _resolve_foreach(group: dict[str, Any], dense: list[Tensor], blocks: list[_MaskedBlock]) -> bool:
    """The implementation choice torch.optim.sgd.sgd makes for the whole group (params with a gradient)."""
    foreach = group["foreach"]
    if foreach is None and group.get("fused") is None:
        params = [p for p in dense if p.grad is not None]
        params += [p for block in blocks for p in block.params if p.grad is not None]
        _, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
    return bool(foreach)


def _recurrence(group: dict[str, Any], foreach: bool) -> dict[str, Any]:
    """The arguments of torch.optim.sgd.sgd that follow the direction: momentum, lr, implementation."""
    return dict(momentum=group["momentum"], lr=group["lr"], dampening=group["dampening"],
                nesterov=group["nesterov"], foreach=foreach, fused=False)


class _MaskedBlock:
    """The masked parameters of one group on one device and dtype, with flat work buffers.

    `work` receives each step's direction ((-)grad + weight_decay * param, in
    SGD's rounding), parameter by parameter through `views`; `keep_bits` then
    zeroes the frozen entries of all of them in one operation. `velocity` is
    the momentum buffer of the whole block; the state's per-parameter
    ``momentum_buffer`` entries are views of it, so state_dict() sees the usual
    per-parameter buffers. Elementwise operations on a flat buffer give the
    same bits as the same operations per parameter.
    """

    def __init__(self, params: list[Tensor], masks: list[Tensor]):
        self.params = params
        self.work = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        self.keep_bits = _keep_bits(torch.cat([m.reshape(-1) for m in masks]), self.work.dtype)
        self.views = self._split(self.work)
        self.velocity: Tensor | None = None
        self.velocity_views: list[Tensor] = []

    def _split(self, flat: Tensor) -> list[Tensor]:
        return [chunk.view_as(p) for chunk, p in zip(flat.split([p.numel() for p in self.params]), self.params)]

    def step(self, group: dict[str, Any], state, foreach: bool) -> None:
        grads = [p.grad for p in self.params]
        if any(g is None for g in grads) or isinstance(group["lr"], Tensor):
            self._step_generic(group, state, foreach)
            return
        for p, g in zip(self.params, grads):
            if g.is_sparse:
                raise RuntimeError(
                    f"SparseSGDM: a masked parameter of shape {_shape(p)} has a sparse gradient, "
                    "which masks do not support"
                )
        self._load_directions(self.params, grads, self.views, group, foreach)
        directions = self.views
        if group["momentum"] != 0:
            directions = self._momentum_directions(group, state)
            if directions is None:  # momentum buffers exist for some parameters only
                self._step_generic(group, state, foreach, directions_ready=True)
                return
        lr = group["lr"]
        if foreach:
            torch._foreach_add_(self.params, directions, alpha=-lr)
        else:
            for p, d in zip(self.params, directions):
                p.add_(d, alpha=-lr)

    def _load_directions(self, params, grads, views, group, foreach: bool) -> None:
        """views <- (-)grad + weight_decay * param, exactly as SGD computes it; then 0 at frozen entries."""
        weight_decay, maximize = group["weight_decay"], group["maximize"]
        if foreach:
            torch._foreach_copy_(views, grads)
            if maximize:
                torch._foreach_neg_(views)
            if weight_decay != 0:
                torch._foreach_add_(views, params, alpha=weight_decay)
        else:
            for v, g, p in zip(views, grads, params):
                if maximize:
                    torch.neg(g, out=v)
                    if weight_decay != 0:
                        v.add_(p, alpha=weight_decay)
                elif weight_decay != 0:
                    torch.add(g, p, alpha=weight_decay, out=v)
                else:
                    v.copy_(g)
        _zero_frozen(self.work, self.keep_bits)

    def _momentum_directions(self, group: dict[str, Any], state) -> list[Tensor] | None:
        """Run SGD's momentum recurrence on the flat velocity; returns the per-parameter directions."""
        momentum, dampening = group["momentum"], group["dampening"]
        bufs = [state[p].get("momentum_buffer") for p in self.params]
        owned = self.velocity is not None and all(b is v for b, v in zip(bufs, self.velocity_views))
        if not owned and all(b is None for b in bufs):
            self._adopt(state, self.work.clone())  # SGD's first step: buf = clone(direction)
        else:
            if not owned:
                if any(b is None for b in bufs):
                    return None
                self._adopt(state, torch.cat([b.reshape(-1) for b in bufs]))  # e.g. after load_state_dict
            self.velocity.mul_(momentum).add_(self.work, alpha=1 - dampening)
        if group["nesterov"]:
            self.work.add_(self.velocity, alpha=momentum)
            return self.views
        return self.velocity_views

    def _adopt(self, state, velocity: Tensor) -> None:
        self.velocity = velocity
        self.velocity_views = self._split(velocity)
        for p, v in zip(self.params, self.velocity_views):
            state[p]["momentum_buffer"] = v

    def _step_generic(self, group: dict[str, Any], state, foreach: bool, directions_ready: bool = False) -> None:
        """Parameters without a gradient, partial momentum state or a tensor lr: SGD's own recurrence."""
        active = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not active:
            return
        params = [self.params[i] for i in active]
        views = [self.views[i] for i in active]
        if not directions_ready:
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"SparseSGDM: a masked parameter of shape {_shape(p)} has a sparse gradient, "
                        "which masks do not support"
                    )
            self._load_directions(params, [p.grad for p in params], views, group, foreach)
        momentum = group["momentum"]
        bufs = [state[p].get("momentum_buffer") for p in params] if momentum != 0 else []
        # Sign and weight decay are already in the directions, in SGD's own rounding.
        _functional_sgd(params, views, bufs, has_sparse_grad=False, weight_decay=0.0, maximize=False,
                        **_recurrence(group, foreach))
        for p, buf in zip(params, bufs):
            state[p]["momentum_buffer"] = buf


# Integer types with the width of each float type, to mask a float tensor through its bits.
_SAME_WIDTH_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _keep_bits(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """The mask as an integer tensor the width of `dtype`: all bits set where kept, 0 where frozen.

    Falls back to the bool mask for a dtype without an integer of its width.
    """
    itype = _SAME_WIDTH_INT.get(torch.empty((), dtype=dtype).element_size())
    if itype is None or dtype.is_complex:
        return keep
    return keep.to(itype).neg_()  # 1 -> -1: every bit set


def _zero_frozen(work: Tensor, keep_bits: Tensor) -> None:
    """Set the frozen entries of `work` to +0.0 in place, whatever they hold (inf and nan included).

    Overwrite, never multiply: inf * 0 is nan, so multiplying by the mask would
    let an inf gradient at a frozen entry poison its weight. The AND of the
    float's bits with the mask keeps a trainable entry bit for bit and gives
    +0.0 at a frozen one; unlike masked_fill_ it is vectorised on a CPU
    (about 18x faster on 150k entries, one thread).
    """
    if keep_bits.dtype == torch.bool:
        work.masked_fill_(keep_bits.logical_not(), 0)
        return
    work.view(keep_bits.dtype).bitwise_and_(keep_bits)
