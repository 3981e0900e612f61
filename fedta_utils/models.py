"""The models: DINO ViT-S/16 for the study, tiny_vit for the smoke profile and tests.

DINO ViT-S/16 weights come from, in order: a local file (`weights_path`, for
users whose hub access fails), timm's `vit_small_patch16_224.dino` (Hugging
Face hub), then torch.hub `facebookresearch/dino:main` `dino_vits16`. All three
give the same backbone (timm's ViT uses DINO's parameter names). A new linear
head of `num_classes` outputs is drawn from the run's seed.

Either model is built at `img_size` pixels (a multiple of its patch size; default its native
size). DINO at 160 px sees 101 instead of 197 tokens, about half the compute per image; its
pretrained position embeddings are resampled to the new patch grid (bicubic, as timm does when
it loads them itself), so the three sources still give the same backbone.

tiny_vit is a 4-block, 64-wide timm ViT on 32x32 inputs with 4x4 patches:
random, CPU-friendly, the same code paths. Its backbone is drawn from a fixed
seed, so, like the DINO weights, every run starts from the same backbone.

Precision is chosen from the hardware: bf16 where the GPU computes it natively
(compute capability >= 8.0), fp16 with a GradScaler on older GPUs such as
Colab's T4 (7.5), fp32 on a CPU. torch.cuda.is_bf16_supported() is not used: it
also answers True for emulated bf16, which is slow on a T4.
"""

from __future__ import annotations

import contextlib
import functools
import math
from pathlib import Path

import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .checks import ConfigError, check_bool, check_choice, check_int
from .data import torch_generator

MODELS = ("dino_vits16", "tiny_vit")
TIMM_DINO = "vit_small_patch16_224.dino"
HUB_REPO, HUB_MODEL = "facebookresearch/dino:main", "dino_vits16"
TINY_VIT = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0)
TINY_BACKBONE_SEED = 0
HEAD_INIT_STD = 0.01  # as in DINO's linear evaluation
HEAD_PREFIX = "head."
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# (native input size, patch size) in pixels
SIZES = {"dino_vits16": (224, 16), "tiny_vit": (TINY_VIT["img_size"], TINY_VIT["patch_size"])}


def input_size(name: str, img_size: int | None = None) -> int:
    """The square input resolution (pixels): `img_size`, a multiple of the patch size, or None = native."""
    check_choice("model", name, MODELS)
    native, patch = SIZES[name]
    if img_size is None:
        return native
    if check_int("img_size", img_size, minimum=patch) % patch:
        raise ConfigError(f"img_size={img_size} is not allowed for {name}: use a multiple of {patch} px")
    return img_size


def build_model(
    name: str = "dino_vits16",
    num_classes: int = 100,
    pretrained: bool = True,
    weights_path: str | Path | None = None,
    *,
    head_seed: int = 0,
    img_size: int | None = None,
) -> nn.Module:
    """A ViT classifier with a new `num_classes`-way linear head.

    name: 'dino_vits16' (DINO ViT-S/16, 224x224) or 'tiny_vit' (random, 32x32).
    pretrained: load the DINO weights (ignored by tiny_vit); False gives
        random weights of the same shape, e.g. for benchmarks offline.
    weights_path: a local DINO checkpoint (.pth / .pt / .safetensors) used
        instead of any download.
    head_seed: seed of the head's N(0, 0.01^2) initialisation.
    img_size: input pixels, a multiple of the patch size (16 DINO, 4 tiny_vit); None = native.
    """
    img_size = input_size(name, img_size)  # checks the model name first
    check_int("num_classes", num_classes, minimum=2)
    check_int("head_seed", head_seed, minimum=0)
    check_bool("pretrained", pretrained)
    if weights_path is not None and not Path(weights_path).is_file():
        raise ConfigError(f"weights_path={str(weights_path)!r} is not a file")
    if name == "tiny_vit":
        with torch.random.fork_rng(devices=[]):  # the same backbone in every build
            torch.manual_seed(TINY_BACKBONE_SEED)
            model = VisionTransformer(num_classes=num_classes, **{**TINY_VIT, "img_size": img_size})
    else:
        model = _dino_vits16(num_classes, pretrained, weights_path, img_size)
    reset_head(model, head_seed)
    return model


