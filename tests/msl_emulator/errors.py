class EmulatorError(Exception):
    """A kernel bug found by the MSL-on-CPU emulator, or a kernel it cannot build or run."""
