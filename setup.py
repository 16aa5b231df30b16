"""Build noencore: the Python package, its Triton kernels and its C++ CPU extension.

The C++ extension (``noencore._C``, from ``csrc/``) is optional at install time:
when torch's headers or a C++ compiler are missing, or the build fails, the
package installs without it and ``noencore.ops`` runs its torch path. That choice
is visible (``noencore.ops.cpp_available()``) and CI fails when the extension did
not build (``NOENCORE_REQUIRE_CPP=1``).

``NOENCORE_SANITIZE=1`` builds it with AddressSanitizer and UndefinedBehaviorSanitizer
instead (a failed build then fails); ``make sanitize`` (scripts/sanitize.sh) builds that
variant into .cache/sanitize, away from the installed one, and runs the op tests on it.

Build against the torch already installed (as flash-attention does)::

    pip install --no-build-isolation -e .
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cpp_extension():
    """Return (ext_modules, cmdclass) for the C++ extension, or ([], {}) if it can't build."""
    if os.environ.get("NOENCORE_NO_CPP") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as exc:  # torch absent at build time: torch paths only
        print(f"[noencore] building without the C++ extension: torch not importable ({exc})",
              file=sys.stderr)
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return [], {}
    # No -march: the build runs on any CPU of its architecture (a wheel or a shared
    # install may move to another machine). The AVX-512 kernels carry their own target
    # attributes and are chosen at run time (csrc/cpu_kernels.h).
    cxx = ["-O3", "-fopenmp", "-ffp-contract=fast", "-std=c++17"]
    link = ["-fopenmp"]
    sanitize = os.environ.get("NOENCORE_SANITIZE") == "1"
    if sanitize:
        # -O1 keeps reports readable; -fno-sanitize-recover: undefined behaviour aborts the
        # run like an ASan finding does, so that a finding cannot scroll past unnoticed.
        # -fno-wrapv undoes Python's -fwrapv, under which signed overflow is defined and
        # so never reported.
        flags = ["-fsanitize=address,undefined,float-cast-overflow",
                 "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g", "-fno-wrapv"]
        cxx = ["-O1", "-fopenmp", "-ffp-contract=fast", "-std=c++17", *flags]
        link = ["-fopenmp", *flags]
    ext = CppExtension("noencore._C", sources, extra_compile_args={"cxx": cxx},
                       extra_link_args=link,
                       depends=sorted(glob.glob(os.path.join("csrc", "*.h"))))

    class OptionalBuildExt(BuildExtension):
        """Build the extension, but let the install succeed without it (loudly)."""

        def run(self):
            try:
                super().run()
            except Exception as exc:
                if sanitize:
                    raise
                print(f"[noencore] WARNING: C++ extension failed to build ({exc}); "
                      "noencore.ops will use its torch path", file=sys.stderr)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                if sanitize:
                    raise
                print(f"[noencore] WARNING: C++ extension {ext.name} failed to build ({exc})",
                      file=sys.stderr)

    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _cpp_extension()

setup(
    name="noencore",
    version="0.1.0",
    description="Fast, measurable unlearning (opt-out) for MusicGen text-to-music models",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The Triton sources live in the top-level kernels/ folder (no __init__.py, so it is never
    # a regular top-level package that could shadow Hugging Face's `kernels`, which
    # transformers imports); noencore/kernels is a symlink to it, so the sources import as
    # noencore.kernels from a checkout, an editable install and a wheel alike.
    packages=find_packages(include=["noencore", "noencore.*"]) + ["noencore.kernels"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # torch, audiocraft, torchaudio and laion-clap are installed by scripts/setup_env.sh
    # (they need --no-deps and a torch pin); the rest are ordinary requirements.
    install_requires=["numpy", "soundfile", "tqdm", "pyyaml", "safetensors"],
    # the experiment trackers of `--report-to` (noencore/trackers.py)
    extras_require={"trackers": ["tensorboard", "wandb"]},
    entry_points={"console_scripts": ["noencore=noencore.cli:main"]},
)
