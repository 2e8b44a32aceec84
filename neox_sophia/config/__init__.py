"""GPT-NeoX YAML configs: loading and merging (loader), typed sections (model, sections), the
NeoX key registry (keys) and derived values (neox)."""
from neox_sophia.config.base import ConfigError
from neox_sophia.config.neox import IgnoredKeysWarning, Layout, NeoXConfig, config_from_values, load_config

__all__ = ["ConfigError", "IgnoredKeysWarning", "Layout", "NeoXConfig", "config_from_values", "load_config"]
