"""Any input size runs; bad input fails with a ValueError before any layer runs."""
import pytest
import torch

from conftest import tiny_model


@pytest.fixture
def model():
    m = tiny_model(patch_size=8, in_chans=3).eval()
    m.layers_ran = 0

    def count(*_):
        m.layers_ran += 1

    m.patch_embed.register_forward_pre_hook(count)
    return m


@pytest.mark.parametrize("size", [(64, 64), (40, 72), (37, 53), (9, 9), (1, 1), (8, 1), (3, 200)])
def test_any_size_runs(model, size):
    x = torch.randn(2, 3, *size)
    tokens = model.forward_features(x)
    n = -(-size[0] // 8) * -(-size[1] // 8)
    assert tokens.shape == (2, 1 + n, 32)
    assert model(x).shape == (2, 10)


@pytest.mark.parametrize(
    "x,match",
    [
        (torch.randn(2, 1, 32, 32), "got 1 channels"),
        (torch.randn(3, 32, 32), "3-d tensor"),
        (torch.randn(1, 2, 3, 32, 32), "5-d tensor"),
        (torch.randn(0, 3, 32, 32), "empty batch"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "dtype torch.uint8"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.int64), "dtype torch.int64"),
        (torch.randn(2, 3, 0, 32), "0x32 pixels"),
        ([[1.0]], "got list"),
    ],
)
def test_bad_input_is_rejected_before_any_layer(model, x, match):
    with pytest.raises(ValueError, match=match) as err:
        model(x)
    assert "(B, 3, H, W)" in str(err.value)
    assert model.layers_ran == 0


def test_training_batchnorm_needs_more_than_one_value(model):
    model.train()
    with pytest.raises(ValueError, match="more than one value per channel"):
        model(torch.randn(1, 3, 8, 8))
    model(torch.randn(2, 3, 8, 8))  # two images of one patch each are fine


def test_every_entry_point_validates(model):
    bad = torch.randn(1, 4, 16, 16)
    for fn in (model.forward_features, lambda x: model.get_intermediate_layers(x, [0]), model.class_attention_maps):
        with pytest.raises(ValueError, match="channels"):
            fn(bad)
