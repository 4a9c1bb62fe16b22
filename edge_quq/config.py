"""The service's configuration file: TOML whose keys are a command's long option names.

/etc/edge-quq/config holds one `key = value` line per setting of `edge-quq camera` (dashes or underscores,
`num-iter = 30` or `num_iter = 30`). The file is checked against the click command itself, so every option
the command grows is settable here without a second list to keep in sync, and a typo fails at start-up with
the key named instead of being silently ignored. The checked values become click's `default_map`: the file
replaces the built-in defaults and flags on the command line still win.
"""
from __future__ import annotations

import difflib
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional

import click

from edge_quq.errors import EdgeQuqError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.9/3.10 boards
    import tomli as tomllib

DEFAULT_CONFIG_PATH = Path("/etc/edge-quq/config")
CONFIG_ENVVAR = "EDGE_QUQ_CONFIG"
# Keys naming an input the service cannot run without: checked for existence when the file is read, so a
# wrong path is reported at start-up (with the key and path) instead of as a crash loop later.
MUST_EXIST = frozenset({"bundle"})
# Options that make no sense in a file: they act on the command line itself (a service whose config said
# mqtt-discovery-remove would delete its Home Assistant device and exit at every start).
NOT_CONFIGURABLE = frozenset({"config", "help", "version", "mqtt_discovery_remove"})


class ConfigError(EdgeQuqError):
    """The configuration file is unreadable, not TOML, or names an unknown key or a bad value."""


def read_toml(path: Path) -> Dict[str, Any]:
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file does not exist") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: config file is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None


def _long_names(param: click.Parameter) -> List[str]:
    if isinstance(param, click.Option):
        # Only the primary spelling: `no-xnnpack = true` for a `--xnnpack/--no-xnnpack` switch would read
        # as the opposite of what it says.
        names = [o[2:] for o in param.opts if o.startswith("--")]
        return names or ([param.name] if param.name else [])
    # Arguments have no flag: their parameter name is the key.
    return [param.name] if param.name else []


def config_keys(command: click.Command) -> Dict[str, click.Parameter]:
    """Every accepted key (both spellings) -> its parameter."""
    keys: Dict[str, click.Parameter] = {}
    for p in command.params:
        if p.name in NOT_CONFIGURABLE:
            continue
        for n in _long_names(p):
            keys[n] = p
            keys[n.replace("-", "_")] = p
    return keys


# Scalar click types: how an error message names the kind, and the example value the template shows.
_SCALAR_KINDS = (
    (click.types.BoolParamType, "true or false", "false"),
    (click.types.IntParamType, "an integer", "1"),  # IntRange included
    (click.types.FloatParamType, "a number", "0.5"),  # FloatRange included
)


def _scalar_kind(t: click.ParamType) -> Optional[tuple]:
    return next((k for k in _SCALAR_KINDS if isinstance(t, k[0])), None)


def _type_word(param: click.Parameter) -> str:
    t = param.type
    if isinstance(t, click.Choice):
        return "one of " + ", ".join(repr(c) for c in t.choices)
    kind = _scalar_kind(t)
    if kind is not None:
        return kind[1]
    if isinstance(t, click.Path):
        return "a path (string)"
    return "a string"


