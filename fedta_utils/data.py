"""Images as device tensors: CIFAR-100 or a synthetic stand-in, splits, batches.

The whole dataset lives on the device as one uint8 tensor [N, 32, 32, 3]
(150 MB for CIFAR-100), and a batch is built there from an index tensor:
random crop with 4-pixel zero padding + horizontal flip (training only), then
ImageNet normalisation at 32x32, then a bilinear resize to the model's input
size. Normalising before resizing gives the same result as after (both are
per-channel affine maps and bilinear weights sum to one) at 1/49 of the cost
for 224x224 inputs. No DataLoader workers and no per-sample PIL calls: Colab
has two vCPUs, and the GPU does this in well under 5 % of a training step.
"""

from __future__ import annotations

import functools
import io
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checks import ConfigError, check_bool, check_choice, check_float, check_int
from .runs import atomic_write_bytes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_SIZE = 32
CIFAR100_CLASSES = 100
CROP_PADDING = 4  # pixels, the standard CIFAR augmentation
DATASETS = ("cifar100", "synthetic")


@dataclass
class ImageSet:
    """Images [N, H, W, 3] uint8 and labels [N] int64, on one device."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self):
        images = self.images
        labels = self.labels
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {list(images.shape)}")
        if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
            raise ValueError("labels must be int64 [N] aligned with images")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices) -> "ImageSet":
        index = torch.as_tensor(indices, dtype=torch.long, device=self.labels.device)
        return ImageSet(self.images[index], self.labels[index])

    def to(self, device) -> "ImageSet":
        return ImageSet(self.images.to(device), self.labels.to(device))


@dataclass
class DataBundle:
    """The three splits a run uses. `test` is only ever used for reporting."""

    name: str
    train: ImageSet
    val: ImageSet
    test: ImageSet
    num_classes: int

    @property
    def device(self) -> torch.device:
        return self.train.images.device

    def train_labels_numpy(self) -> np.ndarray:
        return self.train.labels.cpu().numpy()

    def eval_subset(self, split: str, size: int) -> ImageSet:
        """A fixed class-stratified subset of `split` ('val' or 'test'): size // classes images of every
        class (at least one), the same for every run and call; the whole split when size >= its length.
        Evaluations before a run's last one use it, so curves cost less; final numbers use the full split."""
        image_set = getattr(self, split)
        if size >= len(image_set):
            return image_set
        labels = image_set.labels.cpu().numpy()
        rng = numpy_rng(0, "eval-subset", split)  # seed 0: the same subset for every run
        order = rng.permutation(len(labels))
        shuffled = labels[order]
        per_class = max(1, size // self.num_classes)
        keep = np.concatenate([order[shuffled == c][:per_class] for c in range(self.num_classes)])
        return image_set.subset(np.sort(keep))

    def check_is(self, dataset: str) -> None:
        """Refuse to run a config made for another dataset than the one loaded."""
        if self.name != dataset:
            raise ConfigError(f"config.dataset={dataset!r} but the data passed in is {self.name!r}")


# --------------------------------------------------------------------------- random streams
# Every random choice of a run (split, shards, client sampling, batch order, augmentation, Fisher
# labels, head init) draws from a stream derived from (run seed, purpose, round, client, ...).
# Streams are recomputed from their tags rather than carried along, so a resumed run draws exactly
# what the killed run would have drawn, and runs that share a seed share e.g. the sampled clients.


def _tag_number(tag: int | str) -> int:
    """A stream tag as the integer SeedSequence takes: a string's CRC-32, a number itself."""
    if isinstance(tag, str):
        return zlib.crc32(tag.encode())
    return int(tag)


def derive_seed(seed: int, *tags: int | str) -> int:
    """A 63-bit seed for the stream named by `tags` under the run `seed`."""
    # The tag count goes first: SeedSequence pads with zeros, so (s, a) and (s, a, 0) would collide.
    entropy = [len(tags)] + [_tag_number(t) for t in (seed, *tags)]
    if min(entropy) < 0:
        raise ValueError(f"seed tags must be non-negative, got {(seed, *tags)}")
    sequence = np.random.SeedSequence(entropy)
    state = sequence.generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))  # torch.Generator.manual_seed wants < 2**63


