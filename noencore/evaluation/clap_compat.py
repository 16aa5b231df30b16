"""Import laion_clap on machines without a working torchvision.

laion_clap imports torchvision at module level for its *image* code paths only
(``torchvision.transforms`` for image preprocessing, ``torchvision.ops.misc.
FrozenBatchNorm2d`` for freezing image towers, ``torchvision.datasets`` in its
training data module). The audio and text towers that CLAP scores and embeddings
use never call them. On a CPU-only torch no matching torchvision wheel exists on
PyPI (the CUDA one fails to import), so when ``import torchvision`` fails we
register a stand-in that provides exactly those names; calling any of them raises
an error that says why. When a real torchvision imports (GPU nodes), it is used.

laion_clap's training data module (imported by ``laion_clap`` itself) also builds
three hub tokenizers at import time (bert-base-uncased, roberta-base,
facebook/bart-base), only for its training loop. Offline that import fails (or hangs
retrying without ``HF_HUB_OFFLINE``). :func:`import_laion_clap` therefore imports it
with those ``from_pretrained`` calls deferred: each module-level tokenizer becomes a
:class:`LazyPretrained` that loads the real tokenizer on its first use and raises a
clear error then if it cannot. noencore never uses them (it tokenises captions with
the tokenizer it is given), so CLAP works offline with a local checkpoint and tokenizer.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import sys
import types
from collections.abc import Iterator
from typing import Any

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
    # checks) does not raise on it; see import_laion_clap for why transformers must
    # still be told torchvision is absent.
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


class LazyPretrained:
    """A tokenizer that laion_clap builds at import, loaded only on first use.

    Calls and attribute reads go to the real tokenizer, created then by the original
    ``from_pretrained(*args, **kwargs)``; a failure names the tokenizer and what to do.
    """

    def __init__(self, loader: Any, args: tuple, kwargs: dict):
        self._loader, self._args, self._kwargs = loader, args, kwargs
        self._obj: Any = None

    def _get(self) -> Any:
        if self._obj is None:
            try:
                self._obj = self._loader(*self._args, **self._kwargs)
            except Exception as exc:
                raise RuntimeError(
                    f"laion_clap needs the tokenizer {self._args[:1]} here, which could not be "
                    f"loaded ({exc}); put it in the Hugging Face cache or pass a local "
                    "tokenizer folder to noencore's CLAP loader") from exc
        return self._obj

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._get()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._get(), name)


@contextlib.contextmanager
def _deferred_tokenizers() -> Iterator[None]:
    """Within the block, ``<Bert|Roberta|Bart>Tokenizer.from_pretrained`` return lazy stand-ins."""
    import transformers

    saved = {}
    for name in ("BertTokenizer", "RobertaTokenizer", "BartTokenizer"):
        cls = getattr(transformers, name)
        if cls in saved:  # some of these names are aliases of one class
            continue
        saved[cls] = cls.__dict__.get("from_pretrained")
        loader = cls.from_pretrained  # bound classmethod: the real loader

        def lazy(_cls, *args, _loader=loader, **kwargs):
            return LazyPretrained(_loader, args, kwargs)

        cls.from_pretrained = classmethod(lazy)
    try:
        yield
    finally:
        for cls, orig in saved.items():
            if orig is None:
                del cls.from_pretrained  # it was inherited: fall back to the base class's
            else:
                cls.from_pretrained = orig


def import_laion_clap():
    """Return the ``laion_clap`` module, importable offline and on CPU-only torch.

    A torchvision stand-in is installed only if torchvision does not import; the
    training module's hub tokenizers are deferred (see the module docstring).
    """
    if "laion_clap" in sys.modules:
        return sys.modules["laion_clap"]
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        # transformers caches "is torchvision available?" on first ask; ask before the
        # stand-in exists, or it would see the stand-in's spec, say yes, and import
        # torchvision.transforms.functional from it when laion_clap loads BertModel.
        from transformers.utils import import_utils

        import_utils.is_torchvision_available()
        _install_torchvision_standin()
    standin = getattr(sys.modules.get("torchvision"), "__noencore_standin__", False)
    try:
        with _deferred_tokenizers():
            return importlib.import_module("laion_clap")
    finally:
        if standin:
            # laion_clap holds its own references to the stand-in's names; take it out of
            # sys.modules so that packages imported later (torchmetrics, via audiocraft)
            # find no torchvision, as before, instead of a partial one they would trip on.
            for name in [m for m in sys.modules
                         if m == "torchvision" or m.startswith("torchvision.")]:
                del sys.modules[name]
