"""A model's preprocessing travels with it (checkpoint -> model -> checkpoint) and one call gives its transform."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

import xcit
from conftest import tiny_model
from xcit.data import (
    BatchEvalTransform, DataConfig, ToChannels, create_transform, folder_eval_transform, resolve_data_config,
)
from xcit.data.images import IMAGENET_MEAN, IMAGENET_STD
from xcit.inference import Predictor, load_for_inference, read_metadata
from xcit.models.weights import CheckpointError

GREY = {"img_size": 20, "in_chans": 1, "mean": [0.3], "std": [0.4], "crop_pct": 0.875, "interpolation": "bilinear",
        "dataset": "somewhere"}
GREY_CONFIG = DataConfig(in_chans=1, img_size=(20, 20), mean=(0.3,), std=(0.4,), crop_pct=0.875,
                         interpolation="bilinear")


def luma(rgb: np.ndarray) -> np.ndarray:
    """Grey as PIL computes it (ITU-R 601-2, fixed point): the reference the conversion must match."""
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 32768) >> 16).astype(np.uint8)


@pytest.fixture(scope="module")
def grey_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("grey") / "grey.pth"
    return xcit.save_checkpoint(tiny_model(in_chans=1, num_classes=3).eval(), path,
                                extra={"classes": ["a", "b", "c"], "data": GREY})


def test_names_resolve_to_the_official_evaluation_at_their_resolution():
    official = DataConfig(3, (224, 224), IMAGENET_MEAN, IMAGENET_STD, 1.0, "bicubic")
    assert resolve_data_config("xcit_small_12_p16") == official == resolve_data_config() == resolve_data_config(None)
    for name in ("xcit_small_12_p16_384.fb_dist_in1k", "hf-hub:timm/xcit_nano_12_p16_384.fb_dist_in1k"):
        assert resolve_data_config(name).img_size == (384, 384)
    assert resolve_data_config("dino_xcit_small_12_p8").input_size == (3, 224, 224)
    assert resolve_data_config("xcit_tiny_12_p8", img_size=[96, 128], crop_pct=0.9).img_size == (96, 128)
    with pytest.raises(ValueError, match="'no_such_model': no such file, and not a model name"):
        resolve_data_config("no_such_model")


def test_a_model_created_from_a_checkpoint_keeps_its_preprocessing(grey_checkpoint):
    model = xcit.create_model(checkpoint=grey_checkpoint)
    assert model.data_config == GREY
    assert resolve_data_config(model) == resolve_data_config(grey_checkpoint) == GREY_CONFIG
    assert resolve_data_config(GREY) == GREY_CONFIG
    assert resolve_data_config(xcit.optimize(model.eval())) == GREY_CONFIG  # the inference copy keeps it
    # a name's resolution is kept even though the model is named by its architecture only
    big = xcit.create_model("xcit_nano_12_p16_384", num_classes=0)
    assert big.model_name == "xcit_nano_12_p16" and resolve_data_config(big).img_size == (384, 384)
    # a model built without a name or a checkpoint records nothing: the defaults, for its channels
    plain = xcit.XCiT(patch_size=4, embed_dim=32, depth=1, num_heads=2, in_chans=1)
    assert tiny_model(in_chans=1).data_config == {"img_size": 224} and plain.data_config is None
    assert resolve_data_config(plain).mean == (sum(IMAGENET_MEAN) / 3,)


def test_save_checkpoint_writes_the_models_preprocessing(grey_checkpoint, tmp_path):
    """Re-saving a loaded model keeps its preprocessing (it was lost); an explicit ``data`` entry wins."""
    model = xcit.create_model(checkpoint=grey_checkpoint)
    for name in ("copy.pth", "copy.safetensors"):
        copy = xcit.save_checkpoint(model, tmp_path / name)
        assert read_metadata(copy)["data"] == GREY
        assert resolve_data_config(copy) == GREY_CONFIG
        assert load_for_inference(copy).data_config == GREY_CONFIG
    other = {**GREY, "img_size": [24, 32], "mean": [0.5]}
    copy = xcit.save_checkpoint(model, tmp_path / "other.pth", extra={"data": other})
    assert read_metadata(copy)["data"] == other and resolve_data_config(copy).img_size == (24, 32)
    named = xcit.save_checkpoint(xcit.create_model("xcit_nano_12_p16_384", num_classes=0), tmp_path / "named.pth")
    assert read_metadata(named)["data"] == {"img_size": 384, "in_chans": 3}


def test_inference_uses_the_same_resolver(grey_checkpoint, tmp_path):
    """`xcit predict`'s loader and the public call give the same preprocessing and the same probabilities."""
    inf = load_for_inference(grey_checkpoint)
    assert inf.data_config == resolve_data_config(grey_checkpoint) and inf.classes == ["a", "b", "c"]
    assert load_for_inference(grey_checkpoint, img_size=16, crop_pct=1.0).data_config == DataConfig(
        1, (16, 16), (0.3,), (0.4,), 1.0, "bilinear")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (37, 51, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    [pred] = Predictor(inf, optimize=False).predict([tmp_path / "photo.png"], top_k=3)
    model = xcit.create_model(checkpoint=grey_checkpoint).eval()
    with torch.no_grad():
        probs = model(xcit.create_transform(model)(Image.open(tmp_path / "photo.png")).unsqueeze(0)).softmax(-1)[0]
    assert torch.allclose(torch.tensor(pred.probs), probs[pred.indices], atol=1e-6)


def test_the_transform_makes_a_photo_grey_exactly_as_pil_does():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (33, 45, 3), dtype=np.uint8)
    grey = luma(rgb)
    assert np.array_equal(np.asarray(Image.fromarray(rgb).convert("L")), grey)  # the reference is PIL's
    tensor = torch.from_numpy(rgb).permute(2, 0, 1)
    assert torch.equal(ToChannels(1)(tensor)[0], torch.from_numpy(grey))
    assert torch.equal(ToChannels(1)(rgb)[0], torch.from_numpy(grey))  # numpy (H, W, C)
    rgba = torch.cat([tensor, torch.full_like(tensor[:1], 7)])
    assert torch.equal(ToChannels(1)(rgba)[0], torch.from_numpy(grey)) and torch.equal(ToChannels(3)(rgba), tensor)
    assert torch.equal(ToChannels(3)(torch.from_numpy(grey)[None]), torch.from_numpy(grey)[None].expand(3, -1, -1))
    floats = ToChannels(1)(tensor.float() / 255)[0]
    assert (floats * 255 - torch.from_numpy(grey).float()).abs().max() <= 0.51
    with pytest.raises(ValueError, match="a 3-channel model takes images of 3 channels"):
        ToChannels(3)(torch.zeros(5, 4, 4, dtype=torch.uint8))
    with pytest.raises(TypeError, match="expected a PIL image"):
        ToChannels(3)([[0]])
    # the whole transform: PIL image, uint8 tensor, numpy array and a batch give the same numbers
    transform = GREY_CONFIG.transform()
    x = transform(Image.fromarray(rgb))
    assert type(x) is torch.Tensor and x.shape == (1, 20, 20) and x.dtype == torch.float32
    assert torch.equal(transform(tensor), x) and torch.equal(transform(rgb), x)
    assert torch.equal(transform(Image.fromarray(grey)), x)  # a photo already grey: the same
    batch = transform(torch.stack([tensor, tensor.flip(-1)]))
    assert batch.shape == (2, 1, 20, 20) and torch.equal(batch[0], x)
    assert torch.equal(batch[1], transform(tensor.flip(-1)))


