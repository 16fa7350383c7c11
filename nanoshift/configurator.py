"""
Config files + command-line overrides, shared by every entry point.

    python train.py config/gate.py --batch_size=16 --cut_layer=[3,7] --compile=False
    python analyze.py --ckpt out-a/ckpt.pt out-b/ckpt.pt --num_sequences=100

A script declares its settings as a dict of defaults and calls
`settings = configure(defaults, sys.argv[1:])`. Arguments are applied left to right:

- `path.py`          a plain-Python config file, executed with the current settings in scope;
                     every top-level name it assigns must be a known setting (names starting
                     with `_` are private helpers and are ignored).
- `--key=value`      one override; the value may itself contain `=`.
- `--key v1 v2 ...`  the same for list settings (or one value for any setting); a bare `--flag`
                     sets a boolean to True.

Values are checked against the default's type: an int is accepted for a float, booleans parse
from True/False/true/false/1/0, strings are taken literally, a default of None accepts any
Python literal (falling back to the raw string), a list setting also takes one plain string
(`--ckpt=a.pt` is `["a.pt"]`), so every list setting arrives as a list. Unknown keys fail with the
closest valid names.

`--help` lists every setting with its value and a one-line description: the comment next to the
setting's default in the entry point's source (`help_from`), so the defaults block is the one place
a setting is described.
"""

import ast
import difflib
import io
import os
import sys
import tokenize

from nanoshift.common import SettingError, exit_with

ConfigError = SettingError  # a bad setting: exit status 2 (common.py's rule)


_BOOL_WORDS = {"true": True, "1": True, "false": False, "0": False}


def _type_name(types):
    return " or ".join(t.__name__ for t in types)


def _check(key, value, default, extra_types=()):
    """Return value converted to the setting's type, or raise ConfigError."""
    if default is None:
        return value
    types = tuple(dict.fromkeys((type(default),) + tuple(extra_types)))
    if isinstance(value, bool) and bool not in types:
        raise ConfigError(f"{key}: expected {_type_name(types)}, got bool {value!r}")
    if list in types and isinstance(value, str) and str not in types:
        return [value]  # one plain string for a list setting
    if isinstance(value, types):
        return list(value) if isinstance(value, tuple) and list in types else value
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if list in types and isinstance(value, tuple):
        return list(value)
    raise ConfigError(f"{key}: expected {_type_name(types)}, got {type(value).__name__} {value!r}")


def _parse(key, text, default, extra_types=()):
    """Parse a command-line string for setting `key`."""
    if isinstance(default, bool) and not extra_types:
        word = text.strip().lower()
        if word not in _BOOL_WORDS:
            raise ConfigError(f"{key}: expected a boolean (True/False/true/false/1/0), got {text!r}")
        return _BOOL_WORDS[word]
    if isinstance(default, str) and not extra_types:
        return text  # strings are literal: --out_dir=123 is the string "123"
    if isinstance(default, list) and not extra_types:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        return _check(key, value if isinstance(value, (list, tuple)) else text, default)
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare word: a string, checked against the type below
    return _check(key, value, default, extra_types)


def _unknown(key, known):
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
    return ConfigError(f"unknown setting {key!r}{hint} (run with --help to list all settings)")


def setting_comments(*paths):
    """{name: description} from the comments next to assignments (`name = value  # text` at module level,
    `name=value,  # text` in a dict) in the given source files; comment-only lines right below, indented
    deeper than the name, continue the description. The first described assignment of a name wins."""
    found = {}
    for path in paths:
        with open(path) as f:
            source = f.read()
        lines = source.split("\n")
        comments = {}  # line number (1-based) -> comment text
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip())
        for number, line in enumerate(lines, 1):
            stripped = line.lstrip()
            name = stripped.split("=", 1)[0].strip() if "=" in stripped else ""
            if not name.isidentifier() or stripped[len(name):].lstrip().startswith("==") or number not in comments:
                continue
            column, text = comments[number]
            if column <= len(line) - len(stripped):
                continue  # a comment-only line
            indent = len(line) - len(stripped)
            follow = number + 1
            while follow in comments and follow <= len(lines) and lines[follow - 1].strip().startswith("#") \
                    and comments[follow][0] > indent:
                text += " " + comments[follow][1]
                follow += 1
            found.setdefault(name, text)
    return found


