"""Standard benchmark tasks as items a model scores (gpt_toolkit.serving.task_scoring): where each task's data comes from, how
it is turned into items (the prompts lm-evaluation-harness builds for the same task), and the JSON Lines format that
holds them, in the download cache and in a user's own task file (--task_file=).

A task file has one item per line, of one of three kinds:
    {"context": "Question: ...\\nAnswer:", "choices": [" yes", " no"], "gold": 0}   multiple choice: the likeliest choice
    {"context": "... he said to", "continuation": " Harry"}                       last word (LAMBADA): the greedy text
    {"context": "Q: 2+2=\\nA:", "target": " 4", "until": ["\\n"]}                   generation: greedy, cut, exact match
Task data downloads on first use (plain HTTP) into a cache directory, converted to this format; docs/evaluation.md
names each source and its licence."""
import json
import os
import re
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from gpt_toolkit.core.errors import UserError
from gpt_toolkit.core.files import atomic_write_text


@dataclass(frozen=True)
class Item:
    """One scored example. kind: "choice" (choices, gold), "last_word" (choices == [the continuation]) or
    "generate" (target, until)."""
    kind: str
    context: str
    choices: tuple = ()
    gold: int = 0
    target: str = ""
    until: tuple = ()


@dataclass(frozen=True)
class Task:
    """A task's name, its items, and the accuracy a random guess gets (the CORE-style centering's baseline)."""
    name: str
    items: tuple
    source: str = field(default="", compare=False)

    @property
    def kind(self):
        return self.items[0].kind

    @property
    def random_baseline(self):
        if self.kind != "choice":
            return 0.0
        return sum(1 / len(item.choices) for item in self.items) / len(self.items)


# ----------------------------------------------------------------------------- the task file format

def item_of(record, where):
    """An Item from one JSON object of a task file; a UserError naming `where` for anything else."""
    if not isinstance(record, dict) or not isinstance(record.get("context"), str) or not record["context"]:
        raise UserError(f"{where}: an item needs a non-empty \"context\" string (docs/evaluation.md: task files)")
    context = record["context"]
    if "choices" in record:
        choices, gold = record["choices"], record.get("gold")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise UserError(f"{where}: \"choices\" must be a list of at least two non-empty strings")
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise UserError(f"{where}: \"gold\" must be the index of the right choice (0 to {len(choices) - 1})")
        return Item("choice", context, tuple(choices), gold)
    if "continuation" in record:
        if not isinstance(record["continuation"], str) or not record["continuation"]:
            raise UserError(f"{where}: \"continuation\" must be a non-empty string")
        return Item("last_word", context, (record["continuation"],))
    if "target" in record:
        until = record.get("until", ["\n"])
        if not isinstance(record["target"], str) or not isinstance(until, list) or not all(
                isinstance(u, str) and u for u in until):
            raise UserError(f"{where}: \"target\" must be a string and \"until\" a list of non-empty strings")
        return Item("generate", context, target=record["target"], until=tuple(until))
    raise UserError(f"{where}: an item has \"choices\" and \"gold\" (multiple choice), \"continuation\" (last word) or "
                    f"\"target\" (generation)")


