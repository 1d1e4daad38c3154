"""Benchmarks of this XCiT against timm's XCiT and a matched ViT: speed, peak memory, scaling, bf16.

``xcit bench`` parses its options into :class:`BenchSettings` and calls :func:`run_suite`;
``benchmarks/*.py`` call these functions directly.
"""
from .agreement import bf16_agreement
from .suite import PRESETS, Bench, BenchSettings, render_files, run_suite

__all__ = ["PRESETS", "Bench", "BenchSettings", "bf16_agreement", "render_files", "run_suite"]
