"""Errors a user meets in configuration, shared by the site and run configuration."""


class ConfigError(ValueError):
    """A configuration file or value is wrong; the message names the file (or run config) and the key."""


def check_section_keys(raw: object, where: str, section: str, known: set[str]) -> None:
    """A site YAML section must be a mapping of known keys; ConfigError naming the file, section and keys."""
    from collections.abc import Mapping

    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: key '{section}' must be a mapping, got {raw!r}")
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: key '{section}' has unknown keys {unknown}; known: {sorted(known)}")
