"""Same official-format weights give the same numbers as an independent implementation (timm)."""
import pytest
import timm
import torch
from timm.models.xcit import checkpoint_filter_fn

import xcit
from conftest import randomize

TOL = 1e-5
CASES = [
    ("xcit_nano_12_p16", (224, 224)),  # tokens_norm off
    ("xcit_nano_12_p16", (200, 173)),  # rectangular, not a multiple of the patch
    ("xcit_tiny_12_p16", (131, 97)),  # tokens_norm on
    ("xcit_nano_12_p8", (117, 150)),
    ("xcit_tiny_12_p8", (224, 224)),
    ("xcit_tiny_24_p16", (97, 131)),  # depth 24, eta 1e-5 (randomised so blocks matter)
]


def pair(name: str, seed: int = 0):
    """Our model with randomised official-format weights, and timm's loaded from the same state dict."""
    ours = randomize(xcit.create_model(name), seed)
    official = {"model": ours.state_dict()}
    theirs = timm.create_model(name + "_224", pretrained=False)
    theirs.load_state_dict(checkpoint_filter_fn(official, theirs))
    return ours, theirs


@pytest.mark.parametrize("name,size", CASES)
def test_eval_logits_and_tokens_match_timm(name, size):
    ours, theirs = pair(name)
    ours.eval(), theirs.eval()
    x = torch.randn(2 if size != (224, 224) else 1, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours_tokens, theirs_tokens = ours.forward_features(x), theirs.forward_features(x)
        assert (ours.forward_head(ours_tokens) - theirs.forward_head(theirs_tokens)).abs().max().item() <= TOL
        assert (ours(x) - theirs(x)).abs().max().item() <= TOL
        # All tokens, not only cls: checks the normalised residual and doubled patch tokens.
        assert (ours_tokens - theirs_tokens).abs().max().item() <= TOL


@pytest.mark.parametrize("name", ["xcit_nano_12_p16", "xcit_tiny_12_p8"])
def test_train_mode_batch_statistics_match_timm(name):
    ours, theirs = pair(name, seed=3)
    ours.train(), theirs.train()
    x = torch.randn(4, 3, 64, 48, generator=torch.Generator().manual_seed(2))
    a, b = ours(x), theirs(x)
    assert (a - b).abs().max().item() <= TOL
    # BatchNorm running statistics were updated identically.
    stats = [(n, v) for n, v in ours.state_dict().items() if "running" in n]
    theirs_sd = theirs.state_dict()
    assert max((v - theirs_sd[n]).abs().max().item() for n, v in stats) <= TOL


def test_timm_state_dict_loads_and_matches(tmp_path):
    """A timm-format file (pos_embed.*, separate q/k/v) loads into our model with identical outputs."""
    ours, theirs = pair("xcit_nano_12_p16", seed=5)
    path = tmp_path / "timm.pth"
    torch.save(theirs.state_dict(), path)
    fresh = xcit.create_model("xcit_nano_12_p16", checkpoint=path).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (fresh(x) - theirs.eval()(x)).abs().max().item() <= TOL
