"""mmn: multimodal neurons in frozen text-only transformers.

Importing mmn first makes torchvision (and so transformers, timm, open_clip and
lightning) importable on a CPU build of torch; see `mmn.compat`.
"""

from mmn.compat import ensure_torchvision_importable

ensure_torchvision_importable()

__version__ = "0.1.0"
