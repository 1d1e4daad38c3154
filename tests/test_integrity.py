"""Checkpoint integrity: every file this project writes records the SHA-256 of its tensors, and reading
checks it; damaged or foreign files are one-line CheckpointErrors, never different weights or tracebacks."""
import copy
import json
import random
import zipfile

import pytest
import torch

import xcit
from conftest import randomize, tiny_model
from xcit.cli import main
from xcit.models.weights import DIGEST_KEY, CheckpointError, read_state_dict, tensor_digest
from xcit.train.checkpoint import load_state, read_task_checkpoint, save_state


@pytest.fixture(scope="module")
def model():
    return randomize(tiny_model(), seed=3).eval()


def _tensor_spans(path) -> list[tuple[int, int]]:
    """(start, end) byte ranges of the tensor data inside a torch zip file (its ``data/*`` records)."""
    spans = []
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if "/data/" in info.filename and info.file_size:
                with open(path, "rb") as f:  # data starts after the local header, its name and extra field
                    f.seek(info.header_offset + 26)
                    n_name, n_extra = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
                start = info.header_offset + 30 + n_name + n_extra
                spans.append((start, start + info.file_size))
    return spans


def _flip(data: bytes, pos: int, rng: random.Random) -> bytes:
    out = bytearray(data)
    out[pos] ^= rng.randrange(1, 256)  # never a no-op
    return bytes(out)


def test_digest_covers_names_dtypes_shapes_and_bytes():
    base = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}
    d = tensor_digest(base)
    assert d == tensor_digest(dict(reversed(list(base.items()))))  # order-free
    assert d == tensor_digest({k: v.clone() for k, v in base.items()})
    variants = [
        {"a2": base["a"], "b": base["b"]},
        {"a": base["a"].double(), "b": base["b"]},
        {"a": base["a"].reshape(3, 2), "b": base["b"]},
        {"a": base["a"].t(), "b": base["b"]},  # same values, other order in memory once contiguous
        {"a": base["a"] + torch.tensor([[0, 0, 0], [0, 0, 1e-6]]), "b": base["b"]},
    ]
    assert len({d, *map(tensor_digest, variants)}) == 1 + len(variants)
    nested = {"model": base, "rng": [torch.tensor([1, 2]), {"x": torch.tensor(3)}], "epoch": 4}
    assert tensor_digest(nested) != tensor_digest({**nested, "rng": [torch.tensor([1, 3]), {"x": torch.tensor(3)}]})


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_written_files_record_the_digest_and_still_load(model, tmp_path, suffix):
    path = xcit.save_checkpoint(model, tmp_path / f"m{suffix}", extra={"classes": list("abcdefghij")})
    state = read_state_dict(path)
    assert tensor_digest(state) == tensor_digest({k: v for k, v in model.state_dict().items()})
    if suffix == ".pth":
        assert isinstance(torch.load(path, weights_only=True)[DIGEST_KEY], str)
    assert DIGEST_KEY not in xcit.models.weights.read_metadata(path)


def test_files_without_digest_still_load(model, tmp_path):
    torch.save({"model": model.state_dict()}, tmp_path / "old.pth")  # an official release / older file
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    for name in ("old.pth", "bare.pth"):
        assert tensor_digest(read_state_dict(tmp_path / name)) == tensor_digest(model.state_dict())


