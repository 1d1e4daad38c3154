"""Feature API: tokens, head, intermediate maps, the dense pyramid, checkpointing, parameter groups."""
import pytest
import torch
from torch import nn

import xcit
from conftest import randomize, tiny_model
from xcit.models import XCiTPyramid, convert_sync_batchnorm, param_groups, revert_sync_batchnorm


def test_forward_head_and_pre_logits():
    model = randomize(tiny_model()).eval()
    x = torch.randn(2, 3, 24, 20)
    tokens = model.forward_features(x)
    assert tokens.shape == (2, 1 + 6 * 5, 32)
    pooled = model.forward_head(tokens, pre_logits=True)
    assert torch.equal(pooled, tokens[:, 0])
    assert torch.allclose(model.forward_head(tokens), model.head(pooled))
    assert torch.equal(model(x), model.forward_head(tokens))


def test_reset_classifier():
    model = tiny_model()
    model.reset_classifier(3)
    assert model.head.out_features == 3 and model(torch.randn(2, 3, 16, 16)).shape == (2, 3)
    model.reset_classifier(0)
    assert isinstance(model.head, nn.Identity) and model(torch.randn(2, 3, 16, 16)).shape == (2, 32)
    with pytest.raises(ValueError):
        model.reset_classifier(-1)


def test_intermediate_layers_are_block_outputs():
    model = randomize(tiny_model(depth=4)).eval()
    x = torch.randn(2, 3, 20, 28)
    maps = model.get_intermediate_layers(x, [3, 0, -3, 0])
    assert [m.shape for m in maps] == [(2, 32, 5, 7)] * 4 and maps[1] is maps[3]
    tokens, hp, wp = model.embed(x)
    outs = []
    for block in model.blocks:
        tokens = block(tokens, hp, wp)
        outs.append(tokens.transpose(1, 2).reshape(2, 32, hp, wp))
    assert torch.allclose(maps[0], outs[3]) and torch.allclose(maps[1], outs[0]) and torch.allclose(maps[2], outs[1])
    with pytest.raises(ValueError, match="out of range"):
        model.get_intermediate_layers(x, [4])


@pytest.mark.parametrize("name,size", [("xcit_nano_12_p16", (96, 160)), ("xcit_nano_12_p8", (72, 100)), ("xcit_tiny_24_p16", (64, 96))])
def test_pyramid_shapes_and_strides(name, size):
    pyramid = xcit.create_pyramid(name).eval()
    spec = xcit.MODELS[name]
    assert pyramid.out_indices == ([3, 5, 7, 11] if spec.depth == 12 else [7, 11, 15, 23])
    feats = pyramid(torch.randn(1, 3, *size))
    hp, wp = -(-size[0] // spec.patch_size), -(-size[1] // spec.patch_size)
    for (key, f), stride in zip(feats.items(), (4, 8, 16, 32)):
        scale = spec.patch_size / stride
        assert f.shape == (1, spec.embed_dim, int(hp * scale), int(wp * scale)), key
    assert list(feats) == ["0", "1", "2", "3"] and pyramid.out_channels == spec.embed_dim


def test_pyramid_follows_the_official_dense_layout():
    p16 = xcit.create_pyramid("xcit_nano_12_p16")
    keys = {k for k in p16.state_dict() if k.startswith("fpn")}
    assert {"fpn1.0.weight", "fpn1.1.running_mean", "fpn1.3.weight", "fpn2.0.weight"} <= keys
    assert isinstance(p16.fpn3, nn.Identity) and isinstance(p16.fpn4, nn.MaxPool2d)
    p8 = xcit.create_pyramid("xcit_nano_12_p8")
    assert isinstance(p8.fpn2, nn.Identity) and p8.fpn3.kernel_size == 2 and p8.fpn4.kernel_size == 4
    assert not any(k.startswith(("cls_token", "cls_attn_blocks", "norm.", "head.")) for k in p8.state_dict())


def test_pyramid_trunk_equals_classifier_blocks(tmp_path):
    model = randomize(xcit.create_model("xcit_nano_12_p16")).eval()
    path = xcit.save_checkpoint(model, tmp_path / "m.pth")
    pyramid = xcit.create_pyramid("xcit_nano_12_p16", checkpoint=path).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.allclose(pyramid(x)["2"], model.get_intermediate_layers(x, [7])[0], atol=1e-6)


def test_pyramid_plugs_into_torchvision_detection():
    from torchvision.models.detection import FasterRCNN
    from torchvision.ops import FeaturePyramidNetwork
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    pyramid = XCiTPyramid.from_classifier(tiny_model(patch_size=16, embed_dim=64, depth=4)).eval()

    class Backbone(nn.Module):  # the contract of torchvision's BackboneWithFPN
        def __init__(self):
            super().__init__()
            self.body = pyramid
            self.fpn = FeaturePyramidNetwork(pyramid.in_channels_list, 32, extra_blocks=LastLevelMaxPool())
            self.out_channels = 32

        def forward(self, x):
            return self.fpn(self.body(x))

    backbone = Backbone()
    detector = FasterRCNN(backbone, num_classes=3, min_size=64, max_size=96).eval()
    with torch.no_grad():
        assert list(backbone(torch.rand(1, 3, 64, 80))) == ["0", "1", "2", "3", "pool"]
        out = detector([torch.rand(3, 64, 80)])
    assert set(out[0]) == {"boxes", "labels", "scores"}


def test_gradient_checkpointing_changes_nothing():
    torch.manual_seed(0)
    a = randomize(tiny_model(depth=3, drop_path_rate=0.2)).train()
    b = randomize(tiny_model(depth=3, drop_path_rate=0.2)).train()
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(True)
    x = torch.randn(4, 3, 24, 24)
    torch.manual_seed(1)
    ya = a(x)
    ya.sum().backward()
    torch.manual_seed(1)
    yb = b(x)
    yb.sum().backward()
    assert torch.allclose(ya, yb, atol=1e-6)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6), n
    for (n, ba), bb in zip(a.named_buffers(), b.buffers()):  # BN statistics updated once, not twice
        assert torch.equal(ba, bb), n


def test_param_groups_default_matches_official_recipe():
    model = tiny_model()
    decay, keep = param_groups(model, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    keep_names = {names[id(p)] for p in keep["params"]}
    assert decay["weight_decay"] == 0.05 and keep["weight_decay"] == 0.0
    assert "blocks.0.attn.temperature" in decay_names  # the official recipe decays it
    assert {"cls_token", "blocks.0.gamma1", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"} <= keep_names
    assert {"blocks.0.attn.qkv.weight", "head.weight", "pos_embeder.token_projection.weight"} <= decay_names
    _, keep2 = param_groups(model, exempt_per_channel=True)
    assert "blocks.0.attn.temperature" in {names[id(p)] for p in keep2["params"]}
    assert len(decay_names | keep_names) == len(list(model.parameters()))


def test_sync_batchnorm_round_trip():
    model = tiny_model()
    synced = convert_sync_batchnorm(model)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    back = revert_sync_batchnorm(synced).eval()
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in back.modules())
    back(torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize("name,least", [("xcit_nano_12_p16", 17), ("xcit_nano_12_p8", 25)])
def test_pyramid_rejects_images_too_small_for_the_stride_32_level(name, least):
    pyramid = xcit.create_pyramid(name, depth=4, out_indices=[0, 1, 2, 3]).eval()
    assert pyramid(torch.randn(1, 3, least, 40))["3"].shape[-2] == 1
    with pytest.raises(ValueError, match=f"at least {least}x{least}"):
        pyramid(torch.randn(1, 3, least - 1, 40))
