"""What ``create_model`` returns is an ordinary ``nn.Module``: the tools people bring work on it.

One test per tool, each on the plain nano (patch 16) and a patch-8 model: forward hooks, module
replacement, PEFT LoRA, dynamic int8 quantisation, FX feature extraction, TorchScript tracing and
scripting, ``torch.export`` with dynamic sizes, ``torch.compile``, deepcopy / pickle, gradient
checkpointing, DDP, and the dtype rules. (ONNX export of the plain and optimised models:
tests/test_export.py; the optimised model: tests/test_optimize.py.)
"""
from __future__ import annotations

import copy
import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import randomize, run_program_without_xcit
from xcit import create_model

NAMES = ["xcit_nano_12_p16", "xcit_nano_12_p8"]


@pytest.fixture(scope="module", params=NAMES)
def model(request):
    return randomize(create_model(request.param, num_classes=10), seed=3).eval()


def _x(batch: int = 2, h: int = 48, w: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _leaves(m: nn.Module) -> dict[str, nn.Module]:
    return {n: mod for n, mod in m.named_modules() if n and not list(mod.children())}


def test_forward_hooks_fire_on_every_leaf_module(model):
    calls: dict[str, int] = {}
    handles = [mod.register_forward_hook(lambda *_, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
               for n, mod in _leaves(model).items()]
    try:
        with torch.no_grad():
            model(_x())
    finally:
        for h in handles:
            h.remove()
    assert set(calls) == set(_leaves(model)), sorted(set(_leaves(model)) - set(calls))
    weighted = {n for n, m in _leaves(model).items() if isinstance(m, (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.BatchNorm2d))}
    assert all(calls[n] == 1 for n in weighted)  # each layer with weights is called once per use


def test_a_replaced_submodule_is_used(model):
    class Scaled(nn.Module):
        def __init__(self, inner: nn.Module, scale: float) -> None:
            super().__init__()
            self.inner, self.scale = inner, scale

        def forward(self, x):
            return self.inner(x) * self.scale

    m = copy.deepcopy(model)
    x = _x()
    with torch.no_grad():
        ref = m(x)
        for path in ("blocks.0.attn.qkv", "blocks.1.mlp.fc1", "blocks.2.local_mp.conv2", "cls_attn_blocks.0.attn.proj"):
            parent, name = path.rsplit(".", 1)
            module = m.get_submodule(parent)
            original = getattr(module, name)
            setattr(module, name, Scaled(original, 1.0))
            torch.testing.assert_close(m(x), ref, atol=1e-6, rtol=1e-6)  # the wrapper runs (and changes nothing)
            setattr(module, name, Scaled(original, 1.5))
            assert (m(x) - ref).abs().max() > 1e-3, path  # ... and is honoured
            setattr(module, name, original)


def test_peft_lora_changes_the_output_and_trains(model):
    import peft
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "fc1"], init_lora_weights=False)
    lora = peft.get_peft_model(copy.deepcopy(model), config)
    x = _x()
    with torch.no_grad():
        assert (lora(x) - model(x)).abs().max() > 1e-3
    lora.train()
    lora(_x(4)).logsumexp(-1).mean().backward()
    grads = {n: p.grad for n, p in lora.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    assert sum(1 for n in grads if ".qkv." in n) == 2 * (12 + 2)  # A and B on every XCA and class-attention qkv
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_dynamic_int8_quantisation(model):
    quantised = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    assert not any(type(m) is nn.Linear for m in quantised.modules())
    x = _x()
    with torch.no_grad():
        ref, out = model(x), quantised(x)
    assert torch.nn.functional.cosine_similarity(out, ref, dim=-1).min() > 0.99
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


def test_fx_feature_extraction(model):
    from torchvision.models.feature_extraction import create_feature_extractor

    extractor = create_feature_extractor(model, return_nodes={"blocks.5": "block5", "norm": "tokens", "head": "logits"})
    x = _x(2, 56, 40)
    with torch.no_grad():
        out = extractor(x)
        ref_map = model.get_intermediate_layers(x, [5])[0]
        torch.testing.assert_close(out["logits"], model(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["tokens"], model.forward_features(x), atol=1e-5, rtol=1e-5)
    hp, wp = ref_map.shape[-2:]
    torch.testing.assert_close(out["block5"].transpose(1, 2).reshape(ref_map.shape), ref_map, atol=1e-5, rtol=1e-5)
    assert out["block5"].shape[1] == hp * wp


@pytest.mark.parametrize("batch", [1, 2])
def test_jit_trace(model, batch):
    x = _x(batch)
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
        torch.testing.assert_close(traced(x), model(x), atol=1e-5, rtol=1e-5)
        other = _x(batch, seed=1)  # another input of the traced size
        torch.testing.assert_close(traced(other), model(other), atol=1e-5, rtol=1e-5)


def test_jit_script(model):
    scripted = torch.jit.script(model)
    for x in (_x(), _x(1, 64, 96)):
        with torch.no_grad():
            torch.testing.assert_close(scripted(x), model(x), atol=1e-5, rtol=1e-5)


def test_torch_export_dynamic_batch_height_width_loads_without_xcit(model, tmp_path):
    p = model.patch_size
    dim = torch.export.Dim
    dims = {0: dim("batch", min=1, max=64), 2: dim("height", min=p + 1, max=4096), 3: dim("width", min=p + 1, max=4096)}
    with torch.no_grad():
        program = torch.export.export(model, (_x(),), dynamic_shapes=(dims,))
    path = tmp_path / "m.pt2"
    torch.export.save(program, path)
    inputs = [_x(1, 64, 96, seed=1), _x(3, 2 * p + 3, 5 * p - 1, seed=2)]
    outs = run_program_without_xcit(path, inputs, tmp_path)
    with torch.no_grad():
        for x, out in zip(inputs, outs, strict=True):
            torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)


def test_compile_fullgraph_forward_and_backward(model):
    torch._dynamo.reset()
    eager = copy.deepcopy(model).train()
    compiled_model = copy.deepcopy(model).train()
    # the whole forward and backward graph captured (inductor code generation: tests/test_compile.py)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    x = _x(4)
    torch.manual_seed(0)
    eager(x).logsumexp(-1).mean().backward()
    torch.manual_seed(0)
    compiled(x).logsumexp(-1).mean().backward()
    for (name, a), b in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_deepcopy_and_pickle(model):
    x = _x()
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(copy.deepcopy(model)(x), ref)
        torch.testing.assert_close(pickle.loads(pickle.dumps(model))(x), ref)
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        buffer.seek(0)
        fresh = create_model(f"xcit_nano_12_p{model.patch_size}", num_classes=10).eval()
        fresh.load_state_dict(torch.load(buffer, weights_only=True))
        torch.testing.assert_close(fresh(x), ref)


def test_gradient_checkpointing_gives_the_same_gradients(model):
    plain, ckpt = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    ckpt.set_grad_checkpointing(True)
    x = _x(4)
    for m in (plain, ckpt):
        m(x).logsumexp(-1).mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-5, msg=name)
    for a, b in zip(plain.buffers(), ckpt.buffers()):  # BatchNorm statistics updated once, not twice
        torch.testing.assert_close(b, a)


