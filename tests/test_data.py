"""Datasets, samplers and transforms of xcit.data (fast: tiny synthetic files, digits)."""
from __future__ import annotations

import gzip
import logging
import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from xcit.data import (
    BatchEvalTransform,
    BatchTrainTransform,
    DataError,
    EpochSampler,
    build_dataset,
    build_loader,
    eval_transform,
    read_idx,
)
from xcit.data.datasets import fashion_mnist_dir


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_idx_folder(root, n_train=20, n_test=10):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root


def make_image_folder(root, classes=("cat", "dog", "fox"), per_class=4, size=20, corrupt=()):
    """ROOT/{train,val}/<class>/<i>.png with random pixels; ``corrupt`` names (split, class, file) to garble."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    for split, c, name in corrupt:
        (root / split / c / name).write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return root


def test_idx_reader_roundtrip_and_dataset(tmp_path):
    folder = make_idx_folder(tmp_path / "fashion")
    assert read_idx(folder / "train-labels-idx1-ubyte.gz").tolist() == [i % 10 for i in range(20)]
    train = build_dataset(folder, "train")
    test = build_dataset(folder, "test")
    assert train.images.shape == (20, 1, 28, 28) and train.images.dtype == torch.uint8
    assert len(test) == 10 and train.classes[0] == "T-shirt/top"  # "fashion" in the path


def test_idx_reader_rejects_corrupt_files(tmp_path):
    bad = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x00\x00\x0d\x03garbage")
    with pytest.raises(DataError, match="magic"):
        read_idx(bad)
    short = tmp_path / "y-idx1-ubyte.gz"
    with gzip.open(short, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + struct.pack(">I", 100) + b"\x01" * 7)
    with pytest.raises(DataError, match="promises"):
        read_idx(short)


def test_fashion_mnist_from_debian_package():
    fashion_mnist_dir()  # DataError naming the Debian package when it is not installed (scripts/setup.sh installs it)
    train, test = build_dataset("fashion-mnist", "train"), build_dataset("fashion-mnist", "test")
    assert train.images.shape == (60000, 1, 28, 28) and len(test) == 10000
    assert torch.bincount(train.targets).tolist() == [6000] * 10
    assert abs(train.images.float().mean().item() / 255 - train.mean[0]) < 1e-3


def test_digits_split_is_disjoint_stratified_and_complete():
    train, val = build_dataset("digits", "train"), build_dataset("digits", "val")
    assert len(train) + len(val) == 1797
    assert train.images.shape[1:] == (1, 8, 8) and int(train.images.max()) == 255
    counts = torch.bincount(val.targets, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # every 5th image of each class
    both = torch.cat([train.images.flatten(1), val.images.flatten(1)]).unique(dim=0)
    assert len(both) > 1700  # (a few digits are pixel-identical duplicates in the original set)


def test_folder_dataset_skips_corrupt_images_with_a_warning(tmp_path, caplog):
    root = make_image_folder(tmp_path / "data", corrupt=[("train", "dog", "broken.png")])
    ds = build_dataset(root, "train", transform=eval_transform(16, 1.0))
    assert len(ds) == 13 and ds.classes == ["cat", "dog", "fox"]
    loader = build_loader(ds, EpochSampler(len(ds), shuffle=False), batch_size=13)
    with caplog.at_level(logging.WARNING, logger="xcit.data"):
        images, targets, skipped = next(iter(loader))
    assert images.shape == (12, 3, 16, 16) and len(targets) == 12
    assert len(skipped) == 1 and skipped[0].endswith("broken.png")
    assert "broken.png" in caplog.text


@pytest.mark.parametrize("layout, message", [
    ("missing", "neither a known dataset"),
    ("loose", "no class folders"),
    ("flat", "holds class folders directly"),
    ("empty_split", "is empty"),
    ("no_images", "no images"),
    ("no_val", "no val/ folder"),
    ("extra_val_class", "training split lacks"),
])
def test_bad_dataset_layouts_are_clear_errors(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout == "loose":
        (root / "train").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / "train" / "a.png")
    elif layout == "flat":
        (root / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / "cat" / "a.png")
    elif layout == "empty_split":
        (root / "train").mkdir(parents=True)
    elif layout == "no_images":
        (root / "train" / "cat").mkdir(parents=True)
        (root / "train" / "cat" / "notes.txt").write_text("hi")
    elif layout == "no_val":
        make_image_folder(root)
        import shutil

        shutil.rmtree(root / "val")
    elif layout == "extra_val_class":
        make_image_folder(root)
        (root / "val" / "zebra").mkdir()
        Image.new("RGB", (8, 8)).save(root / "val" / "zebra" / "z.png")
    split = "val" if layout in ("no_val", "extra_val_class") else "train"
    with pytest.raises(DataError, match=message):
        train = build_dataset(root, "train") if split == "val" else None
        build_dataset(root, split, classes=train.classes if train else None)


def test_repeat_aug_sampler_ranks_partition_the_single_process_order():
    one = EpochSampler(103, num_replicas=1, rank=0, seed=3)
    one.set_epoch(2)
    ranks = [EpochSampler(103, num_replicas=2, rank=r, seed=3) for r in range(2)]
    for s in ranks:
        s.set_epoch(2)
    single = one.indices()
    r0, r1 = ranks[0].indices(), ranks[1].indices()
    assert len(r0) == len(r1) == 51
    # Batch k of 2 ranks at batch B is batch k of 1 process at batch 2B.
    for k in range(len(r0) // 5):
        assert sorted(torch.cat([r0[5 * k:5 * k + 5], r1[5 * k:5 * k + 5]]).tolist()) == sorted(single[10 * k:10 * k + 10].tolist())
    one.set_epoch(3)
    assert not torch.equal(one.indices(), single)  # a new permutation every epoch


def test_repeat_aug_sampler_repeats_each_image_across_ranks():
    samplers = [EpochSampler(60, num_replicas=3, rank=r, repeats=3, seed=0) for r in range(3)]
    parts = [s.indices() for s in samplers]
    assert all(len(p) == 20 for p in parts)
    # Copies of an image go to different ranks: position i of every rank holds the same image.
    assert torch.equal(parts[0], parts[1]) and torch.equal(parts[1], parts[2])
    assert len(parts[0].unique()) == 20
    s = EpochSampler(60, repeats=3)
    s.set_epoch(0, start=7)
    assert len(s) == 53 and torch.equal(s.indices(), EpochSampler(60, repeats=3).indices()[7:])


def test_batch_transforms():
    x = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    pad = BatchTrainTransform(28, mean=(0.5,), std=(0.5,), crop="pad", padding=3, hflip=0.0)
    torch.manual_seed(0)
    out = pad(x)
    assert out.shape == (6, 1, 28, 28) and out.dtype == torch.float32
    # every output is a shifted copy: its centre 22x22 appears in the input
    restored = ((out * 0.5 + 0.5) * 255).round().to(torch.uint8)
    assert any(torch.equal(restored[0, 0, 3:25, 3:25], x[0, 0, 3 - dy:25 - dy, 3 - dx:25 - dx])
               for dy in range(-3, 4) for dx in range(-3, 4))
    flip = BatchTrainTransform(28, mean=(0.0,), std=(1.0,), crop="none", hflip=1.0)
    assert torch.allclose(flip(x), x.flip(-1).float() / 255)
    rich = BatchTrainTransform(32, mean=(0.3,), std=(0.3,), crop="random-resized", auto_augment="rand-m9-mstd0.5-inc1",
                               reprob=1.0)
    assert rich(x).shape == (6, 1, 32, 32)
    with pytest.raises(ValueError, match="RandAugment"):
        BatchTrainTransform(28, mean=(0.5,), std=(0.5,), auto_augment="autoaug-v0")


def test_batch_eval_transform_matches_the_official_preprocessing():
    """The batched uint8 path and the per-image PIL path (xcit.data.eval_transform) agree."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 40), dtype=np.uint8)
    batch = BatchEvalTransform(32, crop_pct=0.875, mean=(0.5,), std=(0.25,))(torch.from_numpy(img)[None, None])
    ref = eval_transform(32, 0.875, (0.5,), (0.25,))(Image.fromarray(img))
    assert batch.shape == (1, 1, 32, 32) and ref.shape == (1, 32, 32)
    # PIL and tensor bicubic differ by rounding only: a few grey levels at most.
    assert (batch[0] - ref).abs().max() < 4 / 255 / 0.25
    same = BatchEvalTransform(40, crop_pct=1.0, mean=(0.5,), std=(0.25,))(torch.from_numpy(img)[None, None])
    assert torch.allclose(same[0], eval_transform(40, 1.0, (0.5,), (0.25,))(Image.fromarray(img)), atol=1e-6)


