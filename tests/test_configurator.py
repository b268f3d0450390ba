"""Config files and --key=value parsing: values, types, and every error message."""
import re

import pytest
from conftest import assert_one_line_error, run_script

from configurator import format_config_summary, help_of, parse_args
from gpt_toolkit.core.config import Config, load_config
from gpt_toolkit.core.errors import ConfigError


class Defaults:
    batch_size = 12  # sequences per step
    dropout = 0.1  # dropout probability
    bias = False  # use biases
    out_dir = "out"  # output directory
    compile = "auto"  # auto | True | False


CHOICES = {"compile": ["auto", True, False]}


def parse(*argv):
    config, cli_keys = parse_args(list(argv), {k: v for k, v in vars(Defaults).items() if not k.startswith("_")},
                                  help_of(Defaults), CHOICES, {"bs": "batch_size"})
    return config


def test_values_are_literals_with_string_fallback():
    c = parse("--batch_size=32", "--dropout=0.25", "--bias=True", "--out_dir=experiments/exp1")
    assert c == {"batch_size": 32, "dropout": 0.25, "bias": True, "out_dir": "experiments/exp1", "compile": "auto"}


def test_value_may_contain_equals_and_quotes():
    assert parse("--out_dir=a=b")["out_dir"] == "a=b"
    assert parse("--out_dir='quoted'")["out_dir"] == "quoted"
    assert parse("--out_dir=123")["out_dir"] == "123"  # a string key keeps the text


def test_int_accepted_for_float_and_bool_spellings():
    c = parse("--dropout=0")
    assert c["dropout"] == 0.0 and isinstance(c["dropout"], float)
    assert parse("--bias=false")["bias"] is False
    assert parse("--bias=True")["bias"] is True


def test_choices_accept_bool_for_an_auto_key():
    assert parse("--compile=False")["compile"] is False
    assert parse("--compile=auto")["compile"] == "auto"
    with pytest.raises(ConfigError, match=r"compile must be one of auto, True, False \(got 'maybe'\)"):
        parse("--compile=maybe")
    with pytest.raises(ConfigError, match="compile must be one of"):
        parse("--compile=1")  # 1 == True in Python, but it is not a bool


def test_wrong_types_name_key_and_default():
    with pytest.raises(ConfigError, match=r"--batch_size=abc: batch_size must be an int \(default 12\), got 'abc'"):
        parse("--batch_size=abc")
    with pytest.raises(ConfigError, match="batch_size must be an int"):
        parse("--batch_size=1.5")
    with pytest.raises(ConfigError, match="bias must be True or False"):
        parse("--bias=yes")


def test_a_whole_number_written_as_a_float_for_an_int_says_how_to_write_it():
    with pytest.raises(ConfigError, match=re.escape("--batch_size=1e3: batch_size must be an int (default 12), got "
                                                    "1000.0: write 1000")):
        parse("--batch_size=1e3")
    with pytest.raises(ConfigError, match=r"got 2\.5$"):
        parse("--batch_size=2.5")


def test_unknown_key_names_closest_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'batchsize' \(closest: batch_size\)"):
        parse("--batchsize=3")
    with pytest.raises(ConfigError, match="has no value"):
        parse("--batch_size")


def test_alias_and_cli_keys():
    config, cli_keys = parse_args(["--lr=0.01", "--n_layer=2"], *_train_parse_args())
    assert config["learning_rate"] == 0.01 and cli_keys == {"learning_rate", "n_layer"}


def _train_parse_args():
    from configurator import defaults_of
    from gpt_toolkit.core.config import ALIASES, CHOICES
    return defaults_of(Config), help_of(Config), CHOICES, ALIASES


