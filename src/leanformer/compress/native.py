"""The fused low-bit CPU kernels (lowbit.cpp), built on first use with torch's own extension builder.

`ops()` returns the compiled module, or None where it cannot be built here (no C++ compiler, a
platform torch cannot build for); the reason is warned once and every caller then keeps its plain
torch path. The build is cached by torch (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions)
and rebuilt when the source changes; concurrent processes wait on torch's build lock.

The instruction set is named, not read off the build machine (-march=native), so a cache shared
between machines never hands one a build it cannot run: torch's own CPU capability picks it.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("lowbit.cpp")
_ARCH_FLAGS = {"AVX512": ["-march=x86-64-v3"], "AVX2": ["-march=x86-64-v3"]}  # the kernels are written for AVX2 + FMA
_STATE: dict[str, object] = {}
DISABLE_ENV = "LEANFORMER_NATIVE"  # LEANFORMER_NATIVE=0 keeps every layer on its plain torch path


def ops():
    """The compiled kernels, or None (with one warning saying why) where they cannot be built."""
    if "ops" in _STATE:
        return _STATE["ops"]
    module = None
    if os.environ.get(DISABLE_ENV, "1") == "0":
        _STATE["ops"] = None
        return None
    try:
        from torch.utils.cpp_extension import load

        capability = torch.backends.cpu.get_cpu_capability()
        module = load(name=f"leanformer_lowbit_{capability.lower()}", sources=[str(SOURCE)],
                      extra_cflags=["-O3", "-fopenmp-simd", *_ARCH_FLAGS.get(capability, [])], verbose=False)
    except Exception as e:  # noqa: BLE001 — a missing compiler, headers or linker all mean "use torch ops"
        warnings.warn(f"leanformer's fused low-bit kernels could not be built here ({type(e).__name__}: "
                      f"…{str(e)[-600:]}); quantized layers compute with plain torch ops instead", stacklevel=2)
    _STATE["ops"] = module
    return module
