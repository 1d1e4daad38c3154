"""``xcit.optimize``: the inference transform computes the plain model's logits, leaves it unchanged,
refuses training, keeps its options per model, and its exactness tricks hold at every grid size."""
from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xcit
from conftest import randomize, run_program_without_xcit, tiny_model
from xcit.models import create_model, is_optimized, optimize
from xcit.models import kernels as K
from xcit.models.layers import XCA, channel_attention
from xcit.models.optimize import OptimizedXCABlock


@pytest.fixture(scope="module")
def nano():
    return randomize(create_model("xcit_nano_12_p16"), seed=21).eval()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def test_optimized_logits_match_plain(nano):
    """max |logit difference| <= 1e-4 (fp32) for every option, including 1-row / 1-column / 1-token grids."""
    variants = {(fold, dnn): optimize(nano, fold=fold, dnn=dnn) for fold in ("auto", "never", "always") for dnn in (True, False)}
    for batch, size in ((1, (224, 224)), (2, (200, 173)), (2, (16, 64)), (2, (48, 16)), (2, (1, 1))):
        x = torch.randn(batch, 3, *size)
        with torch.no_grad():
            ref = nano(x)
            for options, model in variants.items():
                assert _max_diff(model(x), ref) <= 1e-4, (size, options)


@pytest.mark.parametrize("size", [(64, 48), (93, 61), (200, 173)])
def test_stem_in_groups_and_bands_equals_one_call(nano, monkeypatch, size):
    """Above STEM_CHUNK_BYTES per first-stage map the stem runs per group of images, and one image larger than
    that per band of rows (each band recomputing the rows its convolutions overlap): the same tokens, in order."""
    import importlib

    module = importlib.import_module("xcit.models.optimize")
    model = optimize(nano)
    stem = model.patch_embed
    x = torch.randn(5, 3, *size)
    with torch.no_grad():
        whole = stem(x)
        rows = whole[1]
        per_image = stem.weight0.shape[0] * -(-size[0] // 2) * -(-size[1] // 2) * 4  # fp32 first-stage map
        for limit, split in ((per_image * 5, (1, 1)), (per_image * 2, (3, 1)), (per_image, (5, 1)),
                             (per_image // 2, (5, 2)), (per_image // 3 + 1, (5, 3)), (1, (5, rows))):
            monkeypatch.setattr(module, "STEM_CHUNK_BYTES", limit)
            assert stem._split(x) == split
            tokens, hp, wp = stem(x)
            assert (hp, wp) == whole[1:] and tokens.shape == whole[0].shape
            assert _max_diff(tokens, whole[0]) <= 1e-5, (limit, split)
        assert _max_diff(model(x), nano(x)) <= 1e-4
        assert stem._split(x[:0]) == (1, 1) and stem(x[:0])[0].shape == (0, *whole[0].shape[1:])
        monkeypatch.setattr(module, "STEM_CHUNK_BYTES", 1)
        bf16 = optimize(nano, dtype=torch.bfloat16)
        banded = bf16.patch_embed(x[:1])[0]
        monkeypatch.setattr(module, "STEM_CHUNK_BYTES", 2**62)
        assert _max_diff(banded, bf16.patch_embed(x[:1])[0]) <= 1e-2


def test_optimized_patch8_tokens_norm_and_pyramid():
    m = randomize(create_model("xcit_tiny_12_p8"), seed=22).eval()
    x = torch.randn(2, 3, 72, 56)
    with torch.no_grad():
        assert _max_diff(optimize(m)(x), m(x)) <= 1e-4
        assert _max_diff(optimize(m).forward_features(x), m.forward_features(x)) <= 1e-4
    pyramid = randomize(xcit.create_pyramid("xcit_nano_12_p16"), seed=23).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref, out = pyramid(x), optimize(pyramid)(x)
    assert ref.keys() == out.keys() and all(_max_diff(out[k], ref[k]) <= 1e-4 for k in ref)


def test_the_original_is_unchanged_and_the_copy_is_inference_only(nano):
    before = {k: v.clone() for k, v in nano.state_dict().items()}
    optimized = nano.optimize()  # the method spelling
    after = nano.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not is_optimized(nano) and is_optimized(optimized)
    assert not optimized.training and not any(p.requires_grad for p in optimized.parameters())
    optimized.train()
    with pytest.raises(RuntimeError, match="inference"):
        optimized(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="already optimised"):
        optimize(optimized.eval())


def test_bad_options_and_wrapped_modules_are_refused(nano):
    with pytest.raises(ValueError, match="fold"):
        optimize(nano, fold="sometimes")
    with pytest.raises(ValueError, match="XCiT"):
        optimize(nn.Linear(3, 3))
    wrapped = randomize(tiny_model(), seed=1).eval()
    wrapped.blocks[0].attn.qkv = nn.Sequential(wrapped.blocks[0].attn.qkv)
    with pytest.raises(ValueError, match="attn.qkv.*Sequential"):
        optimize(wrapped)


def test_bf16_autocast_close_to_fp32(nano):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = nano(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = optimize(nano)(x)
    assert torch.isfinite(out).all()
    assert _max_diff(out, ref) < 0.05 * ref.abs().max().item()


def test_two_models_with_different_options_run_at_once_in_two_threads(nano):
    """Options belong to each optimised model: no process-wide switch to race on."""
    folded, unfolded = optimize(nano, fold="always"), optimize(nano, fold="never", dnn=False)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        ref = nano(x)
    errors: list[float] = []

    def run(model):
        with torch.no_grad():
            for _ in range(3):
                errors.append(_max_diff(model(x), ref))

    threads = [threading.Thread(target=run, args=(m,)) for m in (folded, unfolded)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 6 and max(errors) <= 1e-4
    assert [m.fold for m in folded.modules() if hasattr(m, "fold")][0] == "always"


def test_compile_fullgraph_of_the_optimized_model():
    torch._dynamo.reset()
    m = optimize(randomize(tiny_model(patch_size=8, embed_dim=48, depth=2, num_heads=4), seed=24))
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        assert _max_diff(torch.compile(m, fullgraph=True, dynamic=False)(x), m(x)) <= 1e-5


def test_fold_choice_by_shape():
    assert K.fold_choice("auto", 196, 384) is False and K.fold_choice("auto", 4096, 384) is True
    assert K.fold_choice("always", 1, 384) and not K.fold_choice("never", 10**6, 384)


def test_channel_attention_equals_normalised_queries_and_keys():
    """The Gram-matrix route equals F.normalize over tokens (the official computation), zero rows included."""
    torch.manual_seed(3)
    q, k = torch.randn(2, 3, 50, 8), torch.randn(2, 3, 50, 8)  # (B, h, N, d)
    q[:, :, :, 2] = 0  # a channel whose query is zero over all tokens: F.normalize's 1e-12 clamp gives logits 0
    temperature = torch.rand(3, 1, 1) + 0.5
    qn, kn = F.normalize(q.transpose(-2, -1), dim=-1), F.normalize(k.transpose(-2, -1), dim=-1)
    ref = ((qn @ kn.transpose(-2, -1)) * temperature).softmax(-1)
    torch.testing.assert_close(channel_attention(q, k, temperature), ref, atol=1e-6, rtol=1e-5)
    # the optimised XCA passes channel-major views (the same function)
    torch.testing.assert_close(channel_attention(q.transpose(-2, -1).contiguous().transpose(-2, -1),
                                                 k.transpose(-2, -1).contiguous().transpose(-2, -1), temperature),
                               ref, atol=1e-6, rtol=1e-5)


def test_bf16_eager_attention_and_lpi_kernels_against_float64():
    """Eager bf16 routes of the kernels (Gram from rows copied per head, bf16 norms, the LPI addition fused)
    compute the float64 result to bf16 rounding, and their graph-capture spelling to a few bf16 ulps."""
    torch.manual_seed(11)
    b, h, d, n = 3, 4, 8, 37
    qk = torch.randn(2 * h * d, b * n) + torch.randn(2 * h * d, 1)  # rows with a shared offset, like real queries
    temperature = torch.rand(h, 1, 1) + 0.5
    rows = qk.double().view(2, h, d, b, n).permute(0, 3, 1, 4, 2)  # (2, B, h, N, d)
    ref = channel_attention(rows[0], rows[1], temperature.double())
    low = qk.bfloat16()
    gram = K._channel_gram(low, b, h, d, n)
    norms = K._token_norms(low, b, h, d, n)
    assert gram.dtype == torch.bfloat16 and all(t.dtype == torch.bfloat16 for t in norms)  # the eager bf16 route
    attn = K.attention_from_gram(gram, *norms, temperature)
    assert attn.dtype == torch.float32
    assert _max_diff(attn, ref) < 2e-2 * ref.abs().max().item()
    assert _max_diff(attn, ref) > 1e-7  # bf16 really
    q, k = low.view(2, h, d, b, n).permute(0, 3, 1, 4, 2).unbind(0)
    assert _max_diff(gram, q.transpose(-2, -1) @ k) <= 2 ** -7 * gram.abs().max().item()  # the product on the views
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=torch.channels_last)
    other = torch.randn(2, 6, 5, 7).bfloat16().contiguous(memory_format=torch.channels_last)
    w, bias = torch.randn(6, 1, 3, 3).bfloat16(), torch.randn(6).bfloat16()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused = K.conv2d_add(x, w, bias, 1, 6, other)
        unfused = K.conv2d_add(x, w, bias, 1, 6, other, dnn=False)
    assert fused.dtype == unfused.dtype == torch.bfloat16
    assert _max_diff(fused, unfused) <= 2 ** -7 * unfused.abs().max().item()
    exact = other.double() + F.conv2d(x.bfloat16().double(), w.double(), bias.double(), 1, 1, 1, 6)
    assert _max_diff(fused, exact) <= 2 ** -7 * exact.abs().max().item()


def test_xca_matches_the_official_transcription_with_attention_dropout():
    """XCA in training mode, attention dropout on, against a line-by-line official forward (same RNG)."""
    torch.manual_seed(5)
    m = XCA(48, 4, attn_drop=0.3).train()
    x = torch.randn(2, 30, 48)

    def official(x):
        b, n, c = x.shape
        qkv = m.qkv(x).reshape(b, n, 3, 4, c // 4).permute(2, 0, 3, 1, 4)
        q, k, v = (t.transpose(-2, -1) for t in qkv.unbind(0))
        attn = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * m.temperature
        attn = m.attn_drop(attn.softmax(dim=-1))
        return m.proj((attn @ v).permute(0, 3, 1, 2).reshape(b, n, c))

    torch.manual_seed(7)
    ref = official(x)
    torch.manual_seed(7)
    torch.testing.assert_close(m(x), ref, atol=2e-6, rtol=1e-5)
    with torch.no_grad():
        assert _max_diff(m.eval()(x), ref) > 1e-3  # the dropout was really applied


@pytest.mark.parametrize("grid, kernel", [((1, 1), 3), ((1, 5), 3), ((6, 1), 3), ((2, 2), 3), ((5, 7), 3),
                                          ((2, 3), 5), ((4, 6), 5), ((7, 7), 7)])
def test_border_correction_equals_conv_of_constant(grid, kernel):
    """conv(pad(z + t)) = conv(pad(z)) + t * sum(w) - border taps, for every grid size and padding."""
    torch.manual_seed(12)
    c, pad = 5, kernel // 2
    z = torch.randn(2, c, *grid)
    t = torch.randn(c)
    w = torch.randn(c, 1, kernel, kernel)
    ref = F.conv2d(z + t[:, None, None], w, padding=pad, groups=c)
    y = F.conv2d(z, w, t * w.sum(dim=(1, 2, 3)), padding=pad, groups=c)
    K.subtract_border_sums(y, *K.border_sums(t[:, None, None] * w[:, 0], pad))
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_optimized_program_loads_in_a_fresh_process_without_xcit(tmp_path):
    """torch.export of the optimised model with dynamic batch, height and width: aten only, no xcit needed."""
    from xcit import export as ex

    m = optimize(randomize(tiny_model(), seed=25))
    path = ex.export_program(m, tmp_path / "m.pt2", example_size=(28, 28))
    inputs = [torch.randn(1, 3, 28, 28), torch.randn(3, 3, 33, 21)]
    outs = run_program_without_xcit(path, inputs, tmp_path)
    with torch.no_grad():
        for x, out in zip(inputs, outs, strict=True):
            assert _max_diff(out, m(x)) <= 1e-5


# --------------------------------------------------------------------------------------------
# dtype=torch.bfloat16: bf16 weights, pre-packed for oneDNN, autocast inside the blocks
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nano_bf16(nano):
    return optimize(nano, dtype=torch.bfloat16)


def test_bf16_model_runs_without_autocast_and_matches_autocast(nano, nano_bf16):
    """The bf16 model takes and returns float32 without the caller's autocast and computes what the fp32
    model computes under bf16 autocast (bf16 products, float32 norms and residuals), to bf16 rounding."""
    x = torch.randn(4, 3, 96, 80)
    with torch.no_grad():
        ref = nano(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = optimize(nano)(x).float()
        out = nano_bf16(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the blocks compute the same (the head follows the caller)
            again = nano_bf16(x)
    assert out.dtype == torch.float32
    scale = ref.abs().max().item()
    assert _max_diff(out, autocast) <= 2e-2 * scale
    assert _max_diff(out, ref) <= 4e-2 * scale
    assert _max_diff(out, ref) > 1e-6  # really bf16 products, not float32 ones
    assert _max_diff(again, out) <= 1e-2 * scale
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.75
    weights = [b for m in nano_bf16.modules() if isinstance(m, OptimizedXCABlock)
               for n, b in m.named_buffers(recurse=False) if n.endswith("_weight")]
    assert weights and all(w.dtype == torch.bfloat16 for w in weights)
    assert "dtype=torch.bfloat16" in repr(nano_bf16.blocks[0])


@pytest.mark.skipif(not K.HAS_ONEDNN, reason="pre-packing needs oneDNN (every x86 PyTorch build has it)")
def test_bf16_packed_weights_are_a_cache(nano_bf16):
    """Packed on first use, repacked when a weight changes in place; copies and pickles start empty and agree."""
    import copy
    import pickle

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = nano_bf16(x)
    cache = nano_bf16.blocks[0].packed
    assert len(cache) >= 4  # v, proj, fc1, fc2 of the first block
    for clone in (copy.deepcopy(nano_bf16), pickle.loads(pickle.dumps(nano_bf16))):
        assert len(clone.blocks[0].packed) == 0
        with torch.no_grad():
            assert _max_diff(clone(x), out) == 0.0
    changed = copy.deepcopy(nano_bf16)
    with torch.no_grad():
        changed(x)
        changed.blocks[0].fc2_weight.mul_(0.5)  # in place: the packed copy must follow
        halved = changed(x)
        fresh = copy.deepcopy(changed)  # packs the halved weight from scratch
        assert _max_diff(fresh(x), halved) == 0.0
    assert _max_diff(halved, out) > 1e-3


def test_bf16_model_compiles(nano_bf16):
    torch._dynamo.reset()
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        eager = nano_bf16(x)
        compiled = torch.compile(nano_bf16, fullgraph=True, dynamic=False)(x)
    assert compiled.dtype == torch.float32
    assert _max_diff(compiled, eager) <= 2e-2 * eager.abs().max().item()


def test_bf16_refuses_other_dtypes(nano):
    with pytest.raises(ValueError, match="dtype must be one of"):
        optimize(nano, dtype=torch.float16)
    with pytest.raises(ValueError, match="dtype must be one of"):
        optimize(nano, dtype="bf16")