def _help(settings, descriptions):
    width = max(map(len, settings), default=0)
    lines = ["settings (--key=value; defaults after config files):"]
    for k, v in settings.items():
        lines.append(f"  --{k:<{width}} = {v!r}")
        if descriptions.get(k):
            lines.append(f"      {descriptions[k]}")
    return "\n".join(lines)


def _run_config_file(path, settings, extra_types):
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    scope = dict(settings)
    with open(path) as f:
        source = f.read()
    try:
        exec(compile(source, path, "exec"), scope)
    except Exception as e:
        raise ConfigError(f"error while running config file {path}: {type(e).__name__}: {e}") from e
    for key, value in scope.items():
        if key.startswith("_") or callable(value) or type(value).__name__ == "module":
            continue
        if key not in settings:
            raise ConfigError(f"{path}: {_unknown(key, list(settings))}")
        settings[key] = _check(f"{path}: {key}", value, settings[key], extra_types.get(key, ()))


def config_values(args):
    """{setting: value} as far as these config files and --key=value / --key value overrides set them, applied
    left to right as configure() does, but without a table of defaults: for a launcher that reads a few settings
    before handing the arguments to train.py, which checks all of them. Overrides are Python literals where they
    parse, else strings; a setting that nothing sets is absent. SettingError for a config file that cannot run."""
    found, i = {}, 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("--"):  # a config file: plain Python, run in a scope of its own
            scope = {}
            try:
                with open(arg) as f:
                    exec(compile(f.read(), arg, "exec"), scope)
            except Exception as e:
                raise SettingError(f"cannot read config file {arg}: {type(e).__name__}: {e}") from e
            found.update({k: v for k, v in scope.items() if not k.startswith("_") and not callable(v)
                          and type(v).__name__ != "module"})
            continue
        key, eq, text = arg[2:].partition("=")
        if not eq and i < len(args) and not args[i].startswith("--"):
            text = args[i]
            i += 1
        try:
            found[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            found[key] = text
    return found


def configure(defaults, argv, extra_types=None, help_from=()):
    """Apply config files and overrides in argv to a copy of defaults; return the new dict.

    extra_types: {key: (type, ...)} for settings that accept more than their default's type
    (e.g. cut_layer: an int or a list of ints). help_from: source files whose comments describe
    the settings (--help).
    """
    extra_types = extra_types or {}
    settings = dict(defaults)
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help"):
            help_from = [help_from] if isinstance(help_from, str) else help_from
            print(_help(settings, setting_comments(*help_from)))
            sys.exit(0)
        if not arg.startswith("--"):
            _run_config_file(arg, settings, extra_types)
            continue
        key, eq, text = arg[2:].partition("=")
        if key not in settings:
            raise _unknown(key, list(settings))
        default, extra = defaults[key], extra_types.get(key, ())
        if eq:
            settings[key] = _parse(key, text, default, extra)
            continue
        values = []
        while i < len(argv) and not argv[i].startswith("--"):
            values.append(argv[i])
            i += 1
        if not values:
            if not isinstance(default, bool):
                raise ConfigError(f"--{key} needs a value: --{key}=VALUE")
            settings[key] = True
        elif isinstance(default, list) or list in extra:
            # items of a list setting: like its first item, strings if it is empty; of an int-or-list: literals
            item_default = (default[0] if default else "") if isinstance(default, list) else None
            settings[key] = [_parse(key, v, item_default) for v in values]
        elif len(values) == 1:
            settings[key] = _parse(key, values[0], default, extra)
        else:
            raise ConfigError(f"--{key} takes one value, got {len(values)}: {values}")
    return settings


def configure_or_exit(defaults, argv=None, extra_types=None, help_from=()):
    """configure() for entry points: a bad setting prints one clear line and exits with status 2."""
    try:
        return configure(defaults, sys.argv[1:] if argv is None else argv, extra_types, help_from)
    except ConfigError as e:
        exit_with(e)


def exit_with_config_error(message):
    """How every entry point reports a bad setting: one line on stderr, exit status 2 (common.exit_with)."""
    exit_with(SettingError(str(message)))
