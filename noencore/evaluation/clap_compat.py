"""Import laion_clap on machines without a working torchvision.

laion_clap imports torchvision at module level for its *image* code paths only
(``torchvision.transforms`` for image preprocessing, ``torchvision.ops.misc.
FrozenBatchNorm2d`` for freezing image towers, ``torchvision.datasets`` in its
training data module). The audio and text towers that CLAP scores and embeddings
use never call them. On a CPU-only torch no matching torchvision wheel exists on
PyPI (the CUDA one fails to import), so when ``import torchvision`` fails we
register a stand-in that provides exactly those names; calling any of them raises
an error that says why. When a real torchvision imports (GPU nodes), it is used.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types

_STANDIN_NAMES = {
    "torchvision.transforms": ["Normalize", "Compose", "RandomResizedCrop", "InterpolationMode",
                               "ToTensor", "Resize", "CenterCrop"],
    "torchvision.ops.misc": ["FrozenBatchNorm2d"],
    "torchvision.datasets": [],
}


def _unavailable(qualname: str):
    class _Unavailable:
        def __init__(self, *args, **kwargs):
            raise RuntimeError(
                f"{qualname} is not available: torchvision does not import on this machine "
                "(no build matches the installed torch). noencore only uses CLAP's audio and "
                "text towers, which do not need it.")

    _Unavailable.__name__ = qualname.rsplit(".", 1)[-1]
    return _Unavailable


def _module(name: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    # a spec, so that importlib.util.find_spec() (used by transformers' availability
    # checks) does not fail on it; no distribution metadata exists, so those checks
    # still report torchvision as absent.
    mod.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
    return mod


def _install_torchvision_standin() -> None:
    root = _module("torchvision")
    root.__noencore_standin__ = True
    sys.modules["torchvision"] = root
    for modname, names in _STANDIN_NAMES.items():
        parts = modname.split(".")
        for i in range(2, len(parts) + 1):
            name = ".".join(parts[:i])
            if name not in sys.modules:
                mod = _module(name)
                sys.modules[name] = mod
                setattr(sys.modules[".".join(parts[: i - 1])], parts[i - 1], mod)
        for n in names:
            setattr(sys.modules[modname], n, _unavailable(f"{modname}.{n}"))


def import_laion_clap():
    """Return the ``laion_clap`` module, with a torchvision stand-in only if needed."""
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        _install_torchvision_standin()
    return importlib.import_module("laion_clap")
