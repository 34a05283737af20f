"""Every command the README and the docs show names a real command with real flags.

Each `python -m jaxembed.NAME ...` and `jaxembed NAME ...` inside code (fenced blocks and inline code) of
README.md and docs/**/*.md is checked against that command's own parser (`jaxembed.cli.COMMANDS[NAME]`'s
`build_parser()`; for train, the parser of the template given by `--template`): the command exists (and,
for `python -m`, its module runs), every flag is one the parser accepts, and a literal value converts as
the parser converts it and lies in its choices (train: the template's range). Parsing only, nothing runs.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import pathlib
import re
import shlex

import pytest

from jaxembed import templates
from jaxembed.cli import COMMANDS

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

# A command starts at the start of a piece of code or after a shell separator (`&&`, `;`, `|`, `$ `); the
# command name ends at a space (`python -m jaxembed.evaluate: note ...`, a program's message, is no command).
START = re.compile(r"(?:^|&&|;|\||\$\s)\s*(?:python3? -m jaxembed\.(?P<module>\w+)|jaxembed (?P<name>[a-z_]+))(?=\s|$)(?P<rest>.*)")
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE = re.compile(r"`([^`\n]+)`")
ENDS = {"&&", ";", "|", "#", ">", ">>", "2>", "2>&1"}


def code_pieces(text: str) -> list[tuple[int, str]]:
    """(line number, code) for each line of a fenced block (continuations joined) and each inline code span."""
    pieces, fenced, pending = [], False, None
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            if pending is not None:
                line = pending[1] + " " + line.strip()
                number = pending[0]
            if line.rstrip().endswith("\\"):
                pending = (number, line.rstrip()[:-1])
                continue
            pending = None
            pieces.append((number, line.strip()))
        else:
            pieces.extend((number, span) for span in INLINE.findall(line))
    return pieces


def shown_commands(path: pathlib.Path) -> list[tuple[str, str, list[str]]]:
    """(where, command name, argument tokens) of every jaxembed command shown in the file's code."""
    found = []
    for number, code in code_pieces(path.read_text()):
        for match in START.finditer(code):
            name = match.group("module") or match.group("name")
            try:
                tokens = shlex.split(match.group("rest"), comments=False)
            except ValueError:
                tokens = match.group("rest").split()
            arguments = []
            for token in tokens:
                if token in ENDS or token.startswith("#"):
                    break
                arguments.append(token)
            if match.group("module"):  # `python -m jaxembed.NAME`: the module must run
                arguments = ["<python -m>", *arguments]
            found.append((f"{path.relative_to(ROOT)}:{number}", name, arguments))
    return found


ALL_SHOWN = [shown for path in DOCS for shown in shown_commands(path)]


@functools.cache
def parser_of(name: str, template_name: str | None = None) -> argparse.ArgumentParser:
    module = importlib.import_module(COMMANDS[name])
    if name == "train":
        return module.build_parser(template_name=template_name or templates.NAMES[0])
    return module.build_parser()


def runnable(module: str) -> bool:
    """Whether `python -m MODULE` finds something to run: a module, or a package with `__main__`."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        return False
    return spec.submodule_search_locations is None or importlib.util.find_spec(module + ".__main__") is not None


def is_placeholder(value: str) -> bool:
    """NAME, FOLDER, RUN/whitening.npz, '...', <x>: stands for a value the reader fills in."""
    return value in {"...", "…"} or value.startswith("<") or bool(re.match(r"^[A-Z][A-Z0-9_]*(\b|$)", value))


def problems(name: str, arguments: list[str]) -> list[str]:
    """What is wrong with `jaxembed NAME ARGUMENTS` as far as its parser can tell without running it."""
    if is_placeholder(name):  # `jaxembed NAME ...`: stands for any command
        return []
    if name not in COMMANDS:
        return [f"no command {name!r} (commands: {', '.join(COMMANDS)})"]
    if arguments[:1] == ["<python -m>"]:
        arguments = arguments[1:]
        if not runnable(f"jaxembed.{name}"):
            return [f"python -m jaxembed.{name} has no module to run"]
    parsers, specs = [parser_of(name)], {}
    if name == "train":
        given = [arguments[i + 1] for i, a in enumerate(arguments[:-1]) if a == "--template"]
        given += [a.split("=", 1)[1] for a in arguments if a.startswith("--template=")]
        if given and not is_placeholder(given[0]):
            if given[0] not in templates.NAMES:
                return [f"no template {given[0]!r} (templates: {', '.join(templates.NAMES)})"]
            parsers = [parser_of(name, given[0])]
            specs = templates.get(given[0]).specs
        else:  # a placeholder template: a flag of any template will do
            parsers = [parser_of(name, template) for template in templates.NAMES]
    found = []
    for i, token in enumerate(arguments):
        if not token.startswith("-") or token in {"-", "--"} or re.fullmatch(r"-\d[\d.e-]*", token):
            continue
        flag, _, inline_value = token.partition("=")
        actions = [p._option_string_actions.get(flag) for p in parsers]
        actions = [a for a in actions if a is not None]
        if not actions:
            found.append(f"{flag} is not a flag of `jaxembed {name}`")
            continue
        value = inline_value or (arguments[i + 1] if i + 1 < len(arguments) else None)
        action = actions[0]
        if action.nargs == 0 or value is None or is_placeholder(value) or value.startswith("-"):
            continue
        try:  # the value as the parser converts it, then as the template validates it (train)
            converted = (action.type or str)(value)
            if action.choices and converted not in action.choices:
                raise ValueError(f"not one of {', '.join(map(str, action.choices))}")
            if action.dest in specs:
                specs[action.dest].validate(converted)
        except (TypeError, ValueError) as error:
            found.append(f"{flag} {value}: {error}")
    return found


def test_the_docs_show_commands():
    names = {name for _, name, _ in ALL_SHOWN}
    assert {"train", "embed", "index", "search", "cluster"} <= names, names


@pytest.mark.parametrize("where,name,arguments", ALL_SHOWN, ids=[f"{w} {n}" for w, n, _ in ALL_SHOWN])
def test_shown_command_parses(where, name, arguments):
    assert not problems(name, arguments), f"{where}: jaxembed {name} {' '.join(arguments)}: {problems(name, arguments)}"


def test_a_wrong_flag_or_command_is_caught():
    assert problems("search", ["--index", "x", "--query", "q.jpg", "-k", "3"]) == []
    assert problems("search", ["--index", "x", "--qeury", "q.jpg"]) == ["--qeury is not a flag of `jaxembed search`"]
    assert problems("train", ["--template", "resnext", "--angular_margin", "0.2"])  # an ArcFace flag on resnext
    assert problems("train", ["--template", "NAME", "--angular_margin", "0.2"]) == []
    assert problems("train", ["--template", "inception_bn", "--dtype", "float16"])
    assert problems("serve", [])
    assert problems("search", ["<python -m>", "--index", "x"]) == []
    assert not runnable("jaxembed.no_such_tool") and not runnable("jaxembed.data")  # data: a package, no __main__
