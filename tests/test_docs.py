"""The documents cannot drift from the code: every command shown in README.md and docs/*.md is
checked against what it names (CHANGELOG.md is history and is left as written).

A command is a line of a shell code block (```, ```sh, ```console; ```python and ```text blocks
are not commands) or an inline `...` span that starts with a command word:

- `python`/`.venv/bin/python` `-m cmal...`, `train.py`, `train_*.py`, `cmal-NAME`, a bare
  `cmal.tools.NAME` or tool name (`prepare_data aircraft ...`): the target's `--help` runs once
  (a fresh interpreter, from the repository root) and every `--option` the command uses must
  appear in it; `demo --compare` is checked against `demo --compare --help` and `demo --help`
  (the comparison passes every training setting on);
- `make X`: X is a target of the Makefile;
- `bash PATH`, `tools/...`, `python -m pytest PATH`: the path exists;
- `torchrun ... SCRIPT --options`: the script exists and its `--help` has the options.

Placeholders (`DATA`, `N`, `CHECKPOINT`, `--NAME=value`) are fine: only option names, targets and
paths are checked. Spans that are only options (`--amp=bf16 --channels_last`) must name an option
of some command of the project. Relative links and pictures must resolve, anchors included.
"""
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Skipped: CHANGELOG.md (release history, which describes earlier releases as they were).
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_FENCES = {"", "sh", "bash", "shell", "console"}
PYTHONS = {"python", "python3", ".venv/bin/python", "$(PY)"}
# Options of programs that are not this project's, which the documents name.
EXTERNAL_OPTIONS = {"--nproc_per_node", "--logdir"}
# A mode option whose --help differs: `demo --compare --help` lists the comparison's options.
MODES = {("-m", "cmal.tools.demo"): ("--compare",)}
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*")    # DATA, N, NAME: a word the reader replaces
OPTION = re.compile(r"(?<![\w-])--[A-Za-z0-9][\w-]*")


@dataclass
class Command:
    doc: str
    line: int
    text: str
    target: tuple = ()          # ("-m", module) or (script,): what --help runs
    mode: tuple = ()
    options: list = field(default_factory=list)
    make_targets: list = field(default_factory=list)
    paths: list = field(default_factory=list)

    def where(self):
        return f"{self.doc}:{self.line}: `{self.text}`"


def shown_text(path):
    """(line number, text) of every shell code-block line and every inline code span."""
    lines = path.read_text().split("\n")
    found, prose, fence, block = [], [], None, []
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            if fence is not None and fence in SHELL_FENCES:
                # A transcript (`$ make demo` and what it printed): only its prompt lines.
                prompts = [(n, t[2:]) for n, t in block if t.startswith("$ ")]
                found += prompts or block
            fence, block = (stripped[3:].strip(), []) if fence is None else (None, [])
            prose.append("")
            continue
        prose.append(line if fence is None else "")
        if fence is not None and stripped:
            block.append((number, stripped))
    text = "\n".join(prose)
    for match in re.finditer(r"`([^`]+)`", text):
        found.append((text.count("\n", 0, match.start()) + 1, " ".join(match.group(1).split())))
    return sorted(found)


@lru_cache(maxsize=None)
def console_scripts():
    """{cmal-NAME: its module}, from pyproject.toml's [project.scripts] (no tomllib on 3.10)."""
    section = (ROOT / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0]
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([\w.]+):\w+"', section, re.M))


@lru_cache(maxsize=None)
def tool_modules():
    return {p.stem for p in (ROOT / "cmal" / "tools").glob("*.py") if not p.stem.startswith("_")}


def tokens_of(text):
    text = re.sub(r"(^|\s)#.*$", "", text)          # a shell comment
    try:
        words = shlex.split(text)
    except ValueError:
        words = text.split()
    return [w.strip("[]") for w in words if w.strip("[]")]


def parse(doc, line, text):
    """The commands of one shown line or span (several when joined by && or a pipe)."""
    commands = []
    for part in re.split(r"&&|\s\|\s|;\s", text):
        words = tokens_of(part)
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
            words = words[1:]                           # VAR=value before a command
        if words:
            command = classify(Command(doc, line, part.strip()), words)
            if command is not None:
                commands.append(command)
    return commands


def classify(c, words):
    first, rest = words[0], words[1:]
    scripts = console_scripts()
    if first == "make":
        c.make_targets = [w for w in rest if not w.startswith("-") and "=" not in w]
        return c if c.make_targets else None
    if first in ("bash", "sh") and rest:
        c.paths = [rest[0]]
        return c
    if first.startswith("tools/"):
        c.paths = [first]
        return c
    if first == "torchrun":
        scripts_given = [i for i, w in enumerate(rest) if w.endswith(".py")]
        if not scripts_given:
            return None                                 # torchrun's own options only
        i = scripts_given[0]
        c.paths, c.target = [rest[i]], (rest[i],)
        c.options = rest[i + 1:]
    elif first in PYTHONS:
        if rest[:1] == ["-m"] and len(rest) > 1:
            module, args = rest[1], rest[2:]
            if module == "pytest":                     # its paths; -m/-k/-p take a value
                c.paths = [w.split("::")[0] for i, w in enumerate(args) if not w.startswith("-")
                           and (i == 0 or args[i - 1] not in ("-m", "-k", "-p", "-c", "-o"))]
                return c if c.paths else None
            c.target, c.options = ("-m", module), args
        elif rest and rest[0].endswith(".py"):
            c.paths, c.target, c.options = [rest[0]], (rest[0],), rest[1:]
        else:
            return None
    elif Path(first).name in scripts and rest:          # cmal-export ..., .venv/bin/cmal-predict ...
        c.target, c.options = ("-m", scripts[Path(first).name]), rest
    elif re.fullmatch(r"cmal\.tools\.\w+", first):
        if not rest:                                    # a module named in prose
            c.paths = [first.replace(".", "/") + ".py"]
            return c
        c.target, c.options = ("-m", first), rest
    elif first in tool_modules() and rest:              # `prepare_data cars SRC DEST`
        c.target, c.options = ("-m", f"cmal.tools.{first}"), rest
    elif re.fullmatch(r"train(_\w+)?\.py", first) and rest:
        c.paths, c.target, c.options = [first], (first,), rest
    else:
        return None
    if any(PLACEHOLDER.fullmatch(word) for part in c.target for word in re.split(r"[./]", part)):
        return None                                     # `python -m cmal.tools.NAME --help`
    c.options = [w.split("=")[0] for w in c.options if w.startswith("--") and w != "--"]
    c.options = [o for o in c.options if not PLACEHOLDER.fullmatch(o[2:])]   # --NAME=value
    c.mode = tuple(m for m in MODES.get(c.target, ()) if m in c.options)
    return c