def numpy_rng(seed: int, *tags: int | str) -> np.random.Generator:
    """A numpy Generator for the stream (seed, *tags)."""
    return np.random.default_rng(derive_seed(seed, *tags))


def torch_generator(
    seed: int,
    *tags: int | str,
    device: torch.device | str = "cpu",
) -> torch.Generator:
    """A torch.Generator on `device` for the stream (seed, *tags)."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, *tags))


# --------------------------------------------------------------------------- loading


def load_cifar100(root: str | Path, download: bool = False) -> tuple[ImageSet, ImageSet]:
    """CIFAR-100 (official train and test sets) through torchvision, on the CPU.

    Raises FileNotFoundError naming `data_dir` when the files are missing and
    `download` is False, or when the download fails (e.g. offline).
    """
    from torchvision.datasets import CIFAR100

    try:
        train = CIFAR100(str(root), train=True, download=download)
        test = CIFAR100(str(root), train=False, download=download)
    except (RuntimeError, OSError) as error:  # "Dataset not found or corrupted"; URLError when offline
        hint = "check the internet connection" if download else "set download=True (needs internet)"
        raise FileNotFoundError(
            f"CIFAR-100 is not available under data_dir={str(root)!r} ({error}); "
            f"{hint}, or point data_dir at a folder that holds cifar-100-python/"
        ) from error
    return _torchvision_image_set(train), _torchvision_image_set(test)


def _torchvision_image_set(split) -> ImageSet:
    """A torchvision CIFAR split (numpy images [N, 32, 32, 3], a list of labels) as an ImageSet."""
    images = np.ascontiguousarray(split.data, dtype=np.uint8)
    return ImageSet(torch.from_numpy(images), torch.as_tensor(split.targets, dtype=torch.int64))


def synthetic_cifar100(
    num_train: int = 50_000,
    num_test: int = 10_000,
) -> tuple[ImageSet, ImageSet]:
    """A CIFAR-shaped stand-in with a class structure a small ViT can learn.

    Each class owns a colour and a smooth colour pattern (a 4x4 grid
    upsampled to 32x32). An image is 40 % its class colour, 20 % its class
    pattern, 40 % a smooth pattern of its own, plus pixel noise. The colour
    survives crops and flips, so a tiny ViT trained from scratch climbs from
    1 % to about 35 % in five epochs on 1,800 images: curves that mean
    something, far from saturation (nearest-class-mean on pixels: ~94 %).
    Classes are balanced, as in CIFAR-100. Used by the smoke profile and the
    tests, never silently in place of the real data.
    """
    num_train = check_int("synthetic_train_size", num_train, minimum=CIFAR100_CLASSES)
    num_test = check_int("synthetic_test_size", num_test, minimum=CIFAR100_CLASSES)
    rng = numpy_rng(0, "synthetic-data")  # seed 0: one synthetic data set, as there is one CIFAR-100
    colour_values = rng.random((CIFAR100_CLASSES, 3), dtype=np.float32)
    colours = torch.from_numpy(colour_values)[:, :, None, None]  # [C, 3, 1, 1]: broadcast over pixels
    patterns = _smooth_patterns(rng, CIFAR100_CLASSES)
    train = _synthetic_split(rng, colours, patterns, num_train)
    test = _synthetic_split(rng, colours, patterns, num_test)
    return train, test


def _smooth_patterns(rng: np.random.Generator, count: int) -> torch.Tensor:
    coarse = rng.random((count, 3, 4, 4), dtype=np.float32)
    return F.interpolate(torch.from_numpy(coarse), size=CIFAR_SIZE, mode="bilinear")


def _synthetic_split(rng: np.random.Generator, colours, patterns, size: int) -> ImageSet:
    labels = np.arange(size) % len(patterns)  # balanced classes
    rng.shuffle(labels)
    images = []
    for chunk in torch.from_numpy(labels).split(4096):  # bounded memory for 50k images
        own = _smooth_patterns(rng, len(chunk))
        noise = rng.normal(0.0, 0.08, size=own.shape).astype(np.float32)
        mixed = 0.4 * colours[chunk] + 0.2 * patterns[chunk] + 0.4 * own + torch.from_numpy(noise)
        pixels = (mixed.clamp(0, 1) * 255).round().to(torch.uint8)
        images.append(pixels.permute(0, 2, 3, 1))  # channels last, as CIFAR stores them
    all_images = torch.cat(images).contiguous()
    return ImageSet(all_images, torch.from_numpy(labels.astype(np.int64)))


# --------------------------------------------------------------------------- splits


def train_val_split(labels, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, disjoint, deterministic split of positions into `labels`.

    Each class gives round(val_fraction * its size) samples to validation
    (CIFAR-100 at 0.1: 50 of 500 per class, 45,000 / 5,000). Returns two
    sorted int64 arrays that together cover every position exactly once.
    """
    labels = np.asarray(labels)
    check_float("val_fraction", val_fraction, 0.0, 1.0, low_open=True, high_open=True)
    check_int("seed", seed, minimum=0)
    rng = numpy_rng(seed, "train-val-split")
    val_parts = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        take = int(round(val_fraction * len(members)))
        val_parts.append(rng.permutation(members)[:take])
    val_idx = np.sort(np.concatenate(val_parts)).astype(np.int64)
    if len(val_idx) == 0:
        raise ConfigError(f"val_fraction={val_fraction:g} leaves no validation sample of {len(labels)}")
    train_idx = np.setdiff1d(np.arange(len(labels), dtype=np.int64), val_idx)
    return train_idx, val_idx


