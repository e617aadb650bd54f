"""Errors a user meets in configuration, shared by the site and run configuration."""


class ConfigError(ValueError):
    """A configuration file or value is wrong; the message names the file (or run config) and the key."""
