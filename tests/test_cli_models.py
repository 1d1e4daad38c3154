"""`xcit models`, `xcit info`, config files, the registry's names and torch.hub."""
from pathlib import Path

import pytest
import torch

import xcit
from xcit.cli import main
from xcit.cli.models import model_rows
from xcit.models import MODELS, resolve_name

ROOT = Path(__file__).resolve().parents[1]


def test_model_table_gmacs_within_three_percent_of_reference():
    rows = model_rows()
    assert [r["model"] for r in rows] == xcit.list_models()
    for row in rows:
        spec = MODELS[row["model"]]
        assert row["params"] == spec.num_params
        assert abs(row["gmacs"] - spec.gmacs_224) / spec.gmacs_224 < 0.03, row


def test_models_command_prints_every_architecture(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in xcit.list_models())
    assert "82.0" in out  # small_12_p16 top-1


def test_info_at_a_chosen_resolution(capsys):
    assert main(["info", "xcit_small_12_p16_384.fb_dist_in1k", "--img-size", "384"]) == 0
    out = capsys.readouterr().out
    assert "24x24 = 576 tokens" in out and "26,253,304" in out


def test_config_file_supplies_options(tmp_path, capsys):
    cfg = tmp_path / "info.yaml"
    cfg.write_text("name: xcit_nano_12_p8\nimg-size: [100, 60]\n")
    assert main(["info", "--config", str(cfg)]) == 0
    assert "13x8 = 104 tokens" in capsys.readouterr().out
    assert main(["info", "xcit_nano_12_p16", "--config", str(cfg)]) == 0  # command line wins
    assert "7x4 = 28 tokens" in capsys.readouterr().out
    cfg.write_text("bogus_option: 1\n")
    assert main(["info", "xcit_nano_12_p16", "--config", str(cfg)]) == 2  # a usage error: one line, status 2
    assert "unknown option 'bogus_option'" in capsys.readouterr().err


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["info", "xcit_gigantic_12_p16"]) == 2
    assert "unknown model 'xcit_gigantic_12_p16'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name,arch,weights,res",
    [
        ("xcit_small_12_p16", "xcit_small_12_p16", "in1k", 224),
        ("xcit_small_12_p16_224", "xcit_small_12_p16", "in1k", 224),
        ("xcit_small_12_p16_224.fb_in1k", "xcit_small_12_p16", "in1k", 224),
        ("xcit_small_12_p16_224.fb_dist_in1k", "xcit_small_12_p16", "dist_in1k", 224),
        ("xcit_large_24_p8_384", "xcit_large_24_p8", "dist_in1k_384", 384),
        ("xcit_nano_12_p8_384.fb_dist_in1k", "xcit_nano_12_p8", "dist_in1k_384", 384),
    ],
)
def test_timm_names_are_aliases(name, arch, weights, res):
    r = resolve_name(name)
    assert (r.arch, r.weights, r.img_size) == (arch, weights, res)


def test_alias_listing_and_bad_names():
    assert len(xcit.list_models(aliases=True)) == 14 + 28 + 14 + 28
    for bad in ["xcit_small_12_p32", "vit_base", "xcit_small_12_p16_384.fb_in1k"]:
        with pytest.raises(ValueError):
            resolve_name(bad)


def test_torch_hub_load_from_checkout():
    model = torch.hub.load(str(ROOT), "xcit_nano_12_p16", source="local", num_classes=5)
    assert isinstance(model, xcit.XCiT) and model.num_classes == 5
