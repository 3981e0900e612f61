"""Data: loading, the stratified split, the on-device batch path, and the seeded random streams."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedta_utils.checks import ConfigError
from fedta_utils.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageSet,
    derive_seed,
    load_cifar100,
    load_or_create_split,
    make_batch,
    normalize_resize,
    numpy_rng,
    prepare_data,
    random_crop_flip,
    synthetic_cifar100,
    torch_generator,
    train_val_split,
)

# ------------------------------------------------------------------ split


def test_split_is_stratified_disjoint_and_complete(cifar_like_labels):
    labels = np.tile(np.arange(100), 500)  # CIFAR-100's official train set: 500 per class
    train_idx, val_idx = train_val_split(labels, 0.1, seed=0)
    assert len(train_idx) == 45_000 and len(val_idx) == 5_000
    assert len(np.intersect1d(train_idx, val_idx)) == 0
    assert np.array_equal(np.sort(np.concatenate([train_idx, val_idx])), np.arange(len(labels)))
    assert (np.bincount(labels[val_idx], minlength=100) == 50).all()


def test_split_is_deterministic_and_seed_dependent():
    labels = np.tile(np.arange(10), 100)
    first, again, other = (train_val_split(labels, 0.2, seed=s)[1] for s in (1, 1, 2))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, "0.1"])
def test_split_rejects_fractions_outside_the_open_unit_interval(fraction):
    with pytest.raises(ConfigError, match="val_fraction"):
        train_val_split(np.arange(10), fraction, seed=0)


def test_stored_split_is_reused_and_guards_against_other_parameters(tmp_path):
    labels = np.tile(np.arange(10), 50)
    path = tmp_path / "split.npz"
    first = load_or_create_split(labels, 0.1, 0, path)
    again = load_or_create_split(labels, 0.1, 0, path)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    with pytest.raises(ConfigError, match="split stored"):
        load_or_create_split(labels, 0.2, 0, path)


# ------------------------------------------------------------------ datasets


def test_synthetic_data_is_cifar_shaped_with_balanced_classes():
    train, test = synthetic_cifar100(num_train=1000, num_test=300)
    assert train.images.shape == (1000, 32, 32, 3) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and test.images.shape == (300, 32, 32, 3)
    assert np.bincount(train.labels.numpy(), minlength=100).tolist() == [10] * 100


def test_synthetic_classes_are_separable_by_their_mean_image():
    train, test = synthetic_cifar100(num_train=2000, num_test=500)
    means = torch.stack([train.images[train.labels == c].float().mean(0) for c in range(100)])
    distances = torch.cdist(test.images.float().flatten(1), means.flatten(1))
    accuracy = (distances.argmin(1) == test.labels).float().mean().item()
    assert 0.3 < accuracy < 1.0  # learnable, but not trivially


def test_prepare_data_splits_and_never_touches_test(small_data):
    assert len(small_data.train) == 1800 and len(small_data.val) == 200 and len(small_data.test) == 500
    assert small_data.num_classes == 100 and small_data.name == "synthetic"


def test_a_bundle_refuses_a_config_made_for_another_dataset(small_data):
    small_data.check_is("synthetic")
    with pytest.raises(ConfigError, match="config.dataset='cifar100' but the data passed in is 'synthetic'"):
        small_data.check_is("cifar100")


def test_prepare_data_rejects_unknown_datasets():
    with pytest.raises(ConfigError, match="dataset='cifar10'"):
        prepare_data("cifar10")


class FakeCIFAR100:
    """Stands in for torchvision's CIFAR100 with the same attributes."""

    def __init__(self, root, train, download):
        size = 50 if train else 20
        self.data = np.full((size, 32, 32, 3), 7, dtype=np.uint8)
        self.targets = list(np.arange(size) % 100)


def test_load_cifar100_keeps_one_uint8_tensor_and_int64_labels(monkeypatch, tmp_path):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", FakeCIFAR100)
    train, test = load_cifar100(tmp_path)
    assert train.images.shape == (50, 32, 32, 3) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and len(test) == 20


def test_missing_cifar_offline_names_data_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_dir=.*download=True"):
        load_cifar100(tmp_path / "nowhere", download=False)


# ------------------------------------------------------------------ batches


