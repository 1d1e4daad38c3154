"""Shared test helpers."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from skip_policy import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401 (hooks: no test may skip)

torch.set_num_threads(min(2, os.cpu_count() or 1))

# Keys, shapes and parameter counts of the 14 official release checkpoints: part of the repository.
REFERENCE = Path(__file__).resolve().parents[1] / "reference" / "official_state_dicts.json"


@pytest.fixture(scope="session")
def official_layout() -> dict:
    if not REFERENCE.is_file():
        pytest.fail(f"{REFERENCE} is missing: it is part of the repository (restore it with git checkout)")
    return json.loads(REFERENCE.read_text())


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Perturb every parameter and BatchNorm statistic so no layer is at its (often trivial) init.

    LayerScale gammas of depth-24 models start at 1e-5, which would hide errors in the blocks.
    """
    from xcit.bench.contenders import perturb

    return perturb(model, seed, noise=0.05)


def tiny_model(**overrides):
    """A small XCiT for fast tests (patch 4, 32 channels, 2 blocks)."""
    from xcit import create_model

    kwargs = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10, tokens_norm=True)
    kwargs.update(overrides)
    return create_model("xcit_nano_12_p16", **kwargs)


def run_program_without_xcit(program_path, inputs, workdir):
    """Outputs of a saved ``torch.export`` program on ``inputs``, computed in a fresh Python process in
    which ``import xcit`` fails: the program must stand on torch alone."""
    import subprocess
    import sys
    import textwrap

    torch.save(list(inputs), workdir / "inputs.pt")
    code = textwrap.dedent(f"""
        import sys, torch
        sys.modules["xcit"] = None
        program = torch.export.load({str(program_path)!r}).module()
        inputs = torch.load({str(workdir / 'inputs.pt')!r}, weights_only=True)
        with torch.no_grad():
            torch.save([program(x) for x in inputs], {str(workdir / 'outputs.pt')!r})
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(workdir / "outputs.pt", weights_only=True)
