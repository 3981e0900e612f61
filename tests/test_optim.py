"""Specifications of fedta_utils.optim: SparseSGDM (SGD with momentum and per-entry masks), LR schedules."""

from __future__ import annotations

import copy
import io
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedta_utils.checks import ConfigError
from fedta_utils.optim import SparseSGDM, lr_multiplier, make_scheduler

LR = 0.05


# --------------------------------------------------------------------------- helpers
def make_model(seed: int = 0) -> nn.Module:
    """Two Linear layers with bias: 4 parameters of shapes (8, 6), (8,), (3, 8), (3,)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def make_batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)) for _ in range(n)]


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, t: int) -> torch.Tensor:
    # The loss changes with the step, not only the batch.
    return F.mse_loss(model(x), y) * (1.0 + 0.1 * t)


def backward(model: nn.Module, opt: torch.optim.Optimizer, batch, t: int) -> None:
    opt.zero_grad(set_to_none=True)
    loss_fn(model, *batch, t).backward()


def random_masks(model: nn.Module, seed: int = 2, p: float = 0.5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(q.shape, generator=g) < p for q in model.parameters()]


def momentum_buffer(opt: torch.optim.Optimizer, p: torch.Tensor):
    return opt.state.get(p, {}).get("momentum_buffer")


def stored_masks(opt: SparseSGDM) -> list:
    return [opt.state.get(p, {}).get("mask") for group in opt.param_groups for p in group["params"]]


def assert_same_trajectory_state(model_a, opt_a, model_b, opt_b, where: str) -> None:
    for i, (pa, pb) in enumerate(zip(model_a.parameters(), model_b.parameters())):
        assert torch.equal(pa, pb), f"{where}: parameter {i} differs"
        ba, bb = momentum_buffer(opt_a, pa), momentum_buffer(opt_b, pb)
        assert (ba is None) == (bb is None), f"{where}: momentum buffer {i} exists in only one optimizer"
        if ba is not None:
            assert torch.equal(ba, bb), f"{where}: momentum buffer {i} differs"


def assert_steps_in_lockstep(model_ref, ref, model, opt, steps: int) -> None:
    """Both optimizers step on the same batches; weights and momentum agree bit for bit after each step."""
    for t, batch in enumerate(make_batches(steps)):
        backward(model_ref, ref, batch, t)
        backward(model, opt, batch, t)
        ref.step()
        opt.step()
        assert_same_trajectory_state(model_ref, ref, model, opt, f"step {t}")


def _valid_sgd_configs():
    for momentum, dampening, nesterov in itertools.product([0.0, 0.9], [0.0, 0.5], [False, True]):
        if nesterov and (momentum <= 0 or dampening != 0):
            continue  # torch.optim.SGD rejects these
        for weight_decay, maximize, foreach in itertools.product(
            [0.0, 1e-2], [False, True], [False, True, None]
        ):
            yield dict(
                momentum=momentum,
                dampening=dampening,
                nesterov=nesterov,
                weight_decay=weight_decay,
                maximize=maximize,
                foreach=foreach,
            )


SGD_CONFIGS = list(_valid_sgd_configs())


def _config_id(cfg: dict) -> str:
    return (
        "mom{momentum}-damp{dampening}-nest{nesterov:d}-wd{weight_decay}-max{maximize:d}-fe{foreach}".format(
            **cfg
        )
    )


def dense_equivalent_masks(kind: str, model: nn.Module):
    params = list(model.parameters())
    if kind == "none":
        return None
    if kind == "ones":  # bool and float all-ones masks
        return [
            torch.ones_like(p, dtype=torch.bool) if i % 2 else torch.ones_like(p)
            for i, p in enumerate(params)
        ]
    if kind == "mix":
        return [torch.ones_like(p, dtype=torch.bool) if i % 2 == 0 else None for i, p in enumerate(params)]
    raise AssertionError(kind)


def reference_masked_sgd(
    params, grads_list, masks, bufs, t, *, lr, momentum, dampening, nesterov, weight_decay, maximize
):
    """Hand-written torch.optim.SGD pseudo-code with a mask (frozen: no gradient, no decay, no momentum)."""
    for i, (theta, grad) in enumerate(zip(params, grads_list)):
        m = torch.ones_like(theta) if masks[i] is None else masks[i].to(theta.dtype)
        g = -grad if maximize else grad.clone()
        g = (g + weight_decay * theta) * m
        if momentum != 0:
            if t == 1:
                bufs[i] = g.clone()
            else:
                bufs[i] = momentum * bufs[i] + (1 - dampening) * g
            g = g + momentum * bufs[i] if nesterov else bufs[i]
        theta -= lr * g


# --------------------------------------------------------------------------- 1. exactness vs SGD
@pytest.mark.parametrize("mask_kind", ["ones", "none", "mix"])
@pytest.mark.parametrize("cfg", SGD_CONFIGS, ids=[_config_id(c) for c in SGD_CONFIGS])
def test_dense_equivalent_masks_are_bit_identical_to_sgd(cfg, mask_kind):
    steps = 20
    model_ref, model = make_model(), make_model()
    ref = torch.optim.SGD(model_ref.parameters(), lr=LR, **cfg)
    opt = SparseSGDM(model.parameters(), lr=LR, masks=dense_equivalent_masks(mask_kind, model), **cfg)
    assert_steps_in_lockstep(model_ref, ref, model, opt, steps)
    moved = any(not torch.equal(p, q) for p, q in zip(model.parameters(), make_model().parameters()))
    assert moved


@pytest.mark.parametrize("foreach", [False, True, None])
def test_lr_scheduler_changes_are_followed_bit_identically_to_sgd(foreach):
    cfg = dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=1e-2, foreach=foreach)
    model_ref, model = make_model(), make_model()
    ref = torch.optim.SGD(model_ref.parameters(), lr=LR, **cfg)
    opt = SparseSGDM(model.parameters(), lr=LR, masks=dense_equivalent_masks("ones", model), **cfg)
    sched_ref = torch.optim.lr_scheduler.LambdaLR(ref, lambda t: 1.0 / (1 + t))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    for t, batch in enumerate(make_batches(20)):
        backward(model_ref, ref, batch, t)
        backward(model, opt, batch, t)
        ref.step()
        opt.step()
        sched_ref.step()
        sched.step()
        if t == 10:  # and a manual change through param_groups
            for g in ref.param_groups + opt.param_groups:
                g["lr"] = 0.123
        assert_same_trajectory_state(model_ref, ref, model, opt, f"step {t}")
    assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"] != LR


def test_params_without_grad_are_skipped_like_sgd():
    model_ref, model = make_model(), make_model()
    unused_ref, unused = nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(4))
    cfg = dict(lr=LR, momentum=0.9, weight_decay=0.1)
    ref = torch.optim.SGD([*model_ref.parameters(), unused_ref], **cfg)
    opt = SparseSGDM([*model.parameters(), unused], masks=[None] * 4 + [torch.ones(4)], **cfg)
    assert_steps_in_lockstep(model_ref, ref, model, opt, 5)
    assert torch.equal(unused, torch.ones(4))
    assert momentum_buffer(opt, unused) is None


# --------------------------------------------------------------------------- 2. frozen entries
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("nesterov", [False, True])
def test_frozen_entries_never_move_and_their_momentum_stays_zero(nesterov, foreach, maximize):
    model = make_model()
    init = [p.detach().clone() for p in model.parameters()]
    masks = random_masks(model)
    opt = SparseSGDM(
        model.parameters(),
        lr=LR,
        momentum=0.9,
        weight_decay=0.1,
        nesterov=nesterov,
        foreach=foreach,
        maximize=maximize,
        masks=masks,
    )
    sign = -1.0 if maximize else 1.0  # maximize a bounded objective
    for t, batch in enumerate(make_batches(60)):
        opt.zero_grad(set_to_none=True)
        (sign * loss_fn(model, *batch, t)).backward()
        opt.step()
    for i, (p, p0, m) in enumerate(zip(model.parameters(), init, masks)):
        assert torch.equal(p[~m], p0[~m]), f"frozen entries of parameter {i} moved"
        buf = momentum_buffer(opt, p)
        assert torch.equal(buf[~m], torch.zeros_like(buf[~m])), f"momentum leaked into frozen entries of {i}"
        assert bool((p[m] != p0[m]).all()), f"trainable entries of parameter {i} did not all move"


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("nesterov", [False, True])
def test_partial_mask_equals_sgd_on_masked_gradient_with_masked_decay(nesterov, foreach):
    """Reference: plain torch.optim.SGD without weight decay, fed the direction
    where(mask, grad + wd * param, 0) (weight decay in SGD's own rounding)."""
    wd = 0.1
    model_ref, model = make_model(), make_model()
    masks = random_masks(model)
    masks[1] = None  # one dense parameter next to masked ones
    ref = torch.optim.SGD(model_ref.parameters(), lr=LR, momentum=0.9, nesterov=nesterov, foreach=foreach)
    opt = SparseSGDM(
        model.parameters(),
        lr=LR,
        momentum=0.9,
        weight_decay=wd,
        nesterov=nesterov,
        foreach=foreach,
        masks=masks,
    )
    for t, batch in enumerate(make_batches(30)):
        backward(model_ref, ref, batch, t)
        backward(model, opt, batch, t)
        with torch.no_grad():
            for p, m in zip(model_ref.parameters(), masks):
                d = p.grad.add(p, alpha=wd)
                p.grad = d if m is None else torch.where(m, d, torch.zeros_like(d))
        ref.step()
        opt.step()
        assert_same_trajectory_state(model_ref, ref, model, opt, f"step {t}")


def masked_direction_reference(model_ref, masks, weight_decay, maximize) -> None:
    """Turn model_ref's gradients into where(mask, (-)grad + wd * param, 0), in SGD's own rounding."""
    with torch.no_grad():
        for p, m in zip(model_ref.parameters(), masks):
            if p.grad is None:
                continue
            d = (-p.grad if maximize else p.grad).add(p, alpha=weight_decay)
            p.grad = d if m is None else torch.where(m, d, torch.zeros_like(d))


@pytest.mark.parametrize("cfg", SGD_CONFIGS, ids=[_config_id(c) for c in SGD_CONFIGS])
def test_masked_parameters_equal_sgd_on_the_masked_direction_for_every_option(cfg):
    """Partial, all-zeros and dense parameters side by side, for every SGD option."""
    model_ref, model = make_model(), make_model()
    masks = random_masks(model)
    masks[2] = torch.zeros_like(masks[2])
    masks[3] = None
    reference_cfg = dict(cfg, weight_decay=0.0, maximize=False)
    ref = torch.optim.SGD(model_ref.parameters(), lr=LR, **reference_cfg)
    opt = SparseSGDM(model.parameters(), lr=LR, masks=masks, **cfg)
    sign = -1.0 if cfg["maximize"] else 1.0  # maximize a bounded objective
    for t, batch in enumerate(make_batches(12)):
        for m, o in ((model_ref, ref), (model, opt)):
            o.zero_grad(set_to_none=True)
            (sign * loss_fn(m, *batch, t)).backward()
        masked_direction_reference(model_ref, masks, cfg["weight_decay"], cfg["maximize"])
        ref.step()
        opt.step()
        assert_same_trajectory_state(model_ref, ref, model, opt, f"step {t}")


@pytest.mark.parametrize("foreach", [False, True])
def test_masked_parameter_without_gradient_in_some_steps_is_skipped_like_sgd(foreach):
    """A masked parameter whose gradient is None is left alone, then picks up its momentum as SGD would."""
    cfg = dict(momentum=0.9, dampening=0.0, nesterov=True, foreach=foreach)
    model_ref, model = make_model(), make_model()
    masks = random_masks(model)
    ref = torch.optim.SGD(model_ref.parameters(), lr=LR, **cfg)
    opt = SparseSGDM(model.parameters(), lr=LR, weight_decay=0.1, masks=masks, **cfg)
    for t, batch in enumerate(make_batches(10)):
        backward(model_ref, ref, batch, t)
        backward(model, opt, batch, t)
        if t in (0, 1, 5):  # no gradient for the second weight matrix at these steps
            model_ref[2].weight.grad = None
            model[2].weight.grad = None
        masked_direction_reference(model_ref, masks, 0.1, False)
        ref.step()
        opt.step()
        assert_same_trajectory_state(model_ref, ref, model, opt, f"step {t}")


def test_tensor_learning_rate_is_followed_like_sgd():
    model_ref, model = make_model(), make_model()
    masks = random_masks(model)
    ref = torch.optim.SGD(model_ref.parameters(), lr=torch.tensor(LR), momentum=0.9)
    opt = SparseSGDM(model.parameters(), lr=torch.tensor(LR), momentum=0.9, masks=masks)
    for t, batch in enumerate(make_batches(5)):
        backward(model_ref, ref, batch, t)
        backward(model, opt, batch, t)
        masked_direction_reference(model_ref, masks, 0.0, False)
        ref.step()
        opt.step()
        assert_same_trajectory_state(model_ref, ref, model, opt, f"step {t}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_float_dtypes_keep_frozen_entries_and_follow_sgd(dtype):
    model_ref, model = make_model().to(dtype), make_model().to(dtype)
    masks = random_masks(model)
    ref = torch.optim.SGD(model_ref.parameters(), lr=LR, momentum=0.9)
    opt = SparseSGDM(model.parameters(), lr=LR, momentum=0.9, weight_decay=0.1, masks=masks)
    init = [p.detach().clone() for p in model.parameters()]
    for t, (x, y) in enumerate(make_batches(5)):
        batch = (x.to(dtype), y.to(dtype))
        backward(model_ref, ref, batch, t)
        backward(model, opt, batch, t)
        masked_direction_reference(model_ref, masks, 0.1, False)
        ref.step()
        opt.step()
        assert_same_trajectory_state(model_ref, ref, model, opt, f"step {t}")
    for p, p0, m in zip(model.parameters(), init, masks):
        assert torch.equal(p[~m], p0[~m])


def test_param_group_added_later_is_dense_and_masks_still_apply():
    model = make_model()
    w0, b0, w1, b1 = model.parameters()
    masks = [torch.zeros_like(w0), None]
    opt = SparseSGDM([w0, b0], lr=LR, momentum=0.9, masks=masks)
    opt.add_param_group({"params": [w1, b1]})
    init = [p.detach().clone() for p in (w0, b0, w1, b1)]
    for t, batch in enumerate(make_batches(3)):
        backward(model, opt, batch, t)
        opt.step()
    moved = [not torch.equal(p, p0) for p, p0 in zip((w0, b0, w1, b1), init)]
    assert moved == [False, True, True, True]


def test_state_of_a_live_optimizer_loads_into_a_new_one_and_continues_identically():
    model = make_model()
    opt = SparseSGDM(model.parameters(), lr=LR, momentum=0.9, weight_decay=0.1, masks=random_masks(model))
    batches = make_batches(6)
    for t in range(3):
        backward(model, opt, batches[t], t)
        opt.step()
    model_copy = copy.deepcopy(model)
    opt_copy = SparseSGDM(model_copy.parameters(), lr=LR, momentum=0.9, weight_decay=0.1)
    opt_copy.load_state_dict(copy.deepcopy(opt.state_dict()))
    for t in range(3, 6):
        for m, o in ((model, opt), (model_copy, opt_copy)):
            backward(m, o, batches[t], t)
            o.step()
    assert_same_trajectory_state(model, opt, model_copy, opt_copy, "after copy")


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_inf_gradient_at_frozen_entry_does_not_move_it(bad, foreach):
    model = make_model()
    masks = random_masks(model)
    w0 = model[0].weight.detach().clone()
    frozen = (~masks[0]).nonzero()[0].tolist()
    opt = SparseSGDM(model.parameters(), lr=LR, momentum=0.9, weight_decay=0.1, foreach=foreach, masks=masks)
    for t, batch in enumerate(make_batches(3)):
        backward(model, opt, batch, t)
        model[0].weight.grad[frozen[0], frozen[1]] = bad
        opt.step()
    w = model[0].weight.detach()
    assert torch.equal(w[~masks[0]], w0[~masks[0]])
    assert bool(torch.isfinite(w).all())


def test_masks_align_with_parameters_across_param_groups():
    model = make_model()
    w0, b0, w1, b1 = model.parameters()
    groups = [{"params": [w0, b0]}, {"params": [w1, b1], "lr": 0.2}]
    init = [p.detach().clone() for p in (w0, b0, w1, b1)]
    masks = [None, None, torch.zeros_like(w1), torch.ones_like(b1)]  # index 2 = first of group 2
    opt = SparseSGDM(groups, lr=LR, momentum=0.9, masks=masks)
    for t, batch in enumerate(make_batches(3)):
        backward(model, opt, batch, t)
        opt.step()
    moved = [not torch.equal(p, p0) for p, p0 in zip((w0, b0, w1, b1), init)]
    assert moved == [True, True, False, True]


def test_step_does_not_write_into_masked_gradients():
    model = make_model()
    opt = SparseSGDM(
        model.parameters(), lr=LR, momentum=0.9, nesterov=True, foreach=True, masks=random_masks(model)
    )
    for t, batch in enumerate(make_batches(3)):
        backward(model, opt, batch, t)
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


# --------------------------------------------------------------------------- 3. reference loop
REF_CONFIGS = [
    dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.05, maximize=False),
    dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.05, maximize=False),
    dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.05, maximize=False),
    dict(momentum=0.9, dampening=0.5, nesterov=False, weight_decay=0.05, maximize=False),
    dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.05, maximize=True),
]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("cfg", REF_CONFIGS, ids=[str(i) for i in range(len(REF_CONFIGS))])
def test_matches_handwritten_sgd_pseudocode_with_mask(cfg, foreach):
    steps = 20
    model_ref, model = make_model(), make_model()
    masks = random_masks(model, seed=5, p=0.7)
    masks[3] = None
    opt = SparseSGDM(model.parameters(), lr=LR, foreach=foreach, masks=masks, **cfg)
    # Maximize an objective that is bounded above, so the trajectory stays stable.
    sign = -1.0 if cfg["maximize"] else 1.0
    bufs = [None] * 4
    for t, batch in enumerate(make_batches(steps)):
        opt.zero_grad(set_to_none=True)
        (sign * loss_fn(model, *batch, t)).backward()
        opt.step()
        model_ref.zero_grad(set_to_none=True)
        (sign * loss_fn(model_ref, *batch, t)).backward()
        with torch.no_grad():
            params = list(model_ref.parameters())
            reference_masked_sgd(params, [p.grad for p in params], masks, bufs, t + 1, lr=LR, **cfg)
    for i, (p, q) in enumerate(zip(model.parameters(), model_ref.parameters())):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6, msg=f"parameter {i}")
        if cfg["momentum"]:
            torch.testing.assert_close(momentum_buffer(opt, p), bufs[i], rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- 4. GradScaler
# Covers GradScaler's generic path on CPU float32 parameters: scale the loss,
# unscale_ the gradients (inf/nan check per device), call optimizer.step() only
# when all gradients are finite, update the scale. (No autocast: the mixed
# precision forward is not what SparseSGDM sees.)
def test_gradscaler_steps_match_unscaled_steps():
    model_ref, model = make_model(), make_model()
    masks = random_masks(model)
    cfg = dict(lr=LR, momentum=0.9, weight_decay=0.01, nesterov=True)
    ref = SparseSGDM(model_ref.parameters(), masks=masks, **cfg)
    opt = SparseSGDM(model.parameters(), masks=masks, **cfg)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for t, batch in enumerate(make_batches(8)):
        backward(model_ref, ref, batch, t)
        ref.step()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss_fn(model, *batch, t)).backward()
        scaler.step(opt)
        scaler.update()
    assert scaler.get_scale() == 2.0**12  # no step was skipped
    for p, q in zip(model.parameters(), model_ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(momentum_buffer(opt, p), momentum_buffer(ref, q), rtol=1e-6, atol=1e-7)


def test_gradscaler_skips_step_with_inf_gradient():
    model = make_model()
    opt = SparseSGDM(model.parameters(), lr=LR, momentum=0.9, masks=random_masks(model))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    batches = make_batches(2)
    # One normal step first, so momentum buffers exist and would move params.
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss_fn(model, *batches[0], 0)).backward()
    scaler.step(opt)
    scaler.update()
    before = [p.detach().clone() for p in model.parameters()]
    bufs = [momentum_buffer(opt, p).clone() for p in model.parameters()]
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss_fn(model, *batches[1], 1)).backward()
    model[2].bias.grad[0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(torch.equal(momentum_buffer(opt, p), b) for p, b in zip(model.parameters(), bufs))
    assert scaler.get_scale() == 2.0**11  # backed off


# --------------------------------------------------------------------------- 5. state_dict
@pytest.mark.parametrize("foreach", [False, True])
def test_state_dict_round_trip_with_masks_continues_bit_identically(foreach):
    n_steps, m_steps = 6, 6
    batches = make_batches(n_steps + m_steps)
    model = make_model()
    masks = random_masks(model)
    masks[1] = None
    cfg = dict(lr=LR, momentum=0.9, weight_decay=0.1, nesterov=True, foreach=foreach)
    opt = SparseSGDM(model.parameters(), masks=masks, **cfg)
    for t in range(n_steps):
        backward(model, opt, batches[t], t)
        opt.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    init_frozen = [None if m is None else p.detach()[~m].clone() for p, m in zip(model.parameters(), masks)]
    for t in range(n_steps, n_steps + m_steps):
        backward(model, opt, batches[t], t)
        opt.step()

    resumed = make_model(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    opt2 = SparseSGDM(resumed.parameters(), masks=None, **cfg)
    opt2.load_state_dict(saved["opt"])
    for got, want in zip(stored_masks(opt2), masks):
        assert (got is None) == (want is None)
        if want is not None:
            assert got.dtype == torch.bool and torch.equal(got, want)
    for t in range(n_steps, n_steps + m_steps):
        backward(resumed, opt2, batches[t], t)
        opt2.step()
    assert_same_trajectory_state(model, opt, resumed, opt2, "after resume")
    for p, m, f0 in zip(resumed.parameters(), masks, init_frozen):
        if m is not None:
            assert torch.equal(p.detach()[~m], f0)


def test_state_dict_contains_the_masks():
    model = make_model()
    masks = random_masks(model)
    masks[0] = None
    opt = SparseSGDM(model.parameters(), masks=masks)
    state = opt.state_dict()["state"]
    assert 0 not in state or "mask" not in state[0]
    for i in (1, 2, 3):
        assert torch.equal(state[i]["mask"], masks[i])


def test_loaded_masks_replace_the_constructor_masks():
    model = make_model()
    masks = random_masks(model)
    saved = SparseSGDM(model.parameters(), masks=masks).state_dict()
    opt = SparseSGDM(model.parameters(), masks=[torch.ones_like(p) for p in model.parameters()])
    opt.load_state_dict(copy.deepcopy(saved))
    assert all(torch.equal(a, b) for a, b in zip(stored_masks(opt), masks))


# --------------------------------------------------------------------------- 6. bad input
def test_wrong_mask_count_is_rejected():
    model = make_model()
    with pytest.raises(ValueError, match=r"masks has 3 entries .* expected 4"):
        SparseSGDM(model.parameters(), masks=[None, None, None])


def test_wrong_mask_shape_is_rejected_naming_the_parameter():
    model = make_model()
    masks = [None, None, torch.ones(8, 3), None]
    with pytest.raises(
        ValueError, match=r"masks\[2\] has shape \(8, 3\) but its parameter has shape \(3, 8\)"
    ):
        SparseSGDM(model.parameters(), masks=masks)


def test_non_binary_mask_is_rejected_naming_the_parameter():
    model = make_model()
    masks = [None, torch.full((8,), 0.5), None, None]
    with pytest.raises(ValueError, match=r"masks\[1\].*only 0 and 1"):
        SparseSGDM(model.parameters(), masks=masks)


def test_single_tensor_instead_of_a_list_is_rejected():
    model = make_model()
    with pytest.raises(TypeError, match="not a single tensor"):
        SparseSGDM([model[0].weight], masks=torch.ones(8, 6))


def test_sparse_gradient_on_a_masked_parameter_is_rejected():
    weight = nn.Parameter(torch.ones(4, 2))
    opt = SparseSGDM([weight], lr=LR, masks=[torch.ones(4, 2)])
    weight.grad = torch.ones(4, 2).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradient"):
        opt.step()


def test_non_tensor_mask_is_rejected():
    model = make_model()
    with pytest.raises(TypeError, match=r"masks\[0\] must be a tensor or None"):
        SparseSGDM(model.parameters(), masks=[[1, 0], None, None, None])


def test_fused_is_rejected():
    model = make_model()
    with pytest.raises(ValueError, match="fused"):
        SparseSGDM(model.parameters(), fused=True)


# --------------------------------------------------------------------------- 7. stored masks
def test_masks_are_stored_as_bool_copies():
    model = make_model()
    masks = [m.float() for m in random_masks(model)]
    opt = SparseSGDM(model.parameters(), masks=masks)
    masks[0].zero_()  # the caller's tensor is not the optimizer's
    got = stored_masks(opt)
    assert all(m.dtype == torch.bool for m in got)
    assert bool(got[0].any())


# --------------------------------------------------------------------------- 8. learning-rate schedules
def test_cosine_schedule_warms_up_linearly_then_anneals_to_zero():
    values = [lr_multiplier("cosine", step, 100, warmup_steps=10) for step in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0)
    assert values[55] == pytest.approx(0.5, abs=0.02)
    assert values[-1] < 0.01
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


def test_step_schedule_drops_tenfold_at_half_and_three_quarters():
    values = [lr_multiplier("step", step, 100) for step in (0, 49, 50, 74, 75, 99)]
    assert values == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


def test_constant_schedule_stays_at_the_base_rate_after_warm_up():
    values = [lr_multiplier("constant", s, 10, warmup_steps=2) for s in range(4)]
    assert values == pytest.approx([0.5, 1, 1, 1])


def test_scheduler_checkpoint_resumes_the_same_rate():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = make_scheduler(optimizer, "cosine", 20, 3)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    optimizer2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    resumed = make_scheduler(optimizer2, "cosine", 20, 3)
    resumed.load_state_dict(state)
    optimizer2.param_groups[0]["lr"] = optimizer.param_groups[0]["lr"]
    optimizer.step(), scheduler.step(), optimizer2.step(), resumed.step()
    assert resumed.get_last_lr() == scheduler.get_last_lr()
    assert math.isclose(scheduler.get_last_lr()[0], lr_multiplier("cosine", 8, 20, 3))


def test_make_scheduler_rejects_an_unknown_schedule_and_a_warm_up_longer_than_training():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ConfigError, match="scheduler='linear'"):
        make_scheduler(optimizer, "linear", 10)
    with pytest.raises(ConfigError, match="warmup_steps=11"):
        make_scheduler(optimizer, "cosine", 10, warmup_steps=11)


# --------------------------------------------------------------------------- gradient clipping
def raw_grad_norm(model: nn.Module) -> float:
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))


