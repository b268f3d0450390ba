"""The guides stay true to the code: the Chinese guide's commands are the README's and name scripts, configs and keys
that exist; the map from the tutorial's train.py names functions that exist where it says."""
import re
import shlex
import subprocess

import pytest
from conftest import ROOT

from configurator import defaults_of
from gpt_toolkit.core.config import Config

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
    assert install.startswith("pip install -r requirements.txt && ") and tests.endswith("python -m pytest -q")
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


def test_the_cpu_configs_comments_give_the_readmes_figures():
    """A config's comment and the README's table quote one measurement (they once said 80 s and 58 s)."""
    cpu = (ROOT / "config" / "train_shakespeare_char_cpu.py").read_text(encoding="utf-8")
    row = next(line for line in EN.splitlines() if "`config/train_shakespeare_char_cpu.py` (the recipe" in line)
    one, two, loss = re.search(r"\| ([\d.]+) / ([\d.]+) s \| \**([\d.]+)", row).groups()
    assert f"{round((float(one) + float(two)) / 2)} s on the README's Xeon" in cpu  # the mean of its two rounds
    assert f"val loss ~{float(loss):.2f}" in cpu
    fast = (ROOT / "config" / "train_shakespeare_char_fast.py").read_text(encoding="utf-8")
    row = next(line for line in EN.splitlines() if "**`config/train_shakespeare_char_fast.py`**" in line)
    loss = re.search(r"\| [\d.]+ / [\d.]+ s \| \**([\d.]+)", row).group(1)
    assert f"val loss ~{float(loss):.2f}" in fast


def test_every_link_and_image_in_the_guides_resolves():
    """A relative link or image in README.md, README.zh-CN.md or docs/*.md names a file, relative to the guide."""
    broken = []
    for guide in [ROOT / "README.md", ROOT / "README.zh-CN.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", guide.read_text(encoding="utf-8")):
            if "://" in target or target.startswith("#"):
                continue
            if not (guide.parent / target.split("#")[0]).exists():
                broken.append(f"{guide.relative_to(ROOT)}: {target}")
    assert not broken


def test_what_the_readmes_commands_write_in_the_root_is_ignored_by_git():
    """The default outputs of the README's commands (plots, the export) are neither tracked nor left as untracked."""

    names = ["loss_curve.png", "comparison.png", "grad_viz.png", "lr_finder.png", "lr_schedule.png", "hf-shakespeare/x",
             "out-shakespeare-char-cpu/ckpt.pt", "experiments/exp1_baseline.log", "shakespeare.gguf", "Modelfile"]
    r = subprocess.run(["git", "check-ignore", "--no-index", *names], cwd=ROOT, capture_output=True, text=True)
    if r.returncode == 128:
        pytest.skip("not a git checkout")
    assert sorted(r.stdout.split()) == sorted(names)


def test_the_architecture_page_names_every_room_and_module():
    """docs/architecture.md's diagram names each room of gpt_toolkit/ and each module in it (renamed or added ones
    too), the rooms in the order tests/test_structure.py keeps the imports (lowest last, at the diagram's foot)."""
    from test_structure import ROOMS
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    diagram = text.split("```mermaid")[1].split("```")[0]
    boxes = {room: diagram.index(f'["{room}<br/>') for room in ROOMS}
    assert sorted(ROOMS, key=boxes.get) == ROOMS[::-1]
    for room in ROOMS:
        line = next(line for line in diagram.splitlines() if f'["{room}<br/>' in line)
        named = set(re.findall(r"\w+", line.split("<br/>", 1)[1]))
        modules = {p.stem for p in (ROOT / "gpt_toolkit" / room).glob("*.py")} - {"__init__"}
        assert modules <= named, (room, modules - named)
