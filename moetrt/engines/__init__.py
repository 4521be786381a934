"""Engine directory format, builders, runtime, CPU reference executor (see docs/architecture.md).

Must not import torch at run time.
"""