_DDP_WORKER = """
import gc, sys, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from xcit import create_model


def step_and_compare(rank):
    torch.manual_seed(0)
    model = create_model(sys.argv[3], num_classes=10)
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    x = torch.randn(2, 3, 48, 40, generator=torch.Generator().manual_seed(rank + 1))
    ddp(x).logsumexp(-1).mean().backward()
    opt.step()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1]), "replicas diverged"
    return flat


rank = int(sys.argv[1])
# a file store: no TCP store living in rank 0's process, which could exit while rank 1 still shuts down
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
# DDP's reducer holds the process group: it is dropped with the function's frame, so the group really shuts
# down in destroy_process_group rather than during interpreter teardown (where gloo's threads can abort)
flat = step_and_compare(rank)
gc.collect()  # any reference cycle through the DDP wrapper
if rank == 0:
    torch.save(flat, sys.argv[4])
dist.barrier()
dist.destroy_process_group()
"""


def test_ddp_two_processes_stay_in_sync(tmp_path, model):
    store = str(tmp_path / "store")
    name = f"xcit_nano_12_p{model.patch_size}"
    script = tmp_path / "worker.py"
    script.write_text(_DDP_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), store, name, str(tmp_path / "w.pt")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for rank, p in enumerate(procs):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, f"rank {rank} exited with {p.returncode}:\n{err[-3000:]}"
    assert Path(tmp_path / "w.pt").is_file()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_a_cast_model_runs_in_its_dtype(model, dtype):
    m = copy.deepcopy(model).to(dtype)
    x = _x()
    with torch.no_grad():
        out = m(x.to(dtype))
        ref = model(x)
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float64 else 0.1 * ref.abs().max().item()
    assert (out.float() - ref).abs().max() < tol


def test_input_dtype_mismatch_is_a_value_error_before_any_layer(model):
    for dtype in (torch.float64, torch.float16):
        with pytest.raises(ValueError, match=rf"dtype torch.float32, got {dtype}"):
            model(_x().to(dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast is not a mismatch
        assert model(_x().to(torch.bfloat16)).shape == (2, 10)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_onnx_both_exporters_dynamic_with_onnxruntime_parity(model, exporter, tmp_path):
    from xcit import export as ex

    path = ex.export_onnx(model, tmp_path / "m.onnx", example_size=(48, 40), exporter=exporter)
    sizes = ex.check_sizes((48, 40), model.patch_size)  # square-ish, rectangular, not a multiple of the patch
    rows = ex.check_onnx(model, path, sizes)
    assert len(rows) == 3 and max(r["max_abs_diff"] for r in rows) < 1e-4, rows
