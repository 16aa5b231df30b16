"""What audiocraft's transformer takes from ``xformers.ops`` with its default attention
backend ("torch"): ``unbind``, the same split as ``torch.unbind``. xformers' own
attention kernels are not here; asking for them raises ModuleNotFoundError."""
from torch import unbind  # noqa: F401


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    raise ModuleNotFoundError(f"xformers.ops.{name}: xformers is not installed here (the GPU "
                              "check puts a stand-in on PYTHONPATH)", name="xformers")
