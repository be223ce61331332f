"""Typed configuration: one tree of dataclasses (`sections`), filled from defaults, a TOML
recipe and the command line (`loading`).

    cfg = load_config(["--job.config_file", "train_configs/debug_model.toml"])
"""

from titan.config.loading import ConfigError, format_help, load_config
from titan.config.sections import JobConfig

__all__ = ["ConfigError", "JobConfig", "format_help", "load_config"]
