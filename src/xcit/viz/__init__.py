"""Attention visualisation: class-attention maps over patches and XCA channel attention."""
from .attention import AttentionMaps, forward_with_attention

__all__ = ["AttentionMaps", "forward_with_attention"]