# --- images deeper than 8 bits (load_image / read_image: the one reader of every task) ---

def test_16bit_png_matches_its_8bit_version(tmp_path):
    from xcit.data.datasets import ImageFolderDataset
    from xcit.data.images import load_image

    rng = np.random.default_rng(0)
    deep = rng.integers(0, 65536, (24, 20)).astype(np.uint16)
    deep[0, :4] = [0, 255, 256, 65535]
    (tmp_path / "cls").mkdir()
    Image.fromarray(deep).save(tmp_path / "cls" / "deep.png")
    Image.fromarray((deep // 256).astype(np.uint8)).save(tmp_path / "cls" / "shallow.png")
    with Image.open(tmp_path / "cls" / "deep.png") as img:
        assert img.mode.startswith("I")  # PIL reads it back as 16-bit, which convert("RGB") clips to white
    grey = np.asarray(load_image(tmp_path / "cls" / "deep.png", in_chans=1), dtype=int)
    shallow = np.asarray(load_image(tmp_path / "cls" / "shallow.png", in_chans=1), dtype=int)
    assert np.abs(grey - shallow).max() <= 1
    np.testing.assert_array_equal(grey, np.rint(deep / 257))
    assert grey[0, :4].tolist() == [0, 1, 1, 255]
    rgb = np.asarray(load_image(tmp_path / "cls" / "deep.png"), dtype=int)
    assert rgb.shape == (24, 20, 3) and (rgb == grey[..., None]).all()
    folder = ImageFolderDataset(tmp_path)
    images = {os.path.basename(folder.samples[i][0]): np.asarray(folder[i][0], dtype=int) for i in range(len(folder))}
    assert np.abs(images["deep.png"] - images["shallow.png"]).max() <= 1


def test_segmentation_and_detection_read_images_as_classification_does(tmp_path):
    """read_image (segment, detect) is load_image as a uint8 (3, H, W) tensor: 16-bit scaled by bit depth."""
    from xcit.data.images import collect_images, list_images, load_image, read_image

    deep = (np.arange(24 * 20).reshape(24, 20) * 131).astype(np.uint16)
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.fromarray(deep).save(tmp_path / "a" / "b" / "deep.PNG")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a" / "rgb.jpg")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    tensor = read_image(tmp_path / "a" / "b" / "deep.PNG")
    assert tensor.dtype == torch.uint8 and tensor.shape == (3, 24, 20)
    np.testing.assert_array_equal(tensor.permute(1, 2, 0).numpy(), np.asarray(load_image(tmp_path / "a" / "b" / "deep.PNG")))
    assert list_images(tmp_path / "a") == [tmp_path / "a" / "b" / "deep.PNG", tmp_path / "a" / "rgb.jpg"]
    assert list_images(tmp_path / "a", recursive=False) == [tmp_path / "a" / "rgb.jpg"]
    assert collect_images([tmp_path / "a"]) == [str(p) for p in list_images(tmp_path / "a")]
    with pytest.raises(ValueError, match="cannot read image"):
        read_image(tmp_path / "a" / "notes.txt")


def test_32bit_and_float_images_scale_by_depth(tmp_path):
    from xcit.data.images import load_image

    levels = np.arange(256, dtype=np.int64).reshape(16, 16)
    Image.fromarray((levels * 8421504).astype(np.int32)).save(tmp_path / "int32.tif")  # (2^31 - 1) / 255
    Image.fromarray((levels / 255).astype(np.float32)).save(tmp_path / "unit.tif")
    Image.fromarray(levels.astype(np.float32)).save(tmp_path / "bytes.tif")
    Image.fromarray((levels * 257).astype(np.uint16)).save(tmp_path / "u16.tif")
    for name in ("int32.tif", "unit.tif", "bytes.tif", "u16.tif"):
        got = np.asarray(load_image(tmp_path / name, in_chans=1), dtype=int)
        assert np.abs(got - levels).max() <= 1, name


def test_folders_are_walked_through_links_once_and_no_image_is_dropped_or_read_twice(tmp_path):
    """A linked folder is followed (its images were silently left out); a link back up the tree lists nothing twice;
    a class-folder dataset refuses an image reached twice (it was read again, under the wrong label)."""
    from xcit.data.datasets import DataError, scan_image_folder
    from xcit.data.images import collect_images, list_images

    digits = _digit_images()
    for cls in ("a", "b"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        Image.fromarray(digits[cls == "b"]).save(tmp_path / "train" / cls / f"{cls}.png")
    (tmp_path / "more").mkdir()
    Image.fromarray(digits[2]).save(tmp_path / "more" / "m.png")
    (tmp_path / "train" / "b" / "linked").symlink_to(tmp_path / "more")
    (tmp_path / "train" / "b" / "loop").symlink_to("..")
    found = list_images(tmp_path / "train")
    assert found == [tmp_path / "train" / p for p in ("a/a.png", "b/b.png", "b/linked/m.png")]
    assert collect_images([tmp_path / "train"]) == [str(p) for p in found]
    with pytest.raises(DataError, match=r"b/loop/a/a\.png is .*a/a\.png again, through the symbolic link .*b/loop"):
        scan_image_folder(tmp_path / "train")
    (tmp_path / "train" / "b" / "loop").unlink()
    samples, classes = scan_image_folder(tmp_path / "train")
    assert classes == ["a", "b"] and sorted((os.path.relpath(p, tmp_path), c) for p, c in samples) == [
        ("train/a/a.png", 0), ("train/b/b.png", 1), ("train/b/linked/m.png", 1)]
    (tmp_path / "train" / "a" / "again.png").symlink_to(tmp_path / "train" / "b" / "b.png")
    with pytest.raises(DataError, match="again.png"):
        scan_image_folder(tmp_path / "train")


def _digit_images() -> list[np.ndarray]:
    from sklearn.datasets import load_digits

    return [np.kron(img * 15, np.ones((4, 4))).astype(np.uint8) for img in load_digits().images[:3]]


def test_list_files_keep_names_that_are_not_utf8_and_every_output_names_them_in_utf8(tmp_path):
    from xcit.data.images import collect_images, display_path

    name = os.fsdecode(b"caf\xe9.png")
    Image.fromarray(_digit_images()[0]).save(tmp_path / name)
    (tmp_path / "list.txt").write_bytes(b"# images\n" + os.fsencode(tmp_path / name) + b"\n\n")
    assert collect_images([], [tmp_path / "list.txt"]) == [str(tmp_path / name)]
    assert collect_images([tmp_path]) == [str(tmp_path / name)]
    assert display_path(tmp_path / name) == f"{tmp_path}/caf\\xe9.png"
    assert display_path("two\nlines.png") == "two\\nlines.png"


def test_output_names_are_unique_when_inputs_share_a_stem():
    from xcit.data.outputs import unique_stems

    assert unique_stems(["x/a.png", "x/b.png"]) == ["a", "b"]
    assert unique_stems(["x/a.png", "x/a.jpg", "x/b.png"]) == ["a.png", "a.jpg", "b"]
    assert unique_stems(["x/a.png", "y/a.png"]) == ["x_a.png", "y_a.png"]
    assert unique_stems(["x/A.png", "x/b.png", "x/a.PNG"]) == ["A.png", "b", "a.PNG_2"]  # case-insensitive file systems
    assert unique_stems(["x/a.png", "x/a.png"]) == ["a.png", "a.png_2"]  # the same file twice
    names = unique_stems(["a.png", "a.jpg", "a.png.tif", "sub/a.png"])
    assert len({n.casefold() for n in names}) == 4


def test_images_above_the_pixel_limit_are_refused_before_decoding(tmp_path, monkeypatch, recwarn):
    """Every read names the file and the limit (PIL.Image.MAX_IMAGE_PIXELS): no traceback, no warning, no allocation."""
    from xcit.data import images

    Image.fromarray(np.zeros((40, 50), np.uint8)).save(tmp_path / "g.png")
    for limit in (1999, 1200, 999):  # below PIL's own limit, between it and its error (2x), above that
        monkeypatch.setattr(images.Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(ValueError, match=rf"g\.png': (50x40 = )?2,000 pixels, above the limit of {limit:,}"):
            images.read_image(tmp_path / "g.png")
    assert images.load_image(tmp_path / "g.png", max_pixels=2000).size == (50, 40)  # a caller may allow more
    assert not [w for w in recwarn if "DecompressionBomb" in type(w.message).__name__]