def load_or_create_split(
    labels,
    val_fraction: float,
    seed: int,
    path: Path,
) -> tuple[np.ndarray, np.ndarray]:
    """The split stored at `path` (created once), so every notebook uses the same one.

    The file records the parameters and a checksum of the labels; a stored
    split made for other data or other parameters is an error, not reused.
    """
    labels = np.asarray(labels)
    weights = np.arange(len(labels)) % 9973  # labels weighted by position: moving one changes the sum
    checksum = int(labels.astype(np.int64) @ weights)
    meta = {
        "val_fraction": float(val_fraction),
        "seed": int(seed),
        "num_samples": len(labels),
        "labels_checksum": checksum,
    }
    path = Path(path)
    if path.exists():
        with np.load(path) as stored:
            stored_meta = json.loads(str(stored["meta"]))
            if stored_meta != meta:
                raise ConfigError(
                    f"the split stored at {path} was made with {stored_meta}, not {meta}; "
                    "use another results_dir or delete that file to make a new split"
                )
            return stored["train_idx"], stored["val_idx"]
    train_idx, val_idx = train_val_split(labels, val_fraction, seed)
    buffer = io.BytesIO()
    np.savez(buffer, train_idx=train_idx, val_idx=val_idx, meta=json.dumps(meta))
    atomic_write_bytes(path, buffer.getvalue())
    return train_idx, val_idx


def prepare_data(
    dataset: str = "cifar100",
    data_dir: str | Path = "data",
    download: bool = False,
    val_fraction: float = 0.1,
    *,
    split_seed: int = 0,
    split_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    synthetic_train_size: int = 50_000,
    synthetic_test_size: int = 10_000,
) -> DataBundle:
    """Load `dataset`, split train into train/val, and move everything to `device`.

    With `split_dir`, the split is stored there (load_or_create_split), one file per dataset, val_fraction
    and split_seed, so every notebook of a results folder uses the same one.
    """
    check_choice("dataset", dataset, DATASETS)
    check_float("val_fraction", val_fraction, 0.0, 1.0, low_open=True, high_open=True)
    check_int("split_seed", split_seed, minimum=0)
    check_bool("download", download)
    if dataset == "cifar100":
        full_train, test = load_cifar100(data_dir, download)
    else:
        full_train, test = synthetic_cifar100(synthetic_train_size, synthetic_test_size)
    labels = full_train.labels.numpy()
    if split_dir is None:
        train_idx, val_idx = train_val_split(labels, val_fraction, split_seed)
    else:
        split_path = Path(split_dir) / f"{dataset}-val{val_fraction:g}-seed{split_seed}.npz"
        train_idx, val_idx = load_or_create_split(labels, val_fraction, split_seed, split_path)
    num_classes = int(labels.max()) + 1
    train = full_train.subset(train_idx).to(device)
    val = full_train.subset(val_idx).to(device)
    return DataBundle(dataset, train, val, test.to(device), num_classes)


