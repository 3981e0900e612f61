"""Models: tiny_vit, DINO ViT-S/16 from a local file, timm, or torch.hub (all offline here); precision."""

from types import SimpleNamespace

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import checkpoint_filter_fn

from fedta_utils import models
from fedta_utils.checks import ConfigError
from fedta_utils.fedavg import FedAvgConfig
from fedta_utils.models import build_model
from fedta_utils.prepare import FineTuneSpec
from fedta_utils.training import CentralizedConfig


@pytest.fixture(scope="module")
def dino_like_state():
    """A random ViT-S/16 backbone state dict with DINO's parameter names (no head)."""
    model = timm.create_model(models.TIMM_DINO, pretrained=False, num_classes=0)
    return {k: v.clone() for k, v in model.state_dict().items()}


def backbone_equals(model, state):
    own = model.state_dict()
    return all(torch.equal(own[k], v) for k, v in state.items() if not k.startswith("head"))


def test_tiny_vit_classifies_32px_images_with_a_fixed_backbone():
    first, second = build_model("tiny_vit", 100, head_seed=1), build_model("tiny_vit", 100, head_seed=2)
    assert first(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    assert backbone_equals(first, second.state_dict())
    assert not torch.equal(first.head.weight, second.head.weight)


def test_head_is_drawn_from_its_seed_alone():
    first, again = build_model("tiny_vit", 10, head_seed=4), build_model("tiny_vit", 10, head_seed=4)
    assert torch.equal(first.head.weight, again.head.weight)
    assert torch.count_nonzero(first.head.bias) == 0
    assert first.head.weight.std().item() == pytest.approx(models.HEAD_INIT_STD, rel=0.2)


def test_parameter_name_helpers_split_head_and_backbone():
    model = build_model("tiny_vit", 10)
    assert models.head_parameter_names(model) == ["head.weight", "head.bias"]
    assert "cls_token" in models.backbone_parameter_names(model)
    assert len(models.head_parameter_names(model)) + len(models.backbone_parameter_names(model)) == len(
        list(model.parameters())
    )


def test_dino_weights_load_from_a_local_dino_checkpoint(tmp_path, dino_like_state):
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in dino_like_state.items()}}, path)
    model = build_model("dino_vits16", 100, weights_path=path)
    assert backbone_equals(model, dino_like_state)
    assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 100)


def test_torch_hub_is_the_fallback_when_timm_cannot_download(monkeypatch, dino_like_state):
    real_create = timm.create_model

    def offline_create(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("offline")
        return real_create(name, pretrained=False, **kwargs)

    class HubModel(torch.nn.Module):
        def state_dict(self, *args, **kwargs):
            return dino_like_state

    calls = []
    monkeypatch.setattr(models.timm, "create_model", offline_create)
    monkeypatch.setattr(
        models.torch.hub, "load", lambda repo, name, **kw: calls.append((repo, name)) or HubModel()
    )
    model = build_model("dino_vits16", 100)
    assert calls == [(models.HUB_REPO, models.HUB_MODEL)]
    assert backbone_equals(model, dino_like_state)


def test_a_clear_error_names_weights_path_when_every_source_fails(monkeypatch):
    real_create = timm.create_model

    def offline_create(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("no route to huggingface.co")
        return real_create(name, pretrained=False, **kwargs)

    def offline_hub(*args, **kwargs):
        raise OSError("no route to github.com")

    monkeypatch.setattr(models.timm, "create_model", offline_create)
    monkeypatch.setattr(models.torch.hub, "load", offline_hub)
    with pytest.raises(RuntimeError, match="(?s)huggingface.co.*github.com.*weights_path"):
        build_model("dino_vits16", 100)


def test_a_wrong_weights_file_is_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3)}, path)
    with pytest.raises(ConfigError, match="do not fit ViT-S/16"):
        build_model("dino_vits16", 100, weights_path=path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "resnet50"}, "model='resnet50'"),
        ({"num_classes": 1}, "num_classes"),
        ({"weights_path": "/nonexistent/dino.pth"}, "weights_path"),
        ({"name": "dino_vits16", "img_size": 150}, "img_size=150 .*multiple of 16"),
        ({"name": "dino_vits16", "img_size": 0}, "img_size=0 is too small"),
        ({"name": "dino_vits16", "img_size": "160"}, "img_size must be an integer"),
        ({"img_size": 30}, "img_size=30 .*multiple of 4"),
    ],
)
def test_build_model_rejects_bad_arguments(kwargs, message):
    arguments = {"name": "tiny_vit", "num_classes": 10, "pretrained": False, **kwargs}
    with pytest.raises(ConfigError, match=message):
        build_model(**arguments)


