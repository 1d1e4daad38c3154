"""Weights I/O: every format round-trips, bad files are refused with useful messages."""
import os
import pickle

import pytest
import torch

import xcit
from conftest import randomize, tiny_model
from xcit.models.weights import CheckpointError, inspect_checkpoint, read_state_dict


@pytest.fixture(scope="module")
def nano():
    return randomize(xcit.create_model("xcit_nano_12_p16", num_classes=10), seed=7).eval()


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_save_load_round_trip(nano, tmp_path, suffix):
    path = xcit.save_checkpoint(nano, tmp_path / f"model{suffix}")
    loaded = xcit.create_model("xcit_nano_12_p16", num_classes=10, checkpoint=path)
    assert same_weights(nano, loaded)


def test_official_layout_on_disk(nano, tmp_path):
    path = xcit.save_checkpoint(nano, tmp_path / "model.pth")
    raw = torch.load(path, weights_only=True)
    assert set(raw["model"]) == set(nano.state_dict())
    assert "pos_embeder.token_projection.weight" in raw["model"]
    assert "cls_attn_blocks.0.attn.qkv.weight" in raw["model"]


@pytest.mark.parametrize("wrap", ["bare", "model", "state_dict", "ddp"])
def test_wrapped_and_bare_state_dicts(nano, tmp_path, wrap):
    sd = nano.state_dict()
    obj = {
        "bare": sd,
        "model": {"model": sd, "epoch": 3},
        "state_dict": {"state_dict": sd},
        "ddp": {"model": {f"module.{k}": v for k, v in sd.items()}},
    }[wrap]
    torch.save(obj, tmp_path / "w.pth")
    model = xcit.create_model("xcit_nano_12_p16", num_classes=10)
    xcit.load_checkpoint(model, tmp_path / "w.pth")
    assert same_weights(nano, model)


def test_architecture_is_read_from_the_file(tmp_path):
    model = tiny_model(in_chans=1, num_classes=4)
    path = xcit.save_checkpoint(model, tmp_path / "tiny.safetensors")
    info = inspect_checkpoint(path)
    assert (info["patch_size"], info["embed_dim"], info["depth"], info["in_chans"], info["num_classes"]) == (4, 32, 2, 1, 4)
    rebuilt = xcit.create_model(checkpoint=path)  # no name: architecture from the file
    assert same_weights(model, rebuilt)
    # A bare official-layout state dict with no metadata is still recognised by its shapes.
    torch.save(xcit.create_model("xcit_tiny_12_p8").state_dict(), tmp_path / "bare.pth")
    assert inspect_checkpoint(tmp_path / "bare.pth")["name"] == "xcit_tiny_12_p8"


def test_arbitrary_pickles_are_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": Payload()}, f, protocol=2)
    with pytest.raises(CheckpointError, match="refused"):
        read_state_dict(path)
    torch.save(tiny_model(), tmp_path / "whole_module.pth")  # a pickled nn.Module, not a state dict
    with pytest.raises(CheckpointError, match="refused"):
        read_state_dict(tmp_path / "whole_module.pth")


def test_head_of_another_size_needs_the_explicit_option(nano, tmp_path):
    path = xcit.save_checkpoint(nano, tmp_path / "ten.pth")
    model = xcit.create_model("xcit_nano_12_p16", num_classes=3)
    before = model.head.weight.clone()
    with pytest.raises(CheckpointError, match="skip_head=True"):
        xcit.load_checkpoint(model, path)
    xcit.load_checkpoint(model, path, skip_head=True)
    assert torch.equal(model.head.weight, before)
    assert torch.equal(model.blocks[3].attn.qkv.weight, nano.blocks[3].attn.qkv.weight)


def test_wrong_architecture_lists_keys_and_names_the_file_architecture(tmp_path):
    torch.save({"model": xcit.create_model("xcit_tiny_12_p8").state_dict()}, tmp_path / "tiny.pth")
    with pytest.raises(CheckpointError) as err:
        xcit.load_checkpoint(xcit.create_model("xcit_nano_12_p16"), tmp_path / "tiny.pth")
    text = str(err.value)
    assert "xcit_tiny_12_p8" in text
    assert "xcit_nano_12_p16" in text  # what the model is
    assert "missing keys" in text and "mismatched keys" in text and "patch_embed.proj.6.0.weight" in text


def test_unreadable_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="not a readable"):
        read_state_dict(tmp_path / "junk.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        read_state_dict(tmp_path / "junk.safetensors")
    torch.save({"epoch": 3, "note": "no tensors"}, tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="no state dict"):
        read_state_dict(tmp_path / "empty.pth")


def test_pretrained_downloads_into_hub_cache(nano, tmp_path, monkeypatch):
    """The registry knows the release file names; a mirror (here a file:// folder) stands in for the network."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    torch.save({"model": xcit.create_model("xcit_nano_12_p16").state_dict()}, mirror / "xcit_nano_12_p16_224_dist.pth")
    monkeypatch.setenv("XCIT_WEIGHTS_URL", mirror.as_uri())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    torch.hub.set_dir(str(tmp_path / "hub"))
    model = xcit.create_model("xcit_nano_12_p16_224.fb_dist_in1k", pretrained=True)
    assert (tmp_path / "hub" / "checkpoints" / "xcit_nano_12_p16_224_dist.pth").is_file()
    assert model.head.out_features == 1000


def test_pretrained_without_network_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("XCIT_WEIGHTS_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    torch.hub.set_dir(str(tmp_path / "hub"))
    with pytest.raises(RuntimeError, match="could not download"):
        xcit.create_model("xcit_nano_12_p16", pretrained=True)


def test_release_urls():
    assert xcit.models.release_url("xcit_small_12_p16") == "https://dl.fbaipublicfiles.com/xcit/xcit_small_12_p16_224.pth"
    assert xcit.models.release_url("xcit_small_12_p16_384.fb_dist_in1k").endswith("xcit_small_12_p16_384_dist.pth")
    assert xcit.models.release_url("xcit_large_24_p8_224.fb_dist_in1k").endswith("xcit_large_24_p8_224_dist.pth")