@pytest.mark.parametrize("kind", ["pth", "safetensors", "state"])
def test_every_damaged_checkpoint_is_refused_or_identical(model, tmp_path, kind):
    """100 single-byte flips inside the tensor data must all raise CheckpointError; 100 flips anywhere in the
    file must each raise CheckpointError or (bytes the readers never look at) give exactly the saved tensors."""
    if kind == "state":
        opt = torch.optim.AdamW(model.parameters())
        model(torch.randn(1, 3, 16, 16)).sum().backward()
        opt.step()
        path = save_state(tmp_path / "last.pt", {"task": "classify", "model": model.state_dict(), "options": {},
                                                  "optimizer": opt.state_dict(), "step": 2, "rng": []})
        read = load_state
        model.zero_grad(set_to_none=True)
    else:
        path = xcit.save_checkpoint(model, tmp_path / f"m.{kind}")
        read = read_state_dict
    good = path.read_bytes()
    reference = read(path)
    reference.pop("path", None)
    expected = tensor_digest(reference)
    if kind == "safetensors":
        header = 8 + int.from_bytes(good[:8], "little")
        spans = [(header, len(good))]
    else:
        spans = _tensor_spans(path)
    assert sum(b - a for a, b in spans) > 0.9 * sum(v.numel() * v.element_size() for v in model.state_dict().values())
    rng = random.Random(0)
    damaged = tmp_path / f"damaged{path.suffix}"
    for _ in range(100):
        start, end = rng.choice(spans)
        damaged.write_bytes(_flip(good, rng.randrange(start, end), rng))
        with pytest.raises(CheckpointError, match=f"{damaged}: corrupted"):
            read(damaged)
    identical = 0
    for _ in range(100):
        damaged.write_bytes(_flip(good, rng.randrange(len(good)), rng))
        try:
            loaded = read(damaged)
        except CheckpointError as err:
            assert str(damaged) in str(err) and "\n" not in str(err)
            continue
        loaded.pop("path", None)
        assert tensor_digest(loaded) == expected  # never silently different tensors
        identical += 1
    assert identical < 50  # most of the file is tensor data or structure that the readers check


def test_dense_task_checkpoints_are_checked(model, tmp_path):
    path = save_state(tmp_path / "best.pt", {"format": "xcit-test", "model": model.state_dict()})
    assert DIGEST_KEY not in read_task_checkpoint(path, "xcit-test", "segment")
    start, end = _tensor_spans(path)[0]
    data = bytearray(path.read_bytes())
    data[(start + end) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        read_task_checkpoint(path, "xcit-test", "segment")


def _non_checkpoints(tmp_path):
    (tmp_path / "notes.txt").write_text("these are not weights\nsecond line\n")
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "noise.pth").write_bytes(random.Random(1).randbytes(4096))
    (tmp_path / "config.json").write_text(json.dumps({"model": "xcit_nano_12_p16", "lr": 0.001}))
    (tmp_path / "folder").mkdir()
    return ["notes.txt", "empty.pth", "noise.pth", "config.json", "folder", "missing.pth"]


def test_non_checkpoints_are_one_line_errors(tmp_path, model):
    for name in _non_checkpoints(tmp_path):
        path = tmp_path / name
        for call in (lambda: xcit.load_checkpoint(model, path), lambda: read_state_dict(path),
                     lambda: xcit.create_model("xcit_nano_12_p16", checkpoint=path)):
            with pytest.raises(CheckpointError) as err:
                call()
            text = str(err.value)
            assert str(path) in text and "\n" not in text, text
            assert "expected" in text or "no state dict" in text, text


def test_cli_non_checkpoints_exit_with_one_line(tmp_path, capsys):
    (tmp_path / "img.png").write_bytes(b"")  # never read: the checkpoint fails first
    for name in _non_checkpoints(tmp_path):
        path = str(tmp_path / name)
        for argv in (["eval", path, "--data", "digits"], ["predict", str(tmp_path / "img.png"), "--checkpoint", path]):
            assert main(argv) == 2
            err = capsys.readouterr().err.strip()
            assert err.startswith(f"xcit {argv[0]}: error:") and name in err and "\n" not in err, err
            assert "Traceback" not in err


