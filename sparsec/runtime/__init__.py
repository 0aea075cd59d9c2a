"""Runtime: compiled kernels for a layer, their index plans, and launchers (triton and interpret)."""