def reference_crop_flip(image, offset_y, offset_x, flip, padding=4):
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    crop = padded[offset_y : offset_y + image.shape[0], offset_x : offset_x + image.shape[1]]
    return crop[:, ::-1] if flip else crop


def test_random_crop_flip_matches_a_per_image_reference():
    images = torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8)
    generator = torch.Generator().manual_seed(5)
    out = random_crop_flip(images, generator)
    replay = torch.Generator().manual_seed(5)  # the same draws, in the same order
    offset_y = torch.randint(0, 9, (16,), generator=replay)
    offset_x = torch.randint(0, 9, (16,), generator=replay)
    flip = torch.rand(16, generator=replay) < 0.5
    for i in range(16):
        expected = reference_crop_flip(images[i].numpy(), int(offset_y[i]), int(offset_x[i]), bool(flip[i]))
        assert np.array_equal(out[i].numpy(), expected)


def test_augmentation_flips_and_shifts_some_images():
    images = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8)
    out = random_crop_flip(images, torch.Generator().manual_seed(0))
    changed = [(not torch.equal(a, b)) for a, b in zip(images, out)]
    assert 32 < sum(changed) <= 64


def test_batch_shapes_dtypes_and_normalisation(small_data):
    index = torch.arange(32)
    inputs, labels = make_batch(small_data.train, index, img_size=224)
    assert inputs.shape == (32, 3, 224, 224) and inputs.dtype == torch.float32
    assert labels.dtype == torch.int64 and torch.equal(labels, small_data.train.labels[:32])
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert inputs.min() >= ((0 - mean) / std).min() - 1e-5
    assert inputs.max() <= ((1 - mean) / std).max() + 1e-5


def test_normalising_before_resizing_equals_resizing_before_normalising():
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    ours = normalize_resize(images, 96)
    raw = images.permute(0, 3, 1, 2).float() / 255
    resized = F.interpolate(raw, size=96, mode="bilinear", align_corners=False)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    reference = (resized - mean) / std
    assert torch.allclose(ours, reference, atol=1e-5)


def test_evaluation_batches_are_never_augmented(small_data):
    index = torch.arange(16)
    first, _ = make_batch(small_data.val, index, 32)
    second, _ = make_batch(small_data.val, index, 32)
    assert torch.equal(first, second)
    assert torch.equal(first, normalize_resize(small_data.val.images[:16], 32))


def test_image_set_validates_its_tensors():
    with pytest.raises(ValueError, match="uint8"):
        ImageSet(torch.zeros(2, 32, 32, 3), torch.zeros(2, dtype=torch.int64))


# ------------------------------------------------------------------ random streams


def test_a_stream_is_fixed_by_its_seed_and_tags_alone():
    assert derive_seed(3, "clients", 7) == derive_seed(3, "clients", 7)
    seeds = {
        derive_seed(3, "clients", 7),
        derive_seed(4, "clients", 7),
        derive_seed(3, "clients", 8),
        derive_seed(3, "batches", 7),
        derive_seed(3, "clients", 7, 1),
    }
    assert len(seeds) == 5 and all(0 <= s < 2**63 for s in seeds)
    assert np.array_equal(numpy_rng(3, "x").permutation(50), numpy_rng(3, "x").permutation(50))


def test_torch_generators_draw_from_the_derived_seed():
    draws = torch.rand(5, generator=torch_generator(1, "head-init"))
    expected = torch.Generator().manual_seed(derive_seed(1, "head-init"))
    assert torch.equal(draws, torch.rand(5, generator=expected))


def test_negative_seed_tags_are_refused():
    with pytest.raises(ValueError, match="non-negative"):
        derive_seed(0, "round", -1)


def test_the_evaluation_subset_is_fixed_and_stratified(small_data):
    subset = small_data.eval_subset("test", 200)  # 500 test images, 100 classes: 2 per class
    assert torch.equal(torch.bincount(subset.labels, minlength=100), torch.full((100,), 2))
    again = small_data.eval_subset("test", 200)
    assert torch.equal(subset.images, again.images) and torch.equal(subset.labels, again.labels)
    assert small_data.eval_subset("val", 10_000) is small_data.val  # larger than the split: all of it
    assert len(small_data.eval_subset("val", 50)) == 100  # at least one image per class