def read_task_file(path, name=None):
    """The Task of a task file (JSON Lines, one item per line, all of one kind); one line per error, numbered."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the task file {path} ({getattr(e, 'strerror', None) or e}): check --task_file") from None
    items = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise UserError(f"{path} line {number}: not JSON ({e})") from None
        items.append(item_of(record, f"{path} line {number}"))
    if not items:
        raise UserError(f"{path} holds no item: one JSON object per line (docs/evaluation.md: task files)")
    kinds = {item.kind for item in items}
    if len(kinds) > 1:
        raise UserError(f"{path} mixes kinds of items ({', '.join(sorted(kinds))}): one kind per task file")
    return Task(name or path.stem, tuple(items), source=str(path))


def write_task_file(path, items):
    lines = []
    for item in items:
        if item.kind == "choice":
            record = {"context": item.context, "choices": list(item.choices), "gold": item.gold}
        elif item.kind == "last_word":
            record = {"context": item.context, "continuation": item.choices[0]}
        else:
            record = {"context": item.context, "target": item.target, "until": list(item.until)}
        lines.append(json.dumps(record, ensure_ascii=False))
    atomic_write_text(path, "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- the standard tasks, as lm-eval builds them

def _hellaswag_text(text):
    """lm-evaluation-harness's clean-up of HellaSwag's WikiHow text."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag_items(files):
    items = []
    for line in files["hellaswag_val.jsonl"].splitlines():
        if line.strip():
            doc = json.loads(line)
            context = _hellaswag_text(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
            items.append(Item("choice", context, tuple(" " + _hellaswag_text(e) for e in doc["endings"]),
                              int(doc["label"])))
    return items


def arc_items(files):
    items = []
    for page in files["rows"]:
        for row in json.loads(page)["rows"]:
            doc = row["row"]
            labels = list(doc["choices"]["label"])
            items.append(Item("choice", f"Question: {doc['question']}\nAnswer:",
                              tuple(" " + t for t in doc["choices"]["text"]), labels.index(doc["answerKey"])))
    return items


def piqa_items(files):
    docs = [json.loads(line) for line in files["valid.jsonl"].splitlines() if line.strip()]
    labels = [int(x) for x in files["valid-labels.lst"].split()]
    return [Item("choice", f"Question: {d['goal']}\nAnswer:", (" " + d["sol1"], " " + d["sol2"]), label)
            for d, label in zip(docs, labels, strict=True)]


def lambada_items(files):
    items = []
    for line in files["lambada_test.jsonl"].splitlines():
        if line.strip():
            context, last = json.loads(line)["text"].rsplit(" ", 1)
            items.append(Item("last_word", context, (" " + last,)))
    return items


ARC_ROWS = "https://datasets-server.huggingface.co/rows?dataset=allenai%2Fai2_arc&config=ARC-Easy&split=test"


@dataclass(frozen=True)
class Source:
    files: dict  # name -> URL ("rows": the Hugging Face dataset viewer's paged JSON, 100 rows a page)
    read: object  # files' texts -> items
    what: str  # the split, for the output


SOURCES = {
    "hellaswag": Source({"hellaswag_val.jsonl": "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/"
                                                "hellaswag_val.jsonl"}, hellaswag_items, "validation, 10,042 items"),
    "arc_easy": Source({"rows": ARC_ROWS}, arc_items, "test, 2,376 items"),
    "piqa": Source({"valid.jsonl": "https://raw.githubusercontent.com/ybisk/ybisk.github.io/master/piqa/data/valid.jsonl",
                    "valid-labels.lst": "https://raw.githubusercontent.com/ybisk/ybisk.github.io/master/piqa/data/"
                                        "valid-labels.lst"}, piqa_items, "validation, 1,838 items"),
    "lambada": Source({"lambada_test.jsonl": "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl"},
                      lambada_items, "OpenAI's test set, 5,153 items"),
}


def default_cache_dir():
    return Path(os.environ.get("GPT_TOOLKIT_TASKS_DIR") or Path.home() / ".cache" / "gpt-toolkit" / "tasks")


def _fetch(url):
    request = urllib.request.Request(url, headers={"User-Agent": "gpt-toolkit"})
    with urllib.request.urlopen(request, timeout=60) as r:
        return r.read().decode("utf-8")


def _download(source):
    files = {}
    for name, url in source.files.items():
        if name != "rows":
            files[name] = _fetch(url)
            continue
        pages, offset = [], 0
        while True:  # the viewer serves at most 100 rows a request
            page = _fetch(f"{url}&offset={offset}&length=100")
            pages.append(page)
            total = json.loads(page)["num_rows_total"]
            offset += 100
            if offset >= total:
                break
        files[name] = pages
    return source.read(files)


def is_task_file(name):
    return name.endswith(".jsonl") or os.sep in name or "/" in name


def check_task_name(name):
    """Refuse a name that is neither a known task nor a task file's path (before anything is downloaded)."""
    if name not in SOURCES and not is_task_file(name):
        raise UserError(f"unknown task '{name}': the known tasks are {', '.join(SOURCES)}, or give a task file "
                        f"(NAME.jsonl, docs/evaluation.md)")


def load_task(name, *, cache_dir=None, limit=None):
    """A Task by name (downloaded on first use into cache_dir, read from there afterwards) or by the path of a task
    file; limit keeps its first items."""
    check_task_name(name)
    if name not in SOURCES:
        task = read_task_file(name)
    else:
        path = Path(cache_dir or default_cache_dir()) / f"{name}.jsonl"
        if not path.exists():
            source = SOURCES[name]
            try:
                items = _download(source)
            except (OSError, ValueError, KeyError) as e:
                where = next(iter(source.files.values()))
                raise UserError(f"task '{name}' could not be downloaded from {urllib.parse.urlsplit(where).netloc} "
                                f"({getattr(e, 'reason', None) or e}): offline, put its file at {path}, or give a task "
                                f"file instead (docs/evaluation.md: working offline)") from None
            path.parent.mkdir(parents=True, exist_ok=True)
            write_task_file(path, items)
        task = read_task_file(path, name)
    if limit:
        task = Task(task.name, task.items[:limit], task.source)
    return task
