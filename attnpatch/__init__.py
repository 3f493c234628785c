"""attnpatch: patch the attention of transformers models at inference time.

import attnpatch
patch = attnpatch.apply(model, "act")          # or: with attnpatch.patched(model, "act"): ...
model.generate(...)                            # now with calibrated attention
patch.remove()                                 # bit-identical to the unpatched model again
"""

from . import methods  # noqa: F401  (registers the built-in methods)
from ._version import __version__
from .api import Patch, apply, available_methods, get_patch, patched, remove, unpatched
from .calibrate import calibrate
from .methods.base import UnsupportedModelError
from .profiles import Profile, ProfileError

__all__ = [
    "Patch",
    "Profile",
    "ProfileError",
    "UnsupportedModelError",
    "__version__",
    "apply",
    "available_methods",
    "calibrate",
    "get_patch",
    "patched",
    "remove",
    "unpatched",
]
