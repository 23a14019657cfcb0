from lightning_synfer.config.compose import ConfigError, compose, list_experiments, to_container, validate
from lightning_synfer.config.schema import Config

__all__ = ["Config", "ConfigError", "compose", "list_experiments", "to_container", "validate"]
