"""The one body of the GPU check's stand-in modules (see README.md): importing a stand-in
and naming its attributes works (audiocraft does both at import time); calling or
reading anything from them raises ModuleNotFoundError naming the real package."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Missing:
    def __init__(self, name: str, package: str):
        self._name, self._package = name, package

    def _fail(self, *args: Any, **kwargs: Any) -> None:
        raise ModuleNotFoundError(
            f"{self._name}: {self._package} is not installed here (the GPU check puts a "
            f"stand-in on PYTHONPATH); install {self._package} to use it", name=self._package)

    __call__ = _fail

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        self._fail()


def module_getattr(package: str) -> Callable[[str], Missing]:
    """A module-level ``__getattr__`` for the stand-in of ``package``."""
    def __getattr__(name: str) -> Missing:
        if name.startswith("__"):
            raise AttributeError(name)
        return Missing(f"{package}.{name}", package)
    return __getattr__