# --------------------------------------------------------------------------- batches


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int = CROP_PADDING):
    """Random crop with zero padding and a random horizontal flip, per image.

    `images` is uint8 [B, H, W, C] on any device; one gather does both
    operations, so the cost is a single read of the batch.
    """
    batch, height, width, _ = images.shape
    device = images.device
    padded = F.pad(images, (0, 0, padding, padding, padding, padding))  # pads H and W, not channels
    offsets = 2 * padding + 1  # how many crop offsets: 0..2*padding pixels into the padded image
    offset_y = torch.randint(offsets, (batch,), generator=generator, device=device)
    offset_x = torch.randint(offsets, (batch,), generator=generator, device=device)
    flip = torch.rand(batch, generator=generator, device=device) < 0.5
    rows = offset_y[:, None] + torch.arange(height, device=device)
    columns = torch.arange(width, device=device)
    # [B, W]: a flip reads the columns backwards
    columns = torch.where(flip[:, None], columns.flip(0), columns)
    columns = columns + offset_x[:, None]
    batch_index = torch.arange(batch, device=device)[:, None, None]
    return padded[batch_index, rows[:, :, None], columns[:, None, :]]


@functools.cache
def _imagenet_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std as [1, 3, 1, 1] tensors on `device`, made once (no host copy per batch)."""
    stats = torch.tensor([IMAGENET_MEAN, IMAGENET_STD], device=device)
    return stats.view(2, 1, 3, 1, 1).unbind()


def normalize_resize(images: torch.Tensor, img_size: int) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, img_size, img_size], ImageNet-normalised."""
    mean, std = _imagenet_stats(images.device)
    x = images.permute(0, 3, 1, 2).float().div_(255.0)  # [B, 3, H, W] in [0, 1]
    x = x.sub_(mean).div_(std)
    if x.shape[-2:] != (img_size, img_size):
        x = F.interpolate(x, size=img_size, mode="bilinear")  # align_corners=False, the default
    return x


def make_batch(
    image_set: ImageSet,
    index: torch.Tensor,
    img_size: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model inputs and labels for positions `index` of `image_set`.

    With a `generator` the batch is augmented (training); without one it is
    not (validation, test, Fisher scoring, feature extraction).
    """
    images = image_set.images[index]
    if generator is not None:
        images = random_crop_flip(images, generator)
    return normalize_resize(images, img_size), image_set.labels[index]


def epoch_batches(
    num_samples: int,
    batch_size: int,
    seed: int,
    *tags,
    device="cpu",
) -> list[torch.Tensor]:
    """Index tensors of one shuffled pass over `num_samples` (last batch may be short).

    The permutation comes from the stream (seed, *tags) and is moved to the
    device in one transfer.
    """
    order = numpy_rng(seed, *tags).permutation(num_samples)
    return list(torch.from_numpy(order).to(device).split(batch_size))


def sequential_batches(num_samples: int, batch_size: int, device="cpu") -> list[torch.Tensor]:
    """Index tensors 0..num_samples-1 in order, for evaluation."""
    positions = torch.arange(num_samples, device=device)
    return list(positions.split(batch_size))


def augmentation_generator(seed: int, *tags, device="cpu") -> torch.Generator:
    """The generator that draws crops and flips for the stream (seed, *tags)."""
    return torch_generator(seed, "augment", *tags, device=device)
