"""MSL-on-CPU emulator: runs our Metal kernels on Linux with SIMT semantics and bug checks.

    from msl_emulator import emulate, EmulatorError
    outputs = emulate(spec, inputs, launch, orders=3)
    counters = profile(spec, inputs, launch)  # LaunchCounters: device bytes, bank conflicts...
    monkeypatch.setattr(KernelSpec, "run", run_on_emulator)  # a model's kernel calls run here

See launch.emulate for what is checked, source.py for how MLX's generated source becomes C++,
msl.h for the MSL surface supported and runtime.cpp for the scheduler.
"""

from .counters import BankSite, LaunchCounters
from .errors import EmulatorError
from .launch import emulate, profile, run_on_emulator
from .source import generated_source

__all__ = [
    "BankSite",
    "EmulatorError",
    "LaunchCounters",
    "emulate",
    "generated_source",
    "profile",
    "run_on_emulator",
]
