"""Third-party warnings that ask the user to act when nothing is wrong, silenced only
around noencore's own imports and builds of audiocraft (``quiet_audiocraft``).

- xFormers, imported by audiocraft's transformer module, logs six lines when its
  compiled library does not load: "xFormers can't load C++/CUDA extensions. xFormers
  was built for: PyTorch 2.10.0+cu128 ... Please reinstall xformers" (or "Need to
  compile C++ extensions ... Please install xformers properly" when it has none). Its
  wheels are CUDA builds: with a torch that has no CUDA, no xFormers build could load,
  and nothing needs one: audiocraft with its default ``attention_backend='torch'``
  uses only ``xformers.ops.unbind`` and ``LowerTriangularMask``, plain Python. The
  message is dropped there; with a CUDA torch a mismatch is a real problem and shows.
- audiocraft's SEANet (EnCodec) wraps its convolutions in ``torch.nn.utils.weight_norm``,
  which torch deprecates with a FutureWarning at every codec build: it is addressed to
  audiocraft's code, and the user can do nothing about it.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

_XFORMERS_NO_EXTENSION = ("WARNING[XFORMERS]: xFormers can't load C++/CUDA extensions",
                          "WARNING[XFORMERS]: Need to compile C++ extensions")


def _not_xformers_extension_message(record: logging.LogRecord) -> bool:
    """Logging filter: False (drop) for xFormers' missing-extension message only."""
    return not record.getMessage().startswith(_XFORMERS_NO_EXTENSION)


@contextmanager
def quiet_audiocraft() -> Iterator[None]:
    """Import or build audiocraft modules inside this block without the two warnings of
    the module doc; every other warning and log record passes."""
    import torch

    xformers_log = logging.getLogger("xformers")  # xFormers logs the message at import
    cpu_only = torch.version.cuda is None and torch.version.hip is None
    if cpu_only:
        xformers_log.addFilter(_not_xformers_extension_message)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`torch\.nn\.utils\.weight_norm` is "
                                    "deprecated", category=FutureWarning)
            yield
    finally:
        if cpu_only:
            xformers_log.removeFilter(_not_xformers_extension_message)