def relative(doc):
    return str(doc.relative_to(ROOT))


@lru_cache(maxsize=None)
def all_commands():
    commands = []
    for doc in DOCUMENTS:
        for line, text in shown_text(doc):
            commands += parse(relative(doc), line, text)
    return commands


def option_spans():
    """(doc, line, span) of the inline spans made of options only: `--amp=bf16 --channels_last`."""
    for doc in DOCUMENTS:
        for line, text in shown_text(doc):
            if text.startswith("--"):
                yield relative(doc), line, text


def run_help(key):
    target, mode = key
    result = subprocess.run([sys.executable, *target, *mode, "--help"], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=600)
    return key, result


@pytest.fixture(scope="module")
def helps():
    """{(target, mode): the options its --help names}, each --help run once, a few at a time."""
    keys = {(c.target, c.mode) for c in all_commands() if c.target}
    keys |= {(c.target, ()) for c in all_commands() if c.target and c.mode}
    keys.add((("train.py",), ()))
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        results = dict(pool.map(run_help, sorted(keys)))
    broken = [f"{' '.join(k[0] + k[1])} --help: exit status {r.returncode}\n{r.stderr[-2000:]}"
              for k, r in results.items() if r.returncode != 0]
    assert not broken, "\n".join(broken)
    return {k: set(OPTION.findall(r.stdout)) for k, r in results.items()}


def makefile_targets():
    return set(re.findall(r"^([\w.-]+)\s*:(?!=)", (ROOT / "Makefile").read_text(), re.M))


def path_exists(path):
    path = path.rstrip("/")
    return (ROOT / path).exists() or (path.startswith("tools/") and (ROOT / "cmal" / path).exists())


def test_the_documents_show_commands():
    commands = all_commands()
    kinds = {"--help": [c for c in commands if c.target], "make": [c for c in commands if c.make_targets],
             "paths": [c for c in commands if c.paths and not c.target]}
    assert len(commands) >= 40 and all(len(v) >= 3 for v in kinds.values()), \
        {k: len(v) for k, v in kinds.items()}
    docs_with_commands = {c.doc for c in commands}
    assert {"README.md", "docs/datasets.md", "docs/training.md", "docs/performance.md"} <= docs_with_commands


def test_every_command_shown_exists_with_its_options(helps):
    targets, problems = makefile_targets(), []
    for c in all_commands():
        for t in c.make_targets:
            if t not in targets:
                problems.append(f"{c.where()}: the Makefile has no target {t}")
        for p in c.paths:
            if not path_exists(p):
                problems.append(f"{c.where()}: {p} does not exist")
        if c.target:
            known = helps[(c.target, c.mode)] | (helps[(c.target, ())] if c.mode else set())
            shown = " ".join(("python",) * (c.target[0] == "-m") + c.target + c.mode) + " --help"
            for option in c.options:
                if option not in known:
                    problems.append(f"{c.where()}: {option} is not an option of {shown}")
    assert not problems, "the documents name what does not exist:\n" + "\n".join(problems)


def test_every_option_named_alone_exists(helps):
    known = set().union(*helps.values()) | EXTERNAL_OPTIONS
    problems = []
    for doc, line, span in option_spans():
        for option in OPTION.findall(span):
            if not PLACEHOLDER.fullmatch(option[2:]) and option not in known:
                problems.append(f"{doc}:{line}: `{span}`: {option} is no option of any command "
                                f"of the project")
    assert not problems, "\n".join(problems)


def anchors(path):
    """GitHub's anchors for the headings of a Markdown file."""
    slugs = set()
    for heading in re.findall(r"^#+\s+(.*)$", path.read_text(), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        slugs.add(slug)
    return slugs


def test_links_and_pictures_resolve():
    problems = []
    for doc in DOCUMENTS:
        text = doc.read_text()
        blank = lambda m: re.sub(r"[^\n]", " ", m.group(0))   # keeps the line numbers
        text = re.sub(r"`[^`]*`", blank, re.sub(r"```.*?```", blank, text, flags=re.S))
        for match in re.finditer(r"!?\[[^\]]*\]\(([^)\s]+)\)", text):
            link = match.group(1)
            if re.match(r"[a-z]+:", link):
                continue                                # http(s), mailto
            file, _, anchor = link.partition("#")
            target = (doc.parent / file).resolve() if file else doc
            line = text.count("\n", 0, match.start()) + 1
            if not target.exists():
                problems.append(f"{relative(doc)}:{line}: ({link}): no such file")
            elif anchor and anchor not in anchors(target):
                problems.append(f"{relative(doc)}:{line}: ({link}): no heading "
                                f"#{anchor} in {target.relative_to(ROOT)}")
    assert not problems, "\n".join(problems)