# ------------------------------------------------------------------ input size


def test_input_size_is_native_unless_asked():
    assert models.input_size("dino_vits16") == 224 and models.input_size("tiny_vit") == 32
    assert models.input_size("dino_vits16", 160) == 160 and models.input_size("tiny_vit", 64) == 64


def test_dino_at_160_px_has_a_10x10_grid_and_classifies_160_px_images():
    model = build_model("dino_vits16", 10, pretrained=False, img_size=160)
    assert model.pos_embed.shape == (1, 10 * 10 + 1, 384)
    assert model(torch.zeros(1, 3, 160, 160)).shape == (1, 10)


def test_tiny_vit_runs_at_another_multiple_of_its_patch_size():
    assert build_model("tiny_vit", 10, img_size=64)(torch.zeros(2, 3, 64, 64)).shape == (2, 10)


def test_a_224_backbone_loads_into_a_160_model_with_resampled_position_embeddings(dino_like_state):
    model = build_model("dino_vits16", 10, pretrained=False, img_size=160)
    models.load_backbone_state(model, {f"backbone.{k}": v for k, v in dino_like_state.items()})
    stored = dino_like_state["pos_embed"]
    timm_loaded = checkpoint_filter_fn(dict(dino_like_state), model)["pos_embed"]  # what pretrained=True gets
    assert torch.allclose(model.pos_embed, timm_loaded, rtol=0, atol=1e-6)
    assert torch.allclose(
        model.pos_embed, resample_abs_pos_embed(stored, [10, 10], num_prefix_tokens=1), rtol=0, atol=1e-6
    )
    assert torch.equal(model.pos_embed[:, 0], stored[:, 0])  # the class token's embedding is kept
    assert backbone_equals(model, {k: v for k, v in dino_like_state.items() if k != "pos_embed"})


@pytest.mark.parametrize("key", ["blocks.0.attn.qkv.weight", "pos_embed"])
def test_any_other_shape_mismatch_still_fails_at_another_size(dino_like_state, key):
    model = build_model("dino_vits16", 10, pretrained=False, img_size=160)
    state = {**dino_like_state, key: dino_like_state[key][..., :100]}  # pos_embed: wrong width, not grid
    with pytest.raises(ConfigError, match=f"wrong shape \\['{key}'\\]"):
        models.load_backbone_state(model, state)


@pytest.mark.parametrize("config_class", [CentralizedConfig, FedAvgConfig])
def test_run_identity_holds_the_resolved_size(config_class):
    native = config_class().to_dict()
    assert native == config_class(img_size=224).to_dict() and native["img_size"] == 224
    assert config_class(img_size=160).to_dict() != native
    assert config_class(model="tiny_vit").to_dict()["img_size"] == 32
    with pytest.raises(ConfigError, match="img_size=150"):
        config_class(img_size=150)
    with pytest.raises(ConfigError, match="img_size=30"):
        config_class(model="tiny_vit", img_size=30)


def test_a_ridge_head_fitted_at_one_size_is_not_shared_with_another(tmp_path):
    ws, ridge = SimpleNamespace(root=tmp_path, weights_path=None, device="cpu"), FineTuneSpec(head="ridge")
    native = FedAvgConfig(finetune=ridge).head_cache(ws)
    assert native == FedAvgConfig(finetune=ridge, img_size=224).head_cache(ws)
    assert native != FedAvgConfig(finetune=ridge, img_size=160).head_cache(ws)


# ------------------------------------------------------------------ precision


def test_precision_is_fp32_on_a_cpu():
    assert models.resolve_precision("auto", "cpu") == "fp32"
    assert not models.grad_scaler("cpu", "fp32").is_enabled()


@pytest.mark.parametrize("capability, expected", [((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_precision_follows_the_gpu_generation(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert models.resolve_precision("auto", "cuda") == expected


def test_explicit_precision_is_kept_and_unknown_is_refused():
    assert models.resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ConfigError, match="precision='fp8'"):
        models.resolve_precision("fp8", "cpu")


def test_only_fp16_scales_the_loss_and_only_fp32_runs_without_autocast():
    assert models.grad_scaler("cpu", "fp16").is_enabled()
    assert not models.grad_scaler("cpu", "bf16").is_enabled()
    with models.autocast("cpu", "bf16"):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    with models.autocast("cpu", "fp32"):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32
