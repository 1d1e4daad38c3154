"""torch.compile (one graph, no breaks) agrees with eager execution; torch.export: see test_export.py."""
import pytest
import torch

from conftest import randomize, tiny_model


@pytest.fixture(scope="module")
def model():
    return randomize(tiny_model(patch_size=8, embed_dim=48, depth=2, num_heads=4), seed=11).eval()


def test_compile_fullgraph_matches_eager(model):
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        assert (compiled(x) - model(x)).abs().max().item() <= 1e-5


def test_compile_training_step_matches_eager():
    torch._dynamo.reset()
    eager = randomize(tiny_model(depth=2), seed=12).train()
    comp = tiny_model(depth=2).train()
    comp.load_state_dict(eager.state_dict())
    compiled = torch.compile(comp, fullgraph=True, backend="aot_eager")  # autograd graph capture, no C++ build
    x = torch.randn(4, 3, 16, 16)
    eager(x).logsumexp(-1).mean().backward()
    compiled(x).logsumexp(-1).mean().backward()
    for (name, a), b in zip(eager.named_parameters(), comp.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name
