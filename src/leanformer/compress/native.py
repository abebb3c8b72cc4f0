"""The fused low-bit CPU kernels (lowbit.cpp), built on first use with torch's own extension builder.

`ops()` returns the compiled module, or None where it cannot be built here (no C++ compiler, a platform
torch cannot build for; the reason is warned once) or LEANFORMER_NATIVE=0 turns it off: every caller then
keeps its plain torch path. The build is cached by torch (TORCH_EXTENSIONS_DIR, default
~/.cache/torch_extensions) and rebuilt when the source changes; concurrent processes wait on torch's
build lock, so the first call can take a minute (about 35 s on 2 cores), later ones none.

The instruction set is named, not read off the build machine (-march=native), so a cache shared between
machines never hands one a build it cannot run: torch's own CPU capability picks the AVX2 + FMA build,
anything else the portable (scalar) one.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("lowbit.cpp")
ARCH_FLAGS = {"AVX2": ["-march=x86-64-v3"], "AVX512": ["-march=x86-64-v3"]}  # the kernels use AVX2 + FMA at most
DISABLE_ENV = "LEANFORMER_NATIVE"  # LEANFORMER_NATIVE=0 keeps every layer on its plain torch path
_STATE: dict[str, object] = {}


def build(capability: str):
    """Compile (or load from torch's cache) the kernels for one torch CPU capability ("AVX2", "DEFAULT", …)."""
    from torch.utils.cpp_extension import load

    flags = ARCH_FLAGS.get(capability, [])
    return load(name=f"leanformer_lowbit_{'avx2' if flags else 'portable'}", sources=[str(SOURCE)],
                extra_cflags=["-O3", *flags], verbose=False)


def ops():
    """The compiled kernels for this machine, or None (with one warning saying why) where they cannot be built."""
    if "ops" in _STATE:
        return _STATE["ops"]
    module = None
    if os.environ.get(DISABLE_ENV, "1") != "0":
        try:
            module = build(torch.backends.cpu.get_cpu_capability())
        except Exception as e:  # noqa: BLE001 — a missing compiler, headers or linker all mean "use torch ops"
            warnings.warn(f"leanformer's fused low-bit kernels could not be built here ({type(e).__name__}: "
                          f"…{str(e)[-600:]}); quantized layers compute with plain torch ops instead", stacklevel=2)
    _STATE["ops"] = module
    return module
