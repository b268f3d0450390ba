"""The guides stay true to the code: the Chinese guide's commands are the README's and name scripts, configs and keys
that exist; the map from the tutorial's train.py names functions that exist where it says."""
import re
import shlex

from conftest import ROOT

from configurator import defaults_of
from gpt_toolkit.train_config import Config

ZH = (ROOT / "README.zh-CN.md").read_text(encoding="utf-8")
EN = (ROOT / "README.md").read_text(encoding="utf-8")


def indented_commands(text):
    """The lines of the text's indented code blocks that run python, pip or bash."""
    return [line.strip() for line in text.splitlines()
            if line.startswith("    ") and re.match(r"\s+(SCALE=\w+ )?(python|pip|bash) ", line)]


def inline_commands(text):
    return [c for c in re.findall(r"`([^`]+)`", text) if c.startswith(("python ", "SCALE="))]


def test_the_chinese_guide_gives_the_readmes_two_commands():
    install, tests = indented_commands(ZH)[:2]
    assert install.startswith("pip install -r requirements.txt && ") and tests == "python -m pytest -q"
    assert install in indented_commands(EN) and tests in indented_commands(EN)


def test_the_chinese_guides_commands_name_what_exists():
    sample_keys = set(defaults_of(__import__("sample").Config))
    train_keys = set(defaults_of(Config)) | {"lr"}
    commands = [part for line in indented_commands(ZH) + inline_commands(ZH) for part in line.split("&&")]
    checked = 0
    for command in commands:
        words = shlex.split(command.split("2>&1")[0].split("#")[0])
        words = [w for w in words if not re.fullmatch(r"[A-Z_]+=\w+", w)]  # SCALE=cpu
        if words[0] not in ("python", "bash") or words[1] == "-m":
            continue
        assert (ROOT / words[1]).is_file(), command
        for word in words[2:]:
            if word.endswith(".py"):
                assert (ROOT / word).is_file(), (word, command)
            key = re.match(r"--(\w+)=", word)
            if key and words[1] in ("train.py", "sample.py"):
                assert key.group(1) in (train_keys if words[1] == "train.py" else sample_keys), (word, command)
        checked += 1
    assert checked >= 15


def test_the_map_from_the_tutorials_train_py_names_what_exists():
    text = (ROOT / "docs" / "train_py.md").read_text(encoding="utf-8")
    references = re.findall(r"`((?:train|gpt_toolkit/\w+)\.py): (\w+)(?:\.(\w+))?", text)
    assert len(references) >= 20
    for path, name, method in references:
        source = (ROOT / path).read_text(encoding="utf-8")
        assert re.search(rf"^\s*(def|class) {name}\b", source, re.M), (path, name)
        if method:
            assert re.search(rf"^\s+def {method}\(", source, re.M), (path, name, method)
    assert "README.zh-CN.md" in EN and "docs/train_py.md" in EN
