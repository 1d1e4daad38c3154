"""Classification weights in their other layouts: timm's Hugging Face Hub repositories (offline, from a cache
folder built here), mmpretrain's converted checkpoints and the DINO backbones."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import xcit
from xcit.models.weights import CheckpointError

LAYOUTS = Path(__file__).resolve().parents[1] / "reference" / "layouts"
REPO = "timm/xcit_nano_12_p16_224.fb_in1k"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face Hub cache holding timm's nano repository (random weights in timm's key layout), offline mode on."""
    import timm
    from huggingface_hub import constants
    from safetensors.torch import save_file

    reference = timm.create_model("xcit_nano_12_p16_224", pretrained=False).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    rev = "0123456789abcdef0123456789abcdef01234567"
    root = tmp_path / "hf" / ("models--" + REPO.replace("/", "--"))
    snap = root / "snapshots" / rev
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, snap / "model.safetensors")
    (snap / "config.json").write_text(json.dumps({"architecture": "xcit_nano_12_p16_224", "num_classes": 1000}))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(rev)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return reference


def test_hub_weights_load_offline_from_the_cache_and_match_timm(hub_cache):
    model = xcit.create_model(f"hf-hub:{REPO}", pretrained=True).eval()
    assert model.model_name == "xcit_nano_12_p16"
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model(x), hub_cache(x), atol=1e-4, rtol=1e-4)


def test_hub_weights_for_the_pyramid_and_the_pretrained_option(hub_cache):
    pyramid = xcit.create_pyramid(f"hf-hub:{REPO}", pretrained=True)
    backbone = xcit.create_pyramid(checkpoint=f"hf-hub:{REPO}")  # what --pretrained of `xcit segment/detect train` calls
    timm_state = hub_cache.state_dict()
    from xcit.inference.loading import load_for_inference

    inference = load_for_inference(f"hf-hub:{REPO}")  # what `xcit predict --checkpoint hf-hub:...` calls
    assert len(inference.classes) == 1000 and inference.img_size == (224, 224)
    for net in (pyramid, backbone):
        assert torch.equal(net.state_dict()["pos_embeder.token_projection.weight"], timm_state["pos_embed.token_projection.weight"])
        assert torch.equal(net.state_dict()["blocks.11.attn.qkv.weight"], timm_state["blocks.11.attn.qkv.weight"])


def test_hub_repository_missing_from_the_offline_cache_fails_at_once(hub_cache):
    with pytest.raises(RuntimeError, match=r"timm/xcit_tiny_12_p8_224\.fb_in1k.*HF_HUB_OFFLINE=1.*huggingface-cli download"):
        xcit.create_model("hf-hub:timm/xcit_tiny_12_p8_224.fb_in1k", pretrained=True)


