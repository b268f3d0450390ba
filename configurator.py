"""Config files and --key=value overrides, shared by train.py, sample.py and the tools.

    python train.py config/train_shakespeare_char.py --batch_size=32 --compile=False

A bare argument is a Python config file, executed in a namespace that starts with the current
config (so a file may read earlier keys). Each --key=value then overrides one key: the value
goes through ast.literal_eval, falling back to the raw text, and must have the default's type
(an int is accepted for a float, True/False for a bool). Unknown keys and wrong types are
errors that name the key, never silently ignored; so is a --key=value that a config file after
it would set to another value (in order, the file's would win and the flag would be dropped).
"""
import ast
import dataclasses
import difflib
import inspect
import io
import os
import tokenize
import types

from gpt_toolkit.core.errors import ConfigError


def defaults_of(cls):
    """The config keys of a defaults class (a dataclass: its fields), with their defaults, in order."""
    if dataclasses.is_dataclass(cls):
        return {f.name: f.default for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(cls).items() if not k.startswith("_")}


def help_of(cls):
    """One-line help per key, taken from the comment after each assignment in the class body."""
    source = inspect.getsource(cls)
    comments = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    helps = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            helps[node.targets[0].id] = comments.get(node.lineno, "")
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):  # a dataclass field
            helps[node.target.id] = comments.get(node.lineno, "")
    return helps


def _type_name(value):
    return {bool: "True or False", int: "an int", float: "a number", str: "a string"}.get(type(value), type(value).__name__)


def check_value(key, value, default, choices=None, source=None):
    """Return value converted to the default's type, or raise ConfigError naming the key."""
    where = source or key
    if choices is not None:
        for choice in choices:
            if type(choice) is type(value) and choice == value:
                return value
        allowed = ", ".join(str(c) for c in choices)
        raise ConfigError(f"{where}: {key} must be one of {allowed} (got {value!r})")
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    else:
        return value
    whole = (f": write {int(value)}" if isinstance(default, int) and not isinstance(default, bool)
             and isinstance(value, float) and value.is_integer() else "")  # --max_iters=1e3 is the float 1000.0
    raise ConfigError(f"{where}: {key} must be {_type_name(default)} (default {default!r}), got {value!r}{whole}")


def _parse_cli_value(text, default, choices):
    """--key=value text to a Python value: a literal if it parses, else the raw text."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text
    if isinstance(default, str) and not isinstance(value, str) and choices is None:
        return text  # --wandb_run_name=123 means the string "123"
    return value


def parse_value(key, text, default, choices=None, source=None):
    """The value of `--key=text`: parsed as on the command line and checked against the default's type."""
    return check_value(key, _parse_cli_value(text, default, choices), default, choices, source=source or f"--{key}={text}")


def _unknown_key(key, known, where):
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f" (closest: {', '.join(close)})" if close else ""
    return ConfigError(f"{where}: unknown config key '{key}'{hint}; see --help for all keys")


def _closest_configs(path):
    """' (closest in config/: a, b)': the config files whose names are nearest the missing one's."""
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config")
    names = sorted(f for f in os.listdir(folder) if f.endswith(".py")) if os.path.isdir(folder) else []
    close = difflib.get_close_matches(os.path.basename(path), names, n=3, cutoff=0.5)
    return f" (closest in config/: {', '.join(close)})" if close else " (config files live in config/)"


def _run_config_file(path, config, defaults, choices):
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' not found{_closest_configs(path)}: check the path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file '{path}': {e}") from None
    try:
        tree = ast.parse(source, filename=path)
    except SyntaxError as e:
        raise ConfigError(f"config file {path}, line {e.lineno}: {e.msg}: fix the Python syntax there") from None
    # Check assignments before running anything, so the error can name the line.
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        for target in targets:
            if isinstance(target, ast.Name) and not target.id.startswith("_") and target.id not in defaults:
                raise _unknown_key(target.id, list(defaults), f"config file {path}, line {node.lineno}")
    namespace = dict(config)
    namespace["__file__"] = path
    try:
        exec(compile(tree, path, "exec"), namespace)
    except Exception as e:
        line = e.__traceback__.tb_next.tb_lineno if e.__traceback__ and e.__traceback__.tb_next else "?"
        raise ConfigError(f"config file {path}, line {line}: {type(e).__name__}: {e}") from None
    for key, value in namespace.items():
        if key.startswith("_") or isinstance(value, (types.ModuleType, types.FunctionType, type)):
            continue
        if key not in defaults:
            raise _unknown_key(key, list(defaults), f"config file {path}")
        config[key] = check_value(key, value, defaults[key], choices.get(key), source=f"config file {path}")


