"""Training runtime: ``trainops train`` (config, embedded domains, MoE model, continual loop,
checkpoints, report). See :mod:`trainops.runtime.cli`."""
from trainops.runtime.config import ConfigError, TrainConfig, load_config

__all__ = ["TrainConfig", "ConfigError", "load_config"]
