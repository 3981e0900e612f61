"""Specifications of fedta_utils.fisher and fedta_utils.masks: Fisher scores and TaLoS calibration."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedta_utils.checks import ConfigError
from fedta_utils.fisher import DEFAULT_CHUNK, fisher_scores, fisher_sums, fisher_sums_loop
from fedta_utils.masks import ATTENUATION, RULES, calibrate, calibrate_masks, count_trainable, mask_sparsity
from fedta_utils.models import backbone_parameter_names, build_model

# --------------------------------------------------------------------------- helpers


def tiny_vit(dtype: torch.dtype = torch.float32) -> nn.Module:
    return build_model("tiny_vit", num_classes=10).to(dtype)


def image_batches(sizes=(7, 5), dtype=torch.float32, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """Batches of 32x32 images with labels in [0, 10); uneven sizes exercise partial chunks."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, 3, 32, 32, generator=generator, dtype=dtype),
            torch.randint(0, 10, (size,), generator=generator),
        )
        for size in sizes
    ]


def scores_with(fisher_function, model, batches, label_mode, seed=3, **options):
    """Fisher means by `fisher_sums` or `fisher_sums_loop`, labels drawn from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    sums, count = fisher_function(model, batches, label_mode, generator=generator, chunk_size=5, **options)
    return {name: total / count for name, total in sums.items()}


def assert_scores_close(actual: dict, expected: dict, rtol: float, atol: float) -> None:
    """Entry-wise; atol is a floor for entries that are zero analytically (the key-projection bias)."""
    assert list(actual) == list(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=atol, msg=name)


class SoftmaxRegression(nn.Module):
    """p(y|x) = softmax(W x + b): per-sample gradient of log p(y|x) is (onehot(y) - p) [x, 1]."""

    def __init__(self, in_features: int = 5, classes: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.linear = nn.Linear(in_features, classes).double()

    def forward(self, x):
        return self.linear(x)


class ToyParameters(nn.Module):
    """Two eligible tensors (12 + 6 = 18 entries) and a head that calibration leaves out."""

    def __init__(self, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.first = nn.Parameter(torch.randn(3, 4, generator=generator))
        self.second = nn.Parameter(torch.randn(6, generator=generator))
        self.head = nn.Linear(2, 2)


def toy_scores(seed: int = 1) -> dict[str, torch.Tensor]:
    """Continuous (tie-free) positive scores for ToyParameters."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "first": torch.rand(3, 4, generator=generator) + 0.01,
        "second": torch.rand(6, generator=generator) + 0.01,
    }


def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[n].reshape(-1) for n in ("first", "second")])


def lowest_k(values: torch.Tensor, k: int) -> torch.Tensor:
    kept = torch.zeros(values.numel(), dtype=torch.bool)
    kept[torch.argsort(values, stable=True)[:k]] = True
    return kept


def never_called(model):
    raise AssertionError("score_fn must not be called for this rule")


def snapshot(model: nn.Module) -> dict:
    return {
        "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "fused_attn": {n: m.fused_attn for n, m in model.named_modules() if hasattr(m, "fused_attn")},
    }


def assert_bit_identical(before: dict, after: dict) -> None:
    for name, weight in before.items():
        assert torch.equal(after[name], weight), name


# ================================================= Fisher: vmap equals the per-sample loop

FISHER_FUNCTIONS = [fisher_sums, fisher_sums_loop]


@pytest.mark.parametrize("label_mode", ["sampled", "true"])
def test_vmap_matches_the_per_sample_loop_in_float64(label_mode):
    model = tiny_vit(torch.float64)
    batches = image_batches(dtype=torch.float64)
    assert_scores_close(
        scores_with(fisher_sums, model, batches, label_mode),
        scores_with(fisher_sums_loop, model, batches, label_mode),
        rtol=1e-5,
        atol=1e-18,
    )


def test_vmap_matches_the_per_sample_loop_in_float32():
    model = tiny_vit()
    batches = image_batches()
    assert_scores_close(
        scores_with(fisher_sums, model, batches, "sampled"),
        scores_with(fisher_sums_loop, model, batches, "sampled"),
        rtol=1e-4,
        atol=1e-12,
    )


