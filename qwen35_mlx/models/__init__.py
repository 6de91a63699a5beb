"""Qwen3.5 model definitions: config, text decoder, caches."""

from .config import ConfigError, ModelConfig, TextConfig
from .model import Model

__all__ = ["ConfigError", "Model", "ModelConfig", "TextConfig"]