def test_config_file_then_overrides_in_order(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("import math\nbatch_size = 7\ndropout = 0  # int for a float\nout_dir = 'from-file-' + str(batch_size)\n")
    assert parse(str(f)) == {"batch_size": 7, "dropout": 0.0, "bias": False, "out_dir": "from-file-7", "compile": "auto"}
    assert parse(str(f), "--batch_size=9")["batch_size"] == 9
    with pytest.raises(ConfigError, match=re.escape(  # in order, the file's 7 would win: the 9 was dropped unseen
            f"config file {f} sets batch_size=7 after --batch_size=9 was given: put the --key=value overrides after "
            f"the config file (they apply in order)")):
        parse("--batch_size=9", str(f))
    reads = tmp_path / "reads.py"
    reads.write_text("out_dir = 'bs' + str(batch_size)\nbatch_size = batch_size  # the same value: nothing dropped\n")
    assert parse("--batch_size=9", str(reads)) == {**parse(), "batch_size": 9, "out_dir": "bs9"}
    assert parse("--batch_size=9", str(f), "--batch_size=5")["batch_size"] == 5  # given again after it: used


def test_the_screens_config_is_what_was_set_or_differs(tmp_path):
    defaults = {k: v for k, v in vars(Defaults).items() if not k.startswith("_")}
    f = tmp_path / "c.py"
    f.write_text("bias = False  # the default, but the file sets it\nif True:\n    dropout = 0.3\n")
    argv = [str(f), "--bs=32", "--compile=auto"]  # an alias, and a default given on the command line
    config, cli_keys = parse_args(argv, defaults, aliases={"bs": "batch_size"})
    assert format_config_summary({**config, "out_dir": "o"}, defaults, argv, cli_keys, full_at="o/training.log") == (
        f"config (set by {f} and --key=value, or not the default; all 5 keys are in o/training.log):\n"
        "  batch_size = 32\n  dropout    = 0.3\n  bias       = False\n  out_dir    = 'o'\n  compile    = 'auto'")
    assert format_config_summary({**defaults, "dropout": 0.5}, defaults, [], set(), full_at="t.log") == (
        "config (not the default; all 5 keys are in t.log):\n  dropout = 0.5")
    assert format_config_summary(defaults, defaults, [], set(), full_at="t.log") == (
        "config: every key is its default (all 5 are in t.log)")


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*nope.py' not found"):
        parse(str(tmp_path / "nope.py"))
    bad = tmp_path / "bad.py"
    bad.write_text("batch_size = 4\nn_layer = = 3\n")
    with pytest.raises(ConfigError, match=r"bad.py, line 2: invalid syntax"):
        parse(str(bad))
    unknown = tmp_path / "unknown.py"
    unknown.write_text("batch_size = 4\nlerning_rate = 3\n")
    with pytest.raises(ConfigError, match=r"unknown.py, line 2: unknown config key 'lerning_rate'"):
        parse(str(unknown))
    typed = tmp_path / "typed.py"
    typed.write_text("batch_size = 'big'\n")
    with pytest.raises(ConfigError, match="batch_size must be an int"):
        parse(str(typed))
    raising = tmp_path / "raising.py"
    raising.write_text("batch_size = 4\n_x = 1 / 0\n")
    with pytest.raises(ConfigError, match=r"raising.py, line 2: ZeroDivisionError"):
        parse(str(raising))


def test_shipped_configs_pass_validation(tmp_path, monkeypatch):
    from pathlib import Path

    from gpt_toolkit.core.config import validate
    shipped = sorted(Path(__file__).resolve().parents[1].glob("config/*.py"))
    assert len(shipped) >= 12
    monkeypatch.chdir(tmp_path)
    for f in shipped:
        cfg, _ = load_config([str(f)])
        if cfg.init_from.startswith("out-"):  # a fine-tune of a run its header trains first: stand that run in
            (tmp_path / cfg.init_from).mkdir(exist_ok=True)
            (tmp_path / cfg.init_from / "ckpt.pt").write_bytes(b"")
        validate(cfg)  # raises ConfigError naming the key for any impossible setting


def test_help_lists_every_key_with_default_and_meaning():
    r = run_script("train.py", "--help")
    assert r.returncode == 0
    for key, value in vars(Config).items():
        if not key.startswith("_"):
            assert f"--{key}={value}" in r.stdout, key
    assert re.search(r"\n  --batch_size=12 +sequences per micro-step\n", r.stdout)
    assert all(help_of(Config)[k] for k in help_of(Config)), "every key needs a help comment"


def test_unknown_key_from_command_line_exits_2():
    r = run_script("train.py", "--lerning_rate=1e-3")
    assert_one_line_error(r, "unknown config key 'lerning_rate'", "learning_rate", code=2)


def test_bad_type_from_command_line_exits_2():
    assert_one_line_error(run_script("train.py", "--batch_size=abc"), "batch_size must be an int", code=2)
    assert_one_line_error(run_script("train.py", "--compile=maybe"), "compile must be one of auto, True, False", code=2)


def tool_parser_for_test():
    from gpt_toolkit.core.cli import tool_parser
    p = tool_parser("tools/x.py", "x: a tool", training_config=True)
    p.add_flag("--compare", help="compare")
    p.add_argument("--iters", type=int, default=20)
    return p


def test_tool_bool_option_alone_is_true_and_leaves_the_next_argument(data_dir):
    """A tool's flag reads like train.py's keys (--compare=True/False) and alone means True without taking the next
    argument; what the tool's options leave is the training config, read as train.py reads it."""
    p = tool_parser_for_test()
    args, cfg = p.parse(["--compare", "config/train_shakespeare_char_cpu.py", "--iters", "5", "--lr=1"])
    assert (args.compare, args.iters) == (True, 5)
    assert (cfg.learning_rate, cfg.n_layer, cfg.dataset) == (1.0, 4, "shakespeare_char")  # the file, then --lr
    assert p.parse(["--compare=False"])[0].compare is False
    assert p.parse(["--compare=true"])[0].compare is True
    assert p.parse([])[0].compare is False


def test_tool_bool_option_rejects_other_values():
    with pytest.raises(ConfigError, match=r"tools/x.py: argument --compare: expected True or False, got 'yes'"):
        tool_parser_for_test().parse(["--compare=yes"])
    with pytest.raises(ConfigError, match=r"argument --iters: expected one argument"):
        tool_parser_for_test().parse(["--iters"])
    with pytest.raises(ConfigError, match=r"unknown config key 'iter' \(closest: "):  # no abbreviation of --iters
        tool_parser_for_test().parse(["--iter=3"])


def test_help_shows_a_default_that_is_not_printable_as_python_writes_it():
    """sample.py's --start defaults to a newline: --help shows '\\n' on its line, not a line break."""
    r = run_script("sample.py", "--help")
    line = next(line for line in r.stdout.splitlines() if line.strip().startswith("--start="))
    assert line.split()[0] == "--start='\\n'" and "the prompt" in line, line
