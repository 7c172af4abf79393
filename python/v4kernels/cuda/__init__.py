"""Python launchers of the sm_90a CUDA kernels in ``v4kernels._C`` (one module per op family)."""
