from selfrefine_dist.config.load import ConfigError, load_config, save_config, to_yaml
from selfrefine_dist.config.schema import Config

__all__ = ["Config", "ConfigError", "load_config", "save_config", "to_yaml"]
