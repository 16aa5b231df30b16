"""Stand-in for `xformers` on the GPU check machine (see ../README.md)."""