def test_dense_task_checkpoints_say_where_they_belong(tmp_path, capsys):
    """A detector / segmenter file given to a classifier command names the commands that take it, and its
    backbone serves as --pretrained weights."""
    from xcit.cli import main
    from xcit.detect.model import build_detector, detector_state
    from xcit.models.weights import read_trunk
    from xcit.segment.model import build_segmenter, save_segmenter
    from xcit.train.checkpoint import save_state

    arch = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)
    detector = build_detector(2, arch=arch, kind="faster_rcnn", fpn_channels=32, box_head_dim=64,
                              anchor_sizes=[8, 16, 32, 64, 128], min_size=[64], max_size=128)
    save_state(tmp_path / "det.pt", detector_state(detector, {"classes": ["a", "b"]}))
    save_segmenter(build_segmenter(3, arch=arch, head="fpn", channels=16, fpn_channels=16), tmp_path / "seg.pt")
    for name, task in (("det.pt", "detect"), ("seg.pt", "segment")):
        for argv in (["eval", str(tmp_path / name), "--data", "digits"],
                     ["predict", "x.png", "--checkpoint", str(tmp_path / name)],
                     ["export", "--checkpoint", str(tmp_path / name), "-o", str(tmp_path / "exported")]):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert f"xcit {task} predict" in err and "--pretrained" in err and len(err.strip().splitlines()) == 1, err
        trunk, _ = read_trunk(tmp_path / name)
        assert "blocks.0.attn.qkv.weight" in trunk and not any(k.startswith(("backbone", "fpn", "head")) for k in trunk)
    from xcit.models import create_pyramid

    pyramid = create_pyramid(checkpoint=tmp_path / "det.pt")  # a detector's backbone starts a new dense model
    assert torch.equal(pyramid.blocks[0].attn.qkv.weight, detector.backbone.body.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_changed_class_name_or_setting_is_refused_like_a_changed_tensor(model, tmp_path, suffix):
    """The digest covers every value of the file, not only its tensors: labels and preprocessing are as guarded."""
    path = xcit.save_checkpoint(model, tmp_path / f"m{suffix}",
                                extra={"classes": [f"class{i}" for i in range(9)] + ["dog"],
                                       "data": {"dataset": "digits", "crop_pct": 0.875}})
    good = path.read_bytes()
    edits = [(b"dog", b"cat"), (b"digits", b"digitz")] + ([(b"0.875", b"0.975")] if suffix == ".safetensors" else [])
    assert all(good.count(old) == 1 for old, _ in edits) and read_state_dict(path)
    for old, new in edits:
        damaged = tmp_path / f"damaged{suffix}"
        damaged.write_bytes(good.replace(old, new))
        with pytest.raises(CheckpointError, match=f"{damaged}: corrupted") as err:
            xcit.create_model(checkpoint=damaged)
        assert "\n" not in str(err.value)
    if suffix == ".pth":  # the same edit made by re-saving the file (valid zip, valid pickle), the digest kept
        saved = torch.load(path, weights_only=True)
        saved["classes"][-1] = "cat"
        torch.save(saved, tmp_path / "edited.pth")
        with pytest.raises(CheckpointError, match="corrupted"):
            read_state_dict(tmp_path / "edited.pth")


def test_files_with_the_earlier_tensor_only_digest_are_read_and_still_checked(model, tmp_path):
    from xcit.models.weights import LEGACY_DIGEST_KEY

    state = {k: v.clone() for k, v in model.state_dict().items()}
    payload = {"model": state, "classes": list("abcdefghij")}
    torch.save({**payload, LEGACY_DIGEST_KEY: tensor_digest(payload)}, tmp_path / "old.pth")
    assert tensor_digest(read_state_dict(tmp_path / "old.pth")) == tensor_digest(state)
    assert xcit.models.weights.read_metadata(tmp_path / "old.pth") == {"classes": list("abcdefghij")}
    state["head.bias"][0] += 1
    torch.save({**payload, LEGACY_DIGEST_KEY: tensor_digest({"model": model.state_dict(), "classes": []})},
               tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="bad.pth: corrupted: its tensor data"):
        read_state_dict(tmp_path / "bad.pth")


def test_the_content_digest_tells_values_of_other_types_and_orders_apart():
    from xcit.models.weights import content_digest

    values = [1, 1.0, "1", True, None, [1], (1,), {"1": 1}, {1: 1}, b"1", torch.tensor(1), 0.1, 0.1 + 1e-17 + 1e-16]
    assert len({content_digest(v) for v in values}) == len(values)
    assert content_digest({"a": 1, "b": [2, 3]}) == content_digest({"b": [2, 3], "a": 1})  # key order is free
    assert content_digest([2, 3]) != content_digest([3, 2]) and content_digest(["ab", "c"]) != content_digest(["a", "bc"])


def test_weights_that_hold_nan_or_infinity_are_refused_naming_the_first_tensor(model, tmp_path):
    from xcit.inference import load_for_inference

    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.blocks[1].attn.qkv.weight[2, 3] = float("nan")
        broken.head.weight[0, 0] = float("inf")
    path = xcit.save_checkpoint(broken, tmp_path / "diverged.pth")
    for call in (lambda: load_for_inference(path), lambda: xcit.create_model(checkpoint=path),
                 lambda: xcit.load_checkpoint(copy.deepcopy(model), path),
                 lambda: xcit.models.create_pyramid(checkpoint=path)):
        with pytest.raises(CheckpointError, match=r"diverged.pth: .*'blocks.1.attn.qkv.weight' \(1 NaN, 0 infinite"):
            call()
