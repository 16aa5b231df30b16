"""Stand-in for `spacy` on the GPU check machine (see ../README.md): importing it and naming
its attributes works; using them raises ModuleNotFoundError (../_noencore_missing.py)."""
from _noencore_missing import module_getattr

__getattr__ = module_getattr("spacy")