def test_mmpretrain_checkpoint_loads_every_key(tmp_path):
    """A file in mmpretrain's layout (keys and shapes from reference/layouts/mmpretrain_xcit.json)."""
    layout = json.loads((LAYOUTS / "mmpretrain_xcit.json").read_text())["configs"]["xcit-nano-12-p16"]
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.tensor(7) if k.endswith("num_batches_tracked") else torch.randn(s, generator=g)) for k, s in layout["state_dict"]}
    torch.save({"meta": {"mmpretrain_version": "1.0.0"}, "state_dict": state}, tmp_path / "xcit-nano-12-p16_3rdparty_in1k.pth")
    model = xcit.create_model(checkpoint=tmp_path / "xcit-nano-12-p16_3rdparty_in1k.pth")  # strict: every key used
    assert model.model_name == "xcit_nano_12_p16" and model.num_classes == 1000
    own = model.state_dict()
    pairs = {
        "patch_embed.proj.2.0.weight": "backbone.patch_embed.proj.1.conv.weight",
        "patch_embed.proj.6.1.running_var": "backbone.patch_embed.proj.3.bn.running_var",
        "pos_embeder.token_projection.bias": "backbone.pos_embed.token_projection.conv.bias",
        "blocks.3.local_mp.bn.weight": "backbone.xca_layers.3.local_mp.conv1.bn.weight",
        "blocks.3.local_mp.conv2.weight": "backbone.xca_layers.3.local_mp.conv2.conv.weight",
        "blocks.5.mlp.fc1.weight": "backbone.xca_layers.5.ffn.layers.0.0.weight",
        "blocks.5.mlp.fc2.bias": "backbone.xca_layers.5.ffn.layers.1.bias",
        "blocks.7.gamma3": "backbone.xca_layers.7.gamma3",
        "cls_attn_blocks.1.mlp.fc2.weight": "backbone.ca_layers.1.ffn.layers.1.weight",
        "norm.weight": "backbone.norm.weight", "head.bias": "head.fc.bias", "cls_token": "backbone.cls_token",
    }
    for ours, theirs in pairs.items():
        assert torch.equal(own[ours], state[theirs]), ours
    qkv = torch.cat([state[f"backbone.ca_layers.0.attn.{q}.weight"] for q in "qkv"])
    assert torch.equal(own["cls_attn_blocks.0.attn.qkv.weight"], qkv)


def test_mmpretrain_checkpoint_with_foreign_keys_is_refused(tmp_path):
    state = {"backbone.xca_layers.0.norm1.weight": torch.ones(128), "backbone.some_adapter.weight": torch.ones(2)}
    torch.save({"state_dict": state}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="mmpretrain XCiT.*backbone.some_adapter.weight"):
        xcit.create_model(checkpoint=tmp_path / "x.pth")


def test_dino_backbone_by_name_from_a_mirror(tmp_path, monkeypatch):
    """dino_xcit_*: DINO's hubconf loads these raw teacher state dicts strictly into xcit with num_classes=0."""
    source = xcit.create_model("xcit_small_12_p16", num_classes=0)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    torch.save(source.state_dict(), mirror / "dino_xcit_small_12_p16_pretrain.pth")
    monkeypatch.setenv("XCIT_WEIGHTS_URL", mirror.as_uri())
    torch.hub.set_dir(str(tmp_path / "hub"))
    model = xcit.create_model("dino_xcit_small_12_p16", pretrained=True)
    assert (tmp_path / "hub" / "checkpoints" / "dino_xcit_small_12_p16_pretrain.pth").is_file()
    assert model.num_classes == 0 and model.model_name == "xcit_small_12_p16"
    assert torch.equal(model.state_dict()["blocks.11.attn.qkv.weight"], source.state_dict()["blocks.11.attn.qkv.weight"])


def test_dino_release_urls():
    from xcit.models.hub import release_file_url

    assert release_file_url("dino_xcit_medium_24_p8") == (
        "https://dl.fbaipublicfiles.com/dino/dino_xcit_medium_24_p8_pretrain/dino_xcit_medium_24_p8_pretrain.pth")
    assert release_file_url("maskrcnn_xcit_small_24_p8") == "https://dl.fbaipublicfiles.com/xcit/coco/maskrcnn_xcit_small_24_p8.pth"
    assert release_file_url("sem_fpn_xcit_medium_24_p16") == "https://dl.fbaipublicfiles.com/xcit/ade/sem_fpn_xcit_medium_24_p16.pth"
    assert release_file_url("xcit_small_12_p16") is None


def test_unreachable_hub_fails_at_once(tmp_path, monkeypatch):
    """Online mode, nothing cached, the endpoint unreachable: an error naming the file at once, from the
    connection probe (ConnectionRefusedError) rather than after the client's retries (~30 s)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(RuntimeError, match=r"model\.safetensors of the Hugging Face Hub repository 'timm/xcit_nano") as err:
        xcit.create_model(f"hf-hub:{REPO}", pretrained=True)
    assert isinstance(err.value.__cause__, ConnectionRefusedError)
