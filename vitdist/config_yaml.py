"""The config's YAML: a file and `key.sub=value` overrides read into a checked `Config`, and the
run's config written back (`<run.dir>/config.yaml`, which reads back to the same config)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from .config import PATH_KEYS, Config, ConfigError, sections, set_key, takes_text, to_dict
from .config_check import validate
from .files import written_whole


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last, so a
    second `train:` section would silently drop every key of the first. Integers read as YAML 1.2
    and people read them: PyYAML's YAML 1.1 reads 010 as octal (8) and 1:30 as base 60 (90). And
    Python's None is null, as people mean it: train.resume=None was a checkpoint path named 'None'."""

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int | str:
        text = self.construct_scalar(node).replace("_", "")
        if ":" in text:
            return text
        if re.fullmatch(r"[-+]?0[0-9]+", text):
            return int(text, 10)
        return super().construct_yaml_int(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key '{key_node.value}' is given twice",
                                                            key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


class _Dumper(yaml.SafeDumper):
    """Quotes the text that _Loader would read as something else (run.dir: 'None')."""


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
for _side in (_Loader, _Dumper):
    _side.add_implicit_resolver("tag:yaml.org,2002:null", re.compile(r"^None$"), ["N"])


def _flatten(tree: Any, source: str) -> dict[str, Any]:
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(tree).__name__}")
    flat = {}
    known = sections()
    for section, values in tree.items():
        if section not in known:  # checked here too: a section with no keys sets none to check
            raise ConfigError(f"{source}: unknown section '{section}'; sections are: {', '.join(known)}")
        values = {} if values is None else values  # a section whose keys are all commented out
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{section}' must be a mapping of keys, got {values!r}")
        for name, value in values.items():
            flat[f"{section}.{name}"] = value
    return flat


def parse_override(text: str) -> tuple[str, Any]:
    """`key.sub=value` with the value read as YAML (so 1e-3 is a float, [1,2] a list). A key that
    takes text gets the text as written unless YAML reads it as a list or null, or it is quoted: a
    brace pattern {a,b}.tar (a YAML syntax error), run.dir=2024-06-01 (a date), a pipe: command
    with ': ' in it (a mapping), a path with ' #' in it (YAML's comment: run.dir=/scratch/run #3
    was /scratch/run), and a path key's bare ~ (the home directory). A value left empty (key=, an
    unset shell variable) is refused: YAML would read it as null."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    key, raw = (part.strip() for part in text.split("=", 1))
    if not raw:  # data.val_shards=$VAL with VAL unset: YAML's null, which would turn validation off unsaid
        raise ConfigError(f"override '{text}' gives {key} no value (a shell variable that is not set?): give one, "
                          "or null for none")
    as_text = takes_text(key)
    if key in PATH_KEYS and raw == "~":  # YAML's null, but a path's ~ is the home directory (run.dir=~)
        return key, raw
    try:
        value = yaml.load(raw, _Loader)
    except yaml.YAMLError as e:
        if as_text and raw.startswith("[") and raw.endswith("]"):  # else read as one shard named '[a-0.tar, ...'
            raise ConfigError(f"override '{text}': a list whose items hold braces needs each item quoted (YAML reads "
                              f"an unquoted {{ in a list as a mapping): {key}=['a-{{0..3}}.tar', 'b-{{0..3}}.tar']") from None
        if as_text:
            return key, raw
        raise ConfigError(f"override '{text}': value is not valid YAML ({e})") from None
    if as_text and not isinstance(value, (list, type(None))) and raw[:1] not in "'\"":
        return key, raw
    return key, value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file at `path`, then `key.sub=value` overrides, each key checked."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' {'is not a file' if path.exists() else 'does not exist'}")
        try:
            tree = yaml.load(path.read_text(encoding="utf-8"), _Loader)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
        except UnicodeDecodeError as e:  # an editor's Latin-1
            raise ConfigError(f"config file '{path}' is not UTF-8 text: {e}") from None
        except OSError as e:
            raise ConfigError(f"config file '{path}' cannot be read: {e}") from None
        tree = {} if tree is None else tree  # an empty file; [] or false are no mapping of sections
        for key, value in _flatten(tree, str(path)).items():
            set_key(cfg, key, value)
    previous = None
    for text in overrides:
        key, value = parse_override(text)
        # A list too: data.train_shards=[/d/a-{0..3}.tar] unquoted is one list of one shard per override.
        patterns = value if isinstance(value, list) else [value] if isinstance(value, str) else None
        expanded = key in ("data.train_shards", "data.val_shards") and patterns and not any("{" in str(p) for p in patterns)
        if expanded and previous and previous[0] == key:
            # What the shell makes of an unquoted data.train_shards=/d/a-{0..3}.tar: one override per
            # shard, none with a brace left, of which the last would win: a run on one shard, silently.
            raise ConfigError(f"config key '{key}' is given twice in a row ('{previous[1]}', then '{text}'): a brace "
                              f"pattern that the shell expanded? Quote it: '{key}=.../name-{{000000..000099}}.tar'")
        set_key(cfg, key, value)
        previous = (key, text) if expanded else None
    validate(cfg)
    return cfg


def config_text(cfg: Config) -> str:
    """The config as YAML, as config.yaml holds it."""
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    """Whole or not at all: a run killed while writing it leaves the last one, which `--config` reads back."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with written_whole(path) as partial:
        partial.write_text(config_text(cfg))