def test_default_scores_cover_every_parameter_including_tokens_conv_norms_and_head():
    model = tiny_vit()
    scores = fisher_scores(model, image_batches(sizes=(4,)))
    assert list(scores) == [n for n, _ in model.named_parameters()]
    for name in (
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "blocks.0.norm1.weight",
        "norm.bias",
        "head.weight",
    ):
        assert scores[name].abs().max() > 0, name


def test_scoring_a_subset_of_parameters_gives_the_same_scores_as_scoring_all():
    model = tiny_vit(torch.float64)
    batches = image_batches(dtype=torch.float64)
    subset = ["pos_embed", "blocks.1.attn.qkv.weight", "head.bias"]
    everything = scores_with(fisher_sums, model, batches, "true")
    some = scores_with(fisher_sums, model, batches, "true", param_names=subset)
    assert_scores_close(some, {name: everything[name] for name in subset}, rtol=1e-10, atol=1e-18)


def test_the_chunk_size_bounds_memory_but_does_not_change_the_sums():
    model = SoftmaxRegression()
    batches = [(torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 4, (40,)))]
    by_default = fisher_sums(model, batches, "true")[0]
    one_by_one = fisher_sums(model, batches, "true", chunk_size=1)[0]
    assert 40 > DEFAULT_CHUNK > 1
    assert_scores_close(one_by_one, by_default, rtol=1e-10, atol=1e-18)


def test_bfloat16_autocast_accumulates_in_float32_and_stays_close():
    model = tiny_vit()
    batches = image_batches()
    exact = scores_with(fisher_sums, model, batches, "true")
    approx = scores_with(fisher_sums, model, batches, "true", autocast_dtype=torch.bfloat16)
    assert all(score.dtype == torch.float32 for score in approx.values())
    for name in exact:  # bf16 keeps ~3 significant digits: 10% of the tensor's largest entry
        assert (approx[name] - exact[name]).abs().max() < 0.1 * exact[name].abs().max(), name


def test_vmap_matches_the_loop_on_a_module_called_twice_and_leaves_its_parameters_registered():
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.Tanh(), shared).double()
    batches = [(torch.randn(6, 4, dtype=torch.float64), None)]
    by_vmap = scores_with(fisher_sums, model, batches, "sampled")
    assert all(type(p) is nn.Parameter and p.requires_grad for p in model.parameters())
    assert model[0].weight is model[2].weight
    by_loop = scores_with(fisher_sums_loop, model, batches, "sampled")
    assert_scores_close(by_vmap, by_loop, rtol=1e-10, atol=1e-18)


