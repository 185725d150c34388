"""``profiling`` section of a training recipe: which steps the pipeline bubble profiler records."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megatron_ling.errors import LingConfigError


@dataclass
class ProfilingConfig:
    """Pipeline bubble profiler (``ling-bubbles report RUN_DIR`` reads what it writes).

    enabled   record forward/backward/p2p-wait intervals of every pipeline rank
    steps     iterations to record (1-based, as the trainer counts); skip the first, which pays
              one-off allocation and warm-up costs
    dir       output folder; null = RUN_DIR/bubbles
    all_ranks record every rank; by default only the pipeline ranks of the first model replica
              (tp = cp = dp = 0), which is what the bubble analysis needs
    cuda_events time with CUDA events on GPUs (host timestamps would only show launch times)
    """

    enabled: bool = False
    steps: list = field(default_factory=lambda: [2, 3])
    dir: Optional[str] = None
    all_ranks: bool = False
    cuda_events: bool = True

    def validate(self, prefix: str = "profiling") -> "ProfilingConfig":
        if not isinstance(self.enabled, bool):
            raise LingConfigError(f"{prefix}.enabled: must be true or false, got {self.enabled!r}")
        if isinstance(self.steps, int):
            self.steps = [self.steps]
        if not isinstance(self.steps, (list, tuple)) or not self.steps or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in self.steps):
            raise LingConfigError(f"{prefix}.steps: must be a non-empty list of iterations >= 1, got {self.steps!r}")
        if self.dir is not None and not isinstance(self.dir, str):
            raise LingConfigError(f"{prefix}.dir: must be a path or null, got {self.dir!r}")
        return self
