"""The bridge: mirrors map partitions between hosts (README, "Across hosts: the bridge")."""
from .config import Config, ConfigError, load

__all__ = ["Config", "ConfigError", "load"]