def test_the_transform_resizes_crops_and_normalises_as_the_config_says():
    """A 40 x 80 colour image, black left half, orange right half, for a grey 28 px model at crop 0.875: the short
    side becomes floor(28 / 0.875) = 32 (32 x 64), the centre 28 x 28 keeps columns 18..45 (the edge at 14)."""
    rgb = np.zeros((40, 80, 3), dtype=np.uint8)
    rgb[:, 40:] = (250, 140, 20)
    config = DataConfig(in_chans=1, img_size=28, mean=(0.25,), std=(0.5,), crop_pct=0.875)
    x = create_transform(config)(Image.fromarray(rgb))
    orange = (luma(np.array([250, 140, 20], dtype=np.uint8)) / 255 - 0.25) / 0.5
    assert x.shape == (1, 28, 28)
    assert torch.allclose(x[0, :, :12], torch.tensor(-0.5), atol=1e-6)
    assert torch.allclose(x[0, :, 16:], torch.tensor(float(orange)), atol=1e-6)
    assert x[0, :, 12:16].min() > -0.5 - 0.05 and x[0, :, 12:16].max() < orange + 0.05
    # an RGB model: ImageNet statistics per channel
    x = create_transform("xcit_nano_12_p16", img_size=28, crop_pct=0.875)(Image.fromarray(rgb))
    expected = (torch.tensor([250, 140, 20]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert x.shape == (3, 28, 28) and torch.allclose(x[:, :, 16:], expected[:, None, None].expand(3, 28, 12), atol=1e-6)


def test_interpolation_is_used_by_single_images_and_batches_alike():
    """The recorded resize interpolation reaches the per-image pipeline (folder evaluation ignored it)."""
    rng = np.random.default_rng(2)
    images = torch.from_numpy(rng.integers(0, 256, (2, 3, 50, 50), dtype=np.uint8))
    for mode in ("bicubic", "bilinear", "nearest"):
        config = DataConfig(img_size=24, crop_pct=0.9, interpolation=mode)
        batch = BatchEvalTransform(24, crop_pct=0.9, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation=mode)(images)
        assert torch.allclose(config.transform()(images), batch, atol=1e-6)
        assert torch.allclose(config.batch_transform()(images), batch)
        folder = folder_eval_transform(24, crop_pct=0.9, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation=mode)
        modes = [t.interpolation for t in folder.transforms if isinstance(t, v2.Resize)]
        assert modes == [v2.InterpolationMode[mode.upper()]]
    bicubic, bilinear = (DataConfig(img_size=24, interpolation=m).transform()(images) for m in ("bicubic", "bilinear"))
    assert not torch.allclose(bicubic, bilinear, atol=1e-3)


def test_bad_preprocessing_is_a_one_line_error(grey_checkpoint, tmp_path):
    model = tiny_model(in_chans=1, num_classes=3)
    bad = xcit.save_checkpoint(model, tmp_path / "bad.pth", extra={"data": {**GREY, "mean": [0.1, 0.2, 0.3]}})
    for call in (resolve_data_config, load_for_inference):
        with pytest.raises(CheckpointError, match=r"bad\.pth: its preprocessing \('data' entry\) is invalid: exp"):
            call(bad)
        with pytest.raises(ValueError, match=r"expected 1 mean value\(s\) for a 1-channel model, got \[0.1, 0.2, 0.3\]"):
            call(bad)
    wrongs = ((dict(crop_pct=1.5), "crop_pct in \\(0, 1\\]"), (dict(interpolation="lanczos"), "interpolation"),
              (dict(img_size=0), "positive image size"), (dict(std=[0.0]), "positive std"),
              (dict(img_size="big"), "image size as an int"))
    for wrong, message in wrongs:  # asked of a good file: not the file's fault
        with pytest.raises(ValueError, match=message) as raised:
            resolve_data_config(grey_checkpoint, **wrong)
        assert not isinstance(raised.value, CheckpointError)
    assert resolve_data_config(bad, mean=[0.5]).mean == (0.5,)  # a bad entry can be overridden
    with pytest.raises(TypeError, match="expected a model, a checkpoint path"):
        resolve_data_config(3.5)


def test_release_names_keep_their_resolution_when_loaded(tmp_path, monkeypatch):
    """``--checkpoint xcit_nano_12_p16_384.fb_dist_in1k`` predicts at 384 (the name was dropped: 224)."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    torch.save({"model": xcit.create_model("xcit_nano_12_p16").state_dict()}, mirror / "xcit_nano_12_p16_384_dist.pth")
    monkeypatch.setenv("XCIT_WEIGHTS_URL", mirror.as_uri())
    torch.hub.set_dir(str(tmp_path / "hub"))
    inf = load_for_inference("xcit_nano_12_p16_384.fb_dist_in1k")
    assert inf.data_config == DataConfig(img_size=384) and inf.source.endswith("xcit_nano_12_p16_384_dist.pth")
    assert xcit.create_model("xcit_nano_12_p16_384.fb_dist_in1k", pretrained=True).data_config == {"img_size": 384}
