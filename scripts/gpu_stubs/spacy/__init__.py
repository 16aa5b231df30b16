"""Stand-in for `spacy` on the GPU check machine (see ../README.md): importing it and naming
its attributes works (audiocraft does both at import time); calling or reading
anything from them raises ModuleNotFoundError."""


class _Missing:
    def __init__(self, name: str):
        self._name = name

    def _fail(self, *args, **kwargs):
        raise ModuleNotFoundError(f"{self._name}: spacy is not installed here (the GPU check "
                                  "puts a stand-in on PYTHONPATH); install spacy to use it",
                                  name="spacy")

    __call__ = _fail

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        self._fail()


def __getattr__(name: str) -> _Missing:
    if name.startswith("__"):
        raise AttributeError(name)
    return _Missing(f"spacy.{name}")