class ConstantBranch(nn.Module):
    """A Linear applied to a constant buffer: its output does not depend on the inputs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.on_inputs = nn.Linear(3, 2).double()
        self.on_constant = nn.Linear(1, 2).double()
        self.register_buffer("constant", torch.ones(1, 1, dtype=torch.float64))

    def forward(self, x):
        return self.on_inputs(x) + self.on_constant(self.constant)


def test_vmap_matches_the_loop_on_a_layer_whose_output_does_not_depend_on_the_inputs():
    model = ConstantBranch()
    batches = [(torch.randn(5, 3, dtype=torch.float64), None)]
    by_vmap = scores_with(fisher_sums, model, batches, "sampled")
    assert by_vmap["on_constant.bias"].abs().max() > 0
    by_loop = scores_with(fisher_sums_loop, model, batches, "sampled")
    assert_scores_close(by_vmap, by_loop, rtol=1e-10, atol=1e-18)


def test_vmap_handles_a_parameter_that_does_not_reach_the_output():
    model = ConstantBranch()
    model.unused = nn.Linear(2, 2).double()
    sums, count = fisher_sums(model, [(torch.randn(5, 3, dtype=torch.float64), None)])
    assert count == 5 and torch.equal(sums["unused.weight"], torch.zeros(2, 2, dtype=torch.float64))


# ============================================================ Fisher: definition


def test_fisher_is_the_mean_of_squared_per_sample_gradients_not_the_squared_mean_gradient():
    model = tiny_vit(torch.float64)
    batches = image_batches(sizes=(12,), dtype=torch.float64)
    fisher = fisher_scores(model, batches, "true")
    inputs, labels = batches[0]
    reference = copy.deepcopy(model).eval()
    mean_log_prob = -F.cross_entropy(reference(inputs), labels)
    mean_grads = torch.autograd.grad(mean_log_prob, list(reference.parameters()))
    for (name, _), mean_grad in zip(model.named_parameters(), mean_grads):
        squared_mean = mean_grad.square()
        assert torch.all(fisher[name] >= squared_mean * (1 - 1e-9) - 1e-30), name  # Jensen
    assert fisher["head.weight"].sum() > 2 * mean_grads[-2].square().sum()


@pytest.mark.parametrize("fisher_function", FISHER_FUNCTIONS)
def test_fisher_of_softmax_regression_matches_the_closed_form(fisher_function):
    model = SoftmaxRegression()
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(9, 5, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 4, (9,), generator=generator)
    with torch.no_grad():
        residual = F.one_hot(labels, 4).double() - torch.softmax(model(inputs), dim=1)  # [B, classes]
    expected_weight = torch.einsum("bo,bi->boi", residual, inputs).square().sum(0)
    expected_bias = residual.square().sum(0)
    sums, count = fisher_function(model, [(inputs, labels)], "true", chunk_size=4)
    assert count == 9
    torch.testing.assert_close(sums["linear.weight"], expected_weight, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(sums["linear.bias"], expected_bias, rtol=1e-12, atol=1e-15)


def test_fisher_scores_are_the_sums_divided_by_the_sample_count():
    model = SoftmaxRegression()
    batches = [(torch.randn(7, 5, dtype=torch.float64), None)]
    sums, count = fisher_sums(model, batches)
    scores = fisher_scores(model, batches)
    assert count == 7
    assert all(torch.equal(scores[name], sums[name] / 7) for name in sums)


def test_fisher_sums_of_two_clients_add_up_to_the_sums_of_their_union():
    model = tiny_vit(torch.float64)
    client_a, client_b = (
        image_batches(sizes=(5,), dtype=torch.float64, seed=1),
        image_batches(sizes=(4, 3), dtype=torch.float64, seed=2),
    )
    sums_a, count_a = fisher_sums(model, client_a, "true")
    sums_b, count_b = fisher_sums(model, client_b, "true")
    union, count = fisher_sums(model, client_a + client_b, "true")
    assert (count_a, count_b, count) == (5, 7, 12)
    for name in union:
        torch.testing.assert_close(sums_a[name] + sums_b[name], union[name], rtol=1e-12, atol=1e-30)


def test_fisher_scores_of_no_samples_are_refused():
    with pytest.raises(ConfigError, match="no samples"):
        fisher_scores(SoftmaxRegression(), [])


# ========================================================== Fisher: sampled labels


def constant_softmax_model(probabilities: list[float]) -> SoftmaxRegression:
    """p(y|x) = `probabilities` for every x (zero weight, bias = log p)."""
    model = SoftmaxRegression(in_features=2, classes=len(probabilities))
    with torch.no_grad():
        model.linear.weight.zero_()
        model.linear.bias.copy_(torch.tensor(probabilities, dtype=torch.float64).log())
    return model


def test_sampled_labels_follow_the_model_so_the_bias_fisher_is_p_times_one_minus_p():
    probabilities = [0.6, 0.25, 0.1, 0.05]
    model = constant_softmax_model(probabilities)
    inputs = torch.randn(4000, 2, dtype=torch.float64)
    scores = fisher_scores(model, [(inputs, None)], "sampled", chunk_size=1000)
    p = torch.tensor(probabilities, dtype=torch.float64)
    # E_{y~p}[(1[y=j] - p_j)^2] = p_j (1 - p_j): the exact Fisher of a softmax bias.
    torch.testing.assert_close(scores["linear.bias"], p * (1 - p), rtol=0, atol=0.02)


def test_a_peaked_model_always_samples_its_class_while_true_labels_are_the_given_ones():
    model = constant_softmax_model([1e-15, 1.0, 1e-15, 1e-15])
    inputs = torch.randn(50, 2, dtype=torch.float64)
    given = torch.full((50,), 3)
    sampled = fisher_scores(model, [(inputs, given)], "sampled")
    assert sampled["linear.bias"].max() < 1e-20  # y = 1 every time: gradient (e_1 - p) ~ 0
    true = fisher_scores(model, [(inputs, given)], "true")
    torch.testing.assert_close(true["linear.bias"], torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64))


def test_label_sampling_is_deterministic_given_the_generator():
    model = tiny_vit()
    batches = image_batches()
    first, again, other = (scores_with(fisher_sums, model, batches, "sampled", seed=s) for s in (3, 3, 4))
    default, default_again = fisher_scores(model, batches), fisher_scores(model, batches)
    for name in first:
        assert torch.equal(first[name], again[name])
        assert torch.equal(default[name], default_again[name])
    assert any(not torch.equal(first[n], other[n]) for n in first)


# ====================================================== Fisher: leaves model alone


@pytest.mark.parametrize("fisher_function", FISHER_FUNCTIONS)
def test_scoring_leaves_weights_grads_flags_and_modes_exactly_as_they_were(fisher_function):
    model = tiny_vit()
    model.train()
    model.blocks[1].eval()  # a mixed state must come back as it was, not as model.train()
    inputs, labels = image_batches(sizes=(4,))[0]
    F.cross_entropy(model(inputs), labels).backward()
    model.blocks[2].mlp.fc1.weight.grad = None
    model.head.weight.requires_grad_(False)
    before = snapshot(model)
    fisher_function(model, image_batches(), chunk_size=5)
    after = snapshot(model)
    assert_bit_identical(before["weights"], after["weights"])
    for name, grad in before["grads"].items():
        assert (grad is None) == (after["grads"][name] is None), name
        assert grad is None or torch.equal(grad, after["grads"][name]), name
    for key in ("requires_grad", "training", "fused_attn"):
        assert after[key] == before[key], key


# ==================================================================== calibration


@pytest.mark.parametrize("rounds", [1, 3])
@pytest.mark.parametrize("sparsity", [0.1, 0.37, 0.9])
@pytest.mark.parametrize("rule", RULES)
def test_achieved_sparsity_is_the_target_within_one_entry(rule, sparsity, rounds):
    model = ToyParameters()
    result = calibrate(model, lambda m: toy_scores(), rule, sparsity, rounds=rounds)
    total = 18
    assert count_trainable(result.masks) == round((1 - sparsity) * total)
    assert result.achieved_sparsity == pytest.approx(mask_sparsity(result.masks))
    assert abs(result.achieved_sparsity - sparsity) <= 1 / total
    assert list(result.masks) == ["first", "second"]  # the head is not eligible by default
    assert all(mask.dtype == torch.bool for mask in result.masks.values())


def test_kept_count_after_each_round_is_round_of_d_to_the_r_over_R_times_N():
    model, originals = ToyParameters(), flat(dict(ToyParameters().named_parameters())).detach()
    frozen_counts = []

    def recording_scores(current):
        weights = flat(dict(current.named_parameters())).detach()
        frozen_counts.append(int((weights != originals).sum()))
        return toy_scores()

    result = calibrate(model, recording_scores, "least_sensitive", 0.8, rounds=4)
    kept = [round(0.2 ** (r / 4) * 18) for r in (1, 2, 3, 4)]
    assert frozen_counts == [0] + [18 - k for k in kept[:3]]
    assert result.densities == [k / 18 for k in kept]
    assert count_trainable(result.masks) == kept[-1]


def test_least_and_most_sensitive_are_complements_at_half_sparsity():
    least = calibrate(ToyParameters(), lambda m: toy_scores(), "least_sensitive", 0.5).masks
    most = calibrate(ToyParameters(), lambda m: toy_scores(), "most_sensitive", 0.5).masks
    for name in least:
        assert torch.equal(least[name], ~most[name]), name


def test_lowest_and_highest_magnitude_are_complements_at_half_sparsity():
    lowest = calibrate(ToyParameters(), never_called, "lowest_magnitude", 0.5).masks
    highest = calibrate(ToyParameters(), never_called, "highest_magnitude", 0.5).masks
    for name in lowest:
        assert torch.equal(lowest[name], ~highest[name]), name


def test_least_sensitive_keeps_the_lowest_fisher_scores_trainable():
    model = ToyParameters()
    masks = calibrate(model, lambda m: toy_scores(), "least_sensitive", 0.5).masks
    assert torch.equal(flat(masks), lowest_k(flat(toy_scores()), 9))


def test_magnitude_rules_rank_weights_not_fisher_scores():
    model = ToyParameters()
    weights = {n: p.detach() for n, p in model.named_parameters()}

    def inverse_fisher(model):  # the opposite order
        return {n: 1.0 / weights[n].abs() for n in ("first", "second")}

    lowest = calibrate(model, never_called, "lowest_magnitude", 0.5).masks
    expected = lowest_k(flat(weights).abs(), 9)
    assert torch.equal(flat(lowest), expected)
    by_fisher = calibrate(model, inverse_fisher, "least_sensitive", 0.5).masks
    assert not torch.equal(flat(by_fisher), expected)


def test_the_threshold_is_global_so_a_uniformly_more_sensitive_tensor_freezes_first():
    scores = toy_scores()
    scores["first"] = scores["first"] + 10.0  # every entry above every entry of `second`
    masks = calibrate(ToyParameters(), lambda m: scores, "least_sensitive", 0.5).masks
    assert masks["second"].all()
    assert int(masks["first"].sum()) == 3  # 9 kept: all 6 of `second`, the 3 lowest of `first`
    assert torch.equal(masks["first"].reshape(-1), lowest_k(scores["first"].reshape(-1), 3))


def test_entries_frozen_in_an_earlier_round_never_come_back():
    first_round = toy_scores()
    kept_after_round_1 = lowest_k(flat(first_round), round(0.5**0.5 * 18))
    calls = []

    def scores_that_tempt_frozen_entries_back(model):
        calls.append(1)
        if len(calls) == 1:
            return first_round
        tempting = flat(first_round).clone()
        tempting[~kept_after_round_1] = 0.0  # the lowest score there is
        return {"first": tempting[:12].reshape(3, 4), "second": tempting[12:]}

    result = calibrate(
        ToyParameters(), scores_that_tempt_frozen_entries_back, "least_sensitive", 0.5, rounds=2
    )
    masks = result.masks
    kept = flat(masks)
    assert int(kept.sum()) == 9
    assert not (kept & ~kept_after_round_1).any()


def test_attenuation_scales_frozen_weights_by_a_tenth_only_in_rounds_after_the_first():
    model = ToyParameters()
    originals = flat(dict(model.named_parameters())).detach().clone()
    seen = []

    def recording_scores(current):
        seen.append(flat(dict(current.named_parameters())).detach().clone())
        return toy_scores()

    calibrate(model, recording_scores, "least_sensitive", 0.7, rounds=3)
    assert ATTENUATION == 0.1  # TaLoS
    assert torch.equal(seen[0], originals)
    for round_index in (2, 3):
        kept = lowest_k(flat(toy_scores()), round(0.3 ** ((round_index - 1) / 3) * 18))
        expected = torch.where(kept, originals, originals * ATTENUATION)  # x original, not compounded
        assert torch.equal(seen[round_index - 1], expected), round_index


def test_weights_are_bit_identical_after_multi_round_calibration():
    model = tiny_vit()
    before = snapshot(model)["weights"]
    calibrate_masks(model, image_batches(sizes=(8,)), "least_sensitive", 0.8, rounds=3)
    assert_bit_identical(before, snapshot(model)["weights"])


def test_weights_are_restored_when_score_fn_raises_midway():
    model = ToyParameters()
    before = snapshot(model)["weights"]
    calls = []

    def failing_in_round_2(current):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("client dropped out")
        return toy_scores()

    with pytest.raises(RuntimeError, match="client dropped out"):
        calibrate(model, failing_in_round_2, "least_sensitive", 0.5, rounds=3)
    assert_bit_identical(before, snapshot(model)["weights"])


def test_random_masks_are_identical_for_a_seed_and_differ_across_seeds():
    def random_mask(seed):
        return flat(calibrate(ToyParameters(), never_called, "random", 0.5, rounds=2, seed=seed).masks)

    assert torch.equal(random_mask(0), random_mask(0))
    assert not torch.equal(random_mask(0), random_mask(1))


def test_more_rounds_change_the_mask_because_attenuation_changes_the_fisher():
    model = tiny_vit()
    batches = image_batches(sizes=(16,))
    one_round = calibrate_masks(model, batches, "least_sensitive", 0.9, rounds=1)
    four_rounds = calibrate_masks(model, batches, "least_sensitive", 0.9, rounds=4)
    assert count_trainable(one_round) == count_trainable(four_rounds)
    assert any(not torch.equal(one_round[n], four_rounds[n]) for n in one_round)


def test_calibrate_masks_is_deterministic_and_covers_the_backbone_only():
    model = tiny_vit()
    batches = image_batches(sizes=(8,))
    first = calibrate_masks(model, batches, "least_sensitive", 0.5, rounds=2, seed=7)
    again = calibrate_masks(model, batches, "least_sensitive", 0.5, rounds=2, seed=7)
    assert list(first) == backbone_parameter_names(model)
    assert all(torch.equal(first[n], again[n]) for n in first)


def test_sparsity_zero_gives_all_true_masks_without_scoring():
    result = calibrate(ToyParameters(), never_called, "least_sensitive", 0.0, rounds=2)
    assert all(mask.all() for mask in result.masks.values())
    assert result.achieved_sparsity == 0.0


def test_ties_are_broken_by_position_deterministically():
    equal = {"first": torch.ones(3, 4), "second": torch.ones(6)}
    masks = calibrate(ToyParameters(), lambda m: equal, "least_sensitive", 0.5).masks
    assert torch.equal(flat(masks), torch.arange(18) < 9)


def test_thresholds_are_boundary_scores_in_the_rules_own_units():
    scores = flat(toy_scores())
    least = calibrate(ToyParameters(), lambda m: toy_scores(), "least_sensitive", 0.5)
    most = calibrate(ToyParameters(), lambda m: toy_scores(), "most_sensitive", 0.5)
    assert least.thresholds == [pytest.approx(scores[flat(least.masks)].max().item())]
    assert most.thresholds == [pytest.approx(scores[flat(most.masks)].min().item())]


def test_non_finite_fisher_scores_are_refused_naming_the_parameter():
    scores = toy_scores()
    scores["second"][2] = math.nan
    with pytest.raises(ValueError, match="non-finite.*second"):
        calibrate(ToyParameters(), lambda m: scores, "least_sensitive", 0.5)


# ===================================================================== bad inputs

BAD_CALIBRATION_INPUTS = [
    ("rule", dict(rule="smallest")),
    ("sparsity", dict(sparsity=1.0)),
    ("sparsity", dict(sparsity=-0.1)),
    ("sparsity", dict(sparsity="0.5")),
    ("rounds", dict(rounds=0)),
    ("label_mode", dict(label_mode="foo", rule="random")),  # checked even when no Fisher is needed
    ("chunk_size", dict(chunk_size=0)),
    ("param_names", dict(param_names=["blocks.0.attn.qkv.weight", "no.such.weight"])),
]


@pytest.mark.parametrize(
    "parameter, overrides",
    BAD_CALIBRATION_INPUTS,
    ids=[f"{p}={list(o.values())[0]!r}" for p, o in BAD_CALIBRATION_INPUTS],
)
def test_calibrate_masks_refuses_bad_input_naming_the_parameter(parameter, overrides):
    arguments = dict(rule="least_sensitive", sparsity=0.5) | overrides
    with pytest.raises(ConfigError, match=parameter):
        calibrate_masks(tiny_vit(), image_batches(sizes=(2,)), **arguments)


def test_calibrate_masks_refuses_a_one_shot_generator_of_batches():
    batches = (batch for batch in image_batches(sizes=(2,)))
    with pytest.raises(ConfigError, match="batches"):
        calibrate_masks(tiny_vit(), batches, "least_sensitive", 0.5, rounds=2)


@pytest.mark.parametrize(
    "parameter, overrides",
    [
        ("label_mode", dict(label_mode="foo")),
        ("chunk_size", dict(chunk_size=0)),
        ("chunk_size", dict(chunk_size=2.5)),
        ("no.such.weight", dict(param_names=["no.such.weight"])),
    ],
)
def test_fisher_scores_refuses_bad_input_naming_the_parameter(parameter, overrides):
    with pytest.raises(ConfigError, match=parameter):
        fisher_scores(tiny_vit(), image_batches(sizes=(2,)), **overrides)


def test_config_errors_are_value_errors():
    assert issubclass(ConfigError, ValueError)
