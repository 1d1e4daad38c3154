"""torch.hub entry points: ``torch.hub.load("path/to/xcit", "xcit_small_12_p16", source="local")``.

Each official architecture is an entry; keyword arguments go to :func:`xcit.create_model`
(``pretrained=True`` downloads the official release weights where a network exists).
"""
import os
import sys

dependencies = ["torch"]

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from xcit.models import create_model as _create_model  # noqa: E402
from xcit.models import create_pyramid, list_models  # noqa: E402,F401


def _entry(name: str):
    def build(**kwargs):
        return _create_model(name, **kwargs)

    build.__name__ = name
    build.__doc__ = f"{name}: XCiT classifier; kwargs as xcit.create_model (num_classes, pretrained, checkpoint, ...)."
    return build


for _name in list_models():
    globals()[_name] = _entry(_name)