def _dino_vits16(num_classes: int, pretrained: bool, weights_path, img_size: int) -> nn.Module:
    create = functools.partial(timm.create_model, TIMM_DINO, num_classes=num_classes, img_size=img_size)
    if weights_path is not None or not pretrained:  # a local file, or random weights of the same shape
        with torch.random.fork_rng(
            devices=[]
        ):  # the same random weights in every build (a resumed run's too)
            torch.manual_seed(TINY_BACKBONE_SEED)
            model = create(pretrained=False)
        if weights_path is not None:
            load_backbone_state(model, read_state_dict(weights_path))
        return model
    try:
        # timm resamples the pretrained position embeddings to img_size's grid as it loads them
        return create(pretrained=True)
    except Exception as timm_error:  # offline, hub outage, missing huggingface_hub, ...
        first_failure = f"timm '{TIMM_DINO}': {type(timm_error).__name__}: {timm_error}"
    try:
        hub_model = torch.hub.load(HUB_REPO, HUB_MODEL, trust_repo=True)
    except Exception as hub_error:
        raise RuntimeError(
            "Could not load the DINO ViT-S/16 weights.\n"
            f"  1) {first_failure}\n"
            f"  2) torch.hub '{HUB_REPO}' '{HUB_MODEL}': {type(hub_error).__name__}: {hub_error}\n"
            "Download dino_deitsmall16_pretrain.pth (https://dl.fbaipublicfiles.com/dino/"
            "dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth) and pass weights_path=..."
        ) from hub_error
    model = create(pretrained=False)
    load_backbone_state(model, hub_model.state_dict())
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .pth/.pt (maybe wrapped in 'state_dict'/'model'/'teacher') or .safetensors."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "teacher"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def load_backbone_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a DINO/timm ViT-S/16 backbone into `model`; the head stays as it is.

    Prefixes written by DINO's training ('module.', 'backbone.') are stripped.
    Position embeddings on another square patch grid (a model built at another
    img_size) are resampled to the model's grid. Every other backbone parameter
    must be present with the right shape, so a wrong file fails loudly instead
    of training from a half-random model.
    """
    cleaned = {}
    for key, value in state.items():
        for prefix in ("module.", "backbone."):
            key = key.removeprefix(prefix)
        if not key.startswith(HEAD_PREFIX):
            cleaned[key] = value
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(HEAD_PREFIX)}
    old, new = cleaned.get("pos_embed"), expected.get("pos_embed")
    if old is not None and new is not None and old.dim() == 3 and old.shape[::2] == new.shape[::2]:
        grid = math.isqrt(old.shape[1] - 1)  # after the class token, a square grid of patches
        if grid * grid == old.shape[1] - 1:
            cleaned["pos_embed"] = resample_abs_pos_embed(
                old, list(model.patch_embed.grid_size), [grid, grid], num_prefix_tokens=1
            )
    missing = sorted(set(expected) - set(cleaned))
    wrong = sorted(k for k in expected if k in cleaned and cleaned[k].shape != expected[k].shape)
    if missing or wrong:
        raise ConfigError(
            f"the weights do not fit ViT-S/16: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"wrong shape {wrong[:5]}"
        )
    model.load_state_dict({k: cleaned[k] for k in expected}, strict=False)


def reset_head(model: nn.Module, seed: int) -> None:
    """Draw the linear head from N(0, 0.01^2) with zero bias, from `seed` alone."""
    head = model.get_classifier()
    generator = torch_generator(seed, "head-init")
    with torch.no_grad():
        weight = torch.randn(head.weight.shape, generator=generator) * HEAD_INIT_STD
        head.weight.copy_(weight)
        head.bias.zero_()


def head_parameter_names(model: nn.Module) -> list[str]:
    """Names (as in named_parameters) of the classifier head's parameters."""
    return [name for name, _ in model.named_parameters() if name.startswith(HEAD_PREFIX)]


def backbone_parameter_names(model: nn.Module) -> list[str]:
    """Names of every parameter except the head's: the default mask-eligible set."""
    return [name for name, _ in model.named_parameters() if not name.startswith(HEAD_PREFIX)]


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """'auto' -> 'bf16' | 'fp16' | 'fp32' for `device`; explicit choices pass through."""
    check_choice("precision", precision, PRECISIONS)
    device = torch.device(device)
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"


def autocast(device: torch.device | str, precision: str):
    """The forward pass's context under `precision` ('fp32' does nothing)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def grad_scaler(device: torch.device | str, precision: str) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 (bf16 and fp32 need no loss scaling)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")
