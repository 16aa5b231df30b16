"""The version of noencore (recorded in the opt-out requests a model folder keeps)."""
__version__ = "0.1.0"