def _check_scalar(key: str, param: click.Parameter, value: Any, where: str) -> Any:
    """A TOML value of the right kind for the parameter, then click's own conversion (ranges, choices)."""
    t = param.type
    word = _type_word(param)
    bad = ConfigError(f"{where}: key {key!r} must be {word}, got {value!r}")
    if isinstance(t, click.Tuple):
        if not isinstance(value, list) or len(value) != len(t.types):
            raise ConfigError(f"{where}: key {key!r} must be a list of {len(t.types)} values, got {value!r}")
    elif isinstance(t, click.types.BoolParamType):
        if not isinstance(value, bool):
            raise bad
    elif isinstance(t, (click.types.IntParamType, click.IntRange)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif isinstance(t, (click.types.FloatParamType, click.FloatRange)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
    elif isinstance(value, (bool, dict, list)) or not isinstance(value, (str, int, float)):
        # Strings, paths, choices and custom types: TOML strings (numbers are accepted where a string of
        # digits would be, e.g. a device index).
        raise bad
    try:
        return t.convert(value, param, None)
    except click.BadParameter as e:
        raise ConfigError(f"{where}: key {key!r}: {e.message}") from None


def validate(command: click.Command, data: Mapping[str, Any], where: str, base_dir: Optional[Path] = None,
             must_exist: Iterable[str] = MUST_EXIST) -> Dict[str, Any]:
    """Check a parsed config against `command`; return click's default_map ({param name: value}).

    Relative paths (path options, and the path in a URI type that has `relative_to`) are taken relative to
    `base_dir` (the config file's folder), so a config and the bundle beside it can move together.
    """
    keys = config_keys(command)
    must = set(must_exist)
    out: Dict[str, Any] = {}
    seen: Dict[str, str] = {}
    for key, value in data.items():
        param = keys.get(key)
        if param is None:
            if isinstance(value, dict):
                raise ConfigError(f"{where}: unknown table [{key}]: settings are top-level keys (the `{command.name}` option names)")
            close = difflib.get_close_matches(key.replace("_", "-"), [k for k in keys if "_" not in k], n=3)
            hint = f" (did you mean {', '.join(close[:3])}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}; valid keys are the long options of `edge-quq {command.name}`")
        assert param.name is not None
        if param.name in seen:
            raise ConfigError(f"{where}: keys {seen[param.name]!r} and {key!r} set the same option")
        seen[param.name] = key
        multiple = bool(getattr(param, "multiple", False)) or (isinstance(param, click.Argument) and param.nargs != 1)
        if multiple:
            items = value if isinstance(value, list) else [value]
            conv: Any = [_check_scalar(key, param, v, where) for v in items]
        else:
            if isinstance(value, list) and not isinstance(param.type, click.Tuple):
                raise ConfigError(f"{where}: key {key!r} takes one value, got a list")
            conv = _check_scalar(key, param, value, where)
        relative_to = getattr(param.type, "relative_to", None)  # URIs that hold a path (OutputURI)
        if relative_to is not None and base_dir is not None:
            conv = [relative_to(v, base_dir) for v in conv] if isinstance(conv, list) else relative_to(conv, base_dir)
        if isinstance(param.type, click.Path):
            conv = _resolve_paths(conv, base_dir)
            if param.name in must:
                for p in conv if isinstance(conv, list) else [conv]:
                    if not Path(p).exists():
                        raise ConfigError(f"{where}: key {key!r}: {p} does not exist")
        out[param.name] = tuple(conv) if isinstance(conv, list) else conv
    return out


def _resolve_paths(value: Any, base_dir: Optional[Path]) -> Any:
    if isinstance(value, list):
        return [_resolve_paths(v, base_dir) for v in value]
    if base_dir is None or "://" in str(value):
        return value
    p = Path(str(value)).expanduser()
    resolved = p if p.is_absolute() else base_dir / p
    return type(value)(resolved) if isinstance(value, Path) else str(resolved)


def load_config(command: click.Command, path: Path) -> Dict[str, Any]:
    """Read and check `path` for `command`; the result is a default_map."""
    path = Path(path)
    return validate(command, read_toml(path), str(path), base_dir=path.parent.resolve())


def _apply(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    try:
        default_map = load_config(ctx.command, Path(value))
    except ConfigError as e:
        # Raised while click parses: report it the way every other user error is reported.
        click.echo(f"error: {e}", err=True)
        ctx.exit(e.exit_code)
    merged = dict(ctx.default_map or {})
    merged.update(default_map)
    ctx.default_map = merged
    return value


def config_option(fn: Any) -> Any:
    """`--config FILE` for a command: the file's values become defaults, flags still override.

    Eager, so it runs before the other options are resolved and their defaults come from the file.
    """
    return click.option(
        "--config", "config", type=click.Path(dir_okay=False, path_type=str), default=None, envvar=CONFIG_ENVVAR,
        is_eager=True, expose_value=False, callback=_apply,
        help=f"TOML file of option values (keys = long option names); flags override it. Env: {CONFIG_ENVVAR}.",
    )(fn)


def template(command: click.Command, values: Optional[Mapping[str, Any]] = None) -> str:
    """A commented config listing every key of `command`, with `values` set and the rest commented out."""
    values = dict(values or {})
    lines: List[str] = []
    seen = set()
    for p in command.params:
        names = _long_names(p)
        if not names or p.name in NOT_CONFIGURABLE or p.name in seen:
            continue
        seen.add(p.name)
        key = names[0]
        help_text = " ".join((getattr(p, "help", None) or "").split())
        lines += ["# " + line for line in textwrap.wrap(help_text or key, 104)]
        if key in values:
            lines.append(f"{key} = {_toml_value(values.pop(key))}")
        else:
            default = _plain_default(p)
            shown = _toml_value(default) if default not in (None, (), []) else _example(p)
            lines.append(f"#{key} = {shown}")
        lines.append("")
    if values:
        raise ValueError(f"template: unknown keys {sorted(values)}")
    return "\n".join(lines)


def _plain_default(p: click.Parameter) -> Any:
    """The parameter's default as a plain value, or None.

    Click 8.2/8.3 keep an internal UNSET sentinel as the default of options declared without one (flags
    included), where 8.1 and 8.4 give None/False; the template must not print the sentinel.
    """
    d = p.default
    if callable(d):
        return None
    if d is not None and not isinstance(d, (bool, int, float, str, tuple, list)):
        return False if getattr(p, "is_flag", False) else None
    return d


# Example values shown (commented out) for options without a default; paths point into the service's one
# writable folder. Options not listed get a value of the right type.
EXAMPLES: Dict[str, Any] = {
    "threads": 4, "num-iter": 30, "z": 0.8, "confidence-level": 0.9, "seed": 0, "width": 640, "height": 480,
    "fps": 15.0, "max-fps": 5.0, "crop": 0.8, "roi": "100,50,224,224", "duration": 3600.0, "frames": 1000,
    "output": ["jsonl:/var/lib/edge-quq/results.jsonl", "http://0.0.0.0:8080"], "jsonl": "/var/lib/edge-quq/results.jsonl", "video-out": "/var/lib/edge-quq/annotated.mp4",
    "snapshots": "/var/lib/edge-quq/snapshots", "serve": "0.0.0.0:8080", "mqtt": "mqtt://user:password@broker.local:1883",
    "mqtt-device": "porch-cam", "mqtt-ca-file": "/etc/ssl/certs/ca-certificates.crt", "mqtt-discovery": "homeassistant",
    "policy": "gated", "ood-alpha": 0.05, "target-error": 0.02, "delta": 0.05,
}


def _example(p: click.Parameter) -> str:
    names = _long_names(p)
    if names and names[0] in EXAMPLES:
        return _toml_value(EXAMPLES[names[0]])
    t = p.type
    if isinstance(t, click.Choice):
        return _toml_value(t.choices[0])
    kind = _scalar_kind(t)
    return kind[2] if kind is not None else '""'


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    s = str(v)
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


# What deploy/install.sh fills in (@...@ placeholders); every other option stays commented out.
# quiet: the stats are in `systemctl status` (STATUS=) and the stats file; a line every 10 s in the journal
# would only wear the SD card.
SERVICE_VALUES = {"source": "@SOURCE@", "bundle": "@BUNDLE_DIR@", "stats-file": "@STATE_DIR@/stats.json", "quiet": True}


def service_config_example(command: click.Command) -> str:
    """deploy/config.example: the file install.sh writes to /etc/edge-quq/config (@...@ filled in).
    Regenerate it with `edge-quq config-template > deploy/config.example`."""
    header = (
        "# /etc/edge-quq/config: settings of the edge-quq camera service (TOML).\n"
        "# Keys are the long options of `edge-quq camera --help` (dashes or underscores); a flag given on the\n"
        "# command line overrides the value here. Unknown keys and wrong types stop the service at start-up\n"
        "# with an error naming the key (journalctl -u edge-quq-camera). After editing:\n"
        "#   sudo systemctl restart edge-quq-camera\n"
        "# Lines starting with '#key =' show an example value; remove the '#' to set it.\n\n"
    )
    values = {k: v for k, v in SERVICE_VALUES.items() if k in {n for p in command.params for n in _long_names(p)}}
    return header + template(command, values)
