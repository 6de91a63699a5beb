"""MSL-on-CPU emulator: runs our Metal kernels on Linux with SIMT semantics and bug checks.

    from msl_emulator import emulate, EmulatorError
    outputs = emulate(spec, inputs, launch, orders=3)
    monkeypatch.setattr(KernelSpec, "run", run_on_emulator)  # a model's kernel calls run here

See launch.emulate for what is checked, source.py for how MLX's generated source becomes C++,
msl.h for the MSL surface supported and runtime.cpp for the scheduler.
"""

from .errors import EmulatorError
from .launch import emulate, run_on_emulator
from .source import generated_source

__all__ = ["EmulatorError", "emulate", "generated_source", "run_on_emulator"]
