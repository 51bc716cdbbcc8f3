"""The bridge: mirrors map partitions between hosts (DESIGN §4)."""
from .config import Config, ConfigError, load

__all__ = ["Config", "ConfigError", "load"]