@pytest.mark.parametrize("foreach", [False, True])
def test_clipping_without_masks_equals_clip_grad_norm_then_sgd(foreach):
    model_ref, model = make_model(), make_model()
    cfg = dict(lr=LR, momentum=0.9, weight_decay=0.01, nesterov=True, foreach=foreach)
    ref = torch.optim.SGD(model_ref.parameters(), **cfg)
    opt = SparseSGDM(model.parameters(), max_grad_norm=0.05, **cfg)
    clipped = 0
    for t, batch in enumerate(make_batches(12)):
        backward(model_ref, ref, batch, t)
        backward(model, opt, batch, t)
        clipped += raw_grad_norm(model_ref) > 0.05
        torch.nn.utils.clip_grad_norm_(model_ref.parameters(), 0.05)
        ref.step()
        opt.step()
        for p, q in zip(model.parameters(), model_ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert clipped >= 6  # the norm bound was active, not a no-op


def test_clipping_with_masks_bounds_the_norm_of_the_trainable_entries_only():
    """Reference: zero the frozen entries' gradients, clip_grad_norm_, then the unclipped optimizer."""
    model_ref, model = make_model(), make_model()
    masks = random_masks(model)
    cfg = dict(lr=LR, momentum=0.9, weight_decay=0.01, masks=masks)
    ref = SparseSGDM(model_ref.parameters(), **cfg)
    opt = SparseSGDM(model.parameters(), max_grad_norm=0.05, **cfg)
    for t, batch in enumerate(make_batches(12)):
        backward(model_ref, ref, batch, t)
        backward(model, opt, batch, t)
        with torch.no_grad():
            for p, m in zip(model_ref.parameters(), masks):
                p.grad.masked_fill_(~m, 0)
        torch.nn.utils.clip_grad_norm_(model_ref.parameters(), 0.05)
        ref.step()
        opt.step()
        for p, q in zip(model.parameters(), model_ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_first_clipped_step_moves_the_trainable_entries_by_at_most_lr_times_the_norm():
    model = make_model().double()  # float64, so that the step is measured without cancellation
    before = [p.detach().clone() for p in model.parameters()]
    opt = SparseSGDM(model.parameters(), lr=LR, momentum=0.9, masks=random_masks(model), max_grad_norm=1e-3)
    x, y = make_batches(1)[0]
    backward(model, opt, (x.double(), y.double()), 0)
    assert raw_grad_norm(model) > 0.1  # far above the bound
    opt.step()
    with torch.no_grad():
        step = torch.linalg.vector_norm(
            torch.cat([(p - b).flatten() for p, b in zip(model.parameters(), before)])
        )
    assert LR * 1e-3 * (1 - 1e-4) <= float(step) <= LR * 1e-3 * (1 + 1e-9)


def test_a_bound_above_the_gradient_norm_is_bit_identical_to_no_clipping():
    model_ref, model = make_model(), make_model()
    masks = random_masks(model)
    ref = SparseSGDM(model_ref.parameters(), lr=LR, momentum=0.9, masks=masks)
    opt = SparseSGDM(model.parameters(), lr=LR, momentum=0.9, masks=masks, max_grad_norm=1e6)
    assert_steps_in_lockstep(model_ref, ref, model, opt, 5)


def test_under_gradscaler_the_unscaled_gradient_is_clipped():
    model_ref, model = make_model(), make_model()
    cfg = dict(lr=LR, momentum=0.9, masks=random_masks(model), max_grad_norm=0.05)
    ref, opt = SparseSGDM(model_ref.parameters(), **cfg), SparseSGDM(model.parameters(), **cfg)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for t, batch in enumerate(make_batches(6)):
        backward(model_ref, ref, batch, t)
        assert raw_grad_norm(model_ref) > 0.05  # the bound is active at every step
        ref.step()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss_fn(model, *batch, t)).backward()
        scaler.step(opt)
        scaler.update()
    for p, q in zip(model.parameters(), model_ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "1"])
def test_a_bad_max_grad_norm_is_rejected_naming_it(bad):
    with pytest.raises((ConfigError, TypeError, ValueError), match="max_grad_norm"):
        SparseSGDM(make_model().parameters(), lr=LR, max_grad_norm=bad)


def test_a_clipping_step_without_any_gradient_moves_nothing():
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    SparseSGDM(model.parameters(), lr=LR, max_grad_norm=1.0).step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
