"""A config built in order: defaults, then a YAML file, then explicit overrides (the CLI's flags), validated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from graft.config.checks import validate
from graft.config.overrides import apply_overrides, flatten
from graft.config.sections import FitConfig
from graft.errors import GraftError

__all__ = ["load_config"]


def _read_yaml(path: Path, yaml) -> Any:
    """The YAML file's data; one line naming the file for bytes that are not UTF-8 text, bad YAML or nesting deeper
    than the parser's recursion allows."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as error:
        raise GraftError(f"{path}: not a UTF-8 text file (byte offset {error.start}); save the config as UTF-8 "
                         "YAML") from None
    except OSError as error:
        raise GraftError(f"{path}: cannot read the config file ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        raise GraftError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    except RecursionError:  # PyYAML composes nested nodes recursively
        raise GraftError(f"{path}: nested too deeply to be a graft config (sections data/model/train hold plain "
                         "values)") from None


def load_config(yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> FitConfig:
    """Defaults, then the YAML file (if any), then ``overrides`` (dotted keys), validated."""
    config = FitConfig()
    if yaml_path is not None:
        import yaml  # here: `graft --help` reads the fields' help and never loads a file
        path = Path(yaml_path)
        if not path.is_file():
            raise GraftError(f"{path}: config file not found")
        raw = _read_yaml(path, yaml)
        if not isinstance(raw, dict):
            raise GraftError(f"{path}: expected a mapping with sections data/model/train at the top level")
        apply_overrides(config, flatten(raw), str(path))
    apply_overrides(config, overrides or {})
    validate(config)
    return config
