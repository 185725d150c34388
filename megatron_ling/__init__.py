"""megatron-ling: Ling 2.0 (BailingMoeV2) on stock Megatron-Core."""
from megatron_ling.version import __version__  # noqa: F401
