"""Make `import torchvision` work on a CPU build of torch.

The torchvision wheel that pairs with torch 2.13.0 is built for CUDA. On CPU
torch its C extension cannot load, and torchvision's import then fails while
registering fake (meta) kernels for `torchvision::nms` and `torchvision::qnms`,
which it does whether or not the extension loaded ("operator torchvision::nms
does not exist"). transformers, timm, open_clip and lightning all import
torchvision, so without this nothing in mmn imports.

The fix defines the two missing operator schemas, and only when the extension
cannot load. On a machine where it loads (CUDA torch), nothing changes.
Calling the ops themselves still fails, as it would without the fix: mmn never
uses them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

# The schemas torchvision's C++ extension would have registered.
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
# A torch.library.Library removes its definitions when garbage-collected: keep it.
_stand_in_library: torch.library.Library | None = None


def torchvision_extension_loads() -> bool:
    """True when torchvision is absent or its C extension loads on this torch."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True
    extensions = sorted(Path(spec.origin).parent.glob("_C*.so")) + sorted(Path(spec.origin).parent.glob("_C*.pyd"))
    if not extensions:
        return False
    try:
        torch.ops.load_library(str(extensions[0]))
    except (OSError, ImportError):
        return False
    return True


def ensure_torchvision_importable() -> bool:
    """Define torchvision's op schemas if its extension cannot load. Returns True if it did."""
    global _stand_in_library
    if _stand_in_library is not None or torchvision_extension_loads():
        return False
    _stand_in_library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _stand_in_library.define(schema)
    return True
