"""WSM checkpoint merging (``ling-merge``): emulate the LR decay of a constant-LR run offline."""