def format_help(defaults, helps, usage):
    lines = [usage, "", "keys (default, meaning):"]
    shown = {k: repr(v) if isinstance(v, str) and not v.isprintable() else v for k, v in defaults.items()}  # '\n'
    width = max(len(f"--{k}={v}") for k, v in shown.items())
    for key, value in shown.items():
        lines.append(f"  {f'--{key}={value}':<{width}}  {helps.get(key, '')}")
    return "\n".join(lines)


def format_config(config):
    """The final config, one 'key = value' per line, for the top of a run's log."""
    width = max((len(k) for k in config), default=0)
    return "\n".join(f"  {k:<{width}} = {v!r}" for k, v in config.items())


def config_files_and_keys(argv):
    """(the config files on a command line, the names they assign anywhere in them). For the screen's config lines:
    parse_args has already run and checked them."""
    files = [arg for arg in argv if not arg.startswith("-")]
    keys = set()
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), filename=path)
        except (OSError, UnicodeDecodeError, SyntaxError):
            continue
        keys |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    return files, keys


def format_config_summary(config, defaults, argv, cli_keys, full_at):
    """The config as a run's screen shows it: the keys its config files or --key=value set, and any other that is not
    its default, under a line naming those sources and where every key is (full_at: training.log)."""
    files, file_keys = config_files_and_keys(argv)
    given = file_keys | set(cli_keys)
    shown = {k: v for k, v in config.items() if k in given or k not in defaults or v != defaults[k]}
    sources = files + (["--key=value"] if cli_keys else [])
    what = f"set by {' and '.join(sources)}, or not the default" if sources else "not the default"
    if not shown:
        return f"config: every key is its default (all {len(config)} are in {full_at})"
    return f"config ({what}; all {len(config)} keys are in {full_at}):\n" + format_config(shown)


def parse_args(argv, defaults, helps=None, choices=None, aliases=None, usage="usage: [CONFIG_FILE ...] [--key=value ...]"):
    """Apply config files and --key=value overrides, in order, on top of defaults.

    Returns (config, cli_keys): cli_keys are the keys given as --key=value.
    Prints help and exits 0 on --help/-h; raises ConfigError on any bad input.
    """
    choices = choices or {}
    aliases = aliases or {}
    config = dict(defaults)
    cli_keys, given, dropped = set(), {}, {}  # dropped: a flag's key that a config file after it changed
    for arg in argv:
        if arg in ("-h", "--help"):
            print(format_help(defaults, helps or {}, usage))
            raise SystemExit(0)
        if not arg.startswith("--"):
            before = dict(config)
            _run_config_file(arg, config, defaults, choices)
            dropped.update({key: (arg, flag) for key, flag in given.items() if config[key] != before[key]})
            continue
        key, sep, text = arg[2:].partition("=")
        if not sep:
            raise ConfigError(f"'{arg}' has no value: write --{key}=VALUE")
        key = aliases.get(key, key)
        if key not in defaults:
            raise _unknown_key(key, list(defaults) + list(aliases), arg)
        config[key] = parse_value(key, text, defaults[key], choices.get(key), source=arg)
        cli_keys.add(key)
        given[key] = arg
        dropped.pop(key, None)  # given again after the file: the flag's value is the one used
    if dropped:  # in order, the file's value won: the flag would be dropped unseen
        key, (path, flag) = next(iter(dropped.items()))
        raise ConfigError(f"config file {path} sets {key}={config[key]!r} after {flag} was given: put the --key=value "
                          f"overrides after the config file (they apply in order)")
    return config, cli_keys
