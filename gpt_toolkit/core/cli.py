"""The tools' command line: argparse for a tool's own options (with --help), booleans written the way train.py writes
them, errors as one line, and for tools that take a training config, the rest of the command line (config files and
--key=value overrides) read exactly as train.py reads it."""
import argparse
from pathlib import Path

from configurator import defaults_of, format_help, help_of
from gpt_toolkit.core.errors import ConfigError


def parse_bool(text):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


class ToolParser(argparse.ArgumentParser):
    """An ArgumentParser for a tool. With training_config=True, what the tool's own options leave of the command line
    is a training config (config files, then --key=value), and --help lists its keys too.

    add_flag makes a boolean option that reads like train.py's keys: --NAME=True, --NAME=False, and --NAME alone for
    True (which never takes the next argument as its value). Bad input is a ConfigError (one line, exit 2)."""

    def __init__(self, description=None, *, training_config=False, **kwargs):
        super().__init__(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                         allow_abbrev=False, **kwargs)  # no abbreviations: --lr must never mean a tool's --lr_start
        self.training_config = training_config
        self.flags = set()

    def add_flag(self, name, *, help, default=False):
        self.flags.add(name)
        self.add_argument(name, type=parse_bool, default=default, metavar="True|False",
                          help=f"{help} (default {default}; {name} alone means True)")

    def format_help(self):
        text = super().format_help()
        if not self.training_config:
            return text
        from gpt_toolkit.core.config import Config  # here: a tool without a training config starts without torch
        keys = format_help(defaults_of(Config), help_of(Config), "then a training config, as train.py takes it: "
                                                                  "[CONFIG_FILE ...] [--key=value ...]")
        return f"{text}\n{keys}\n"

    def error(self, message):
        raise ConfigError(f"{self.prog}: {message} (see --help)")

    def parse(self, argv):
        """(the tool's options, the training config or None); a bare --FLAG means --FLAG=True."""
        if not self.training_config:
            return self.parse_args(self._flags_valued(argv)), None
        args, rest = self.parse_known(argv)
        return args, training_config(rest)

    def parse_known(self, argv):
        """(the tool's options, the rest of the command line)."""
        return self.parse_known_args(self._flags_valued(argv))

    def _flags_valued(self, argv):
        flags = set(self.flags)
        for action in self._actions:  # and the flags of subcommands
            if isinstance(action, argparse._SubParsersAction):
                flags |= {f for sub in action.choices.values() for f in getattr(sub, "flags", ())}
        return [f"{a}=True" if a in flags else a for a in argv]


def training_config(argv):
    """A training config from config files and --key=value overrides, read and checked as train.py reads them."""
    from gpt_toolkit.core.config import load_config, validate
    cfg, _ = load_config(argv)
    validate(cfg)
    return cfg


def tool_parser(file, doc, **kwargs):
    """A ToolParser for the script at `file` (named like tools/bench.py) whose --help starts with its docstring."""
    path = Path(file)
    return ToolParser(doc.strip(), prog=f"{path.parent.name}/{path.name}", **kwargs)
