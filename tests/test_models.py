"""Models: tiny_vit, DINO ViT-S/16 from a local file, timm, or torch.hub (all offline here); precision."""

import pytest
import timm
import torch

from fedta_utils import models
from fedta_utils.checks import ConfigError
from fedta_utils.models import build_model


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
    assert len(models.head_parameter_names(model)) + len(models.backbone_parameter_names(model)) == \
        len(list(model.parameters()))


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
    monkeypatch.setattr(models.torch.hub, "load",
                        lambda repo, name, **kw: calls.append((repo, name)) or HubModel())
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


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "resnet50"}, "model='resnet50'"),
    ({"num_classes": 1}, "num_classes"),
    ({"weights_path": "/nonexistent/dino.pth"}, "weights_path"),
])
def test_build_model_rejects_bad_arguments(kwargs, message):
    arguments = {"name": "tiny_vit", "num_classes": 10, **kwargs}
    with pytest.raises(ConfigError, match=message):
        build_model(**arguments)


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
