"""MkDocs hooks: the pages that are generated from the code, and the result files the results pages show.

- `<!-- jaxembed:cli -->` in a page becomes every command's flags, read from the parsers themselves
  (`jaxembed.cli.COMMANDS`: command name -> module with `build_parser()`), so the flags in the docs are the
  flags the commands accept.
- `<!-- jaxembed:hyperparameters -->` becomes the templates' hyperparameters and the run options, read from
  `jaxembed.templates` (`TEMPLATES`, `Template.hparams`, `RUN_OPTIONS`).
- The committed figures and pages under experiments/results/ (curves, reports, search pages) are served
  under `results/`, so that the tables included from experiments/results/*.md (whose links are relative
  to that folder, e.g. `curves/demo_inception_bn.png`) resolve on the results pages.
"""

from __future__ import annotations

import argparse
import importlib
import pathlib

from mkdocs.structure.files import File

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
RESULT_FILES = ("*.png", "*.html", "curves/*.png")

CLI_MARKER = "<!-- jaxembed:cli -->"
HPARAMS_MARKER = "<!-- jaxembed:hyperparameters -->"
SHOWN_TEMPLATE = "inception_bn"  # the template of the README's first command


# ---------------------------------------------------------------------------------------------------- files


def on_files(files, config):
    """Adds experiments/results' figures and pages as `results/<name>` (what the included tables link to)."""
    for pattern in RESULT_FILES:
        for path in sorted(RESULTS.glob(pattern)):
            uri = "results/" + path.relative_to(RESULTS).as_posix()
            if files.get_file_from_path(uri) is None:
                files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    if HPARAMS_MARKER in markdown:
        markdown = markdown.replace(HPARAMS_MARKER, hyperparameter_reference())
    return markdown


# ------------------------------------------------------------------------------------------ the commands


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


def _default(action: argparse.Action) -> str:
    if action.default in (None, argparse.SUPPRESS) or isinstance(action, (argparse._StoreTrueAction,
                                                                          argparse._StoreFalseAction)):
        return ""
    return f"`{action.default}`"


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    if action.choices:
        return " \\| ".join(f"`{choice}`" for choice in action.choices)
    if action.metavar:
        return f"`{action.metavar}`"
    if action.type is not None:
        return getattr(action.type, "__name__", str(action.type))
    return "value"


def flag_table(parser: argparse.ArgumentParser) -> str:
    """A Markdown table of a parser's arguments: flag (or positional), value, default, required, help."""
    formatter = parser._get_formatter()
    rows = ["| argument | value | default | help |", "| --- | --- | --- | --- |"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = ", ".join(f"`{option}`" for option in action.option_strings) or f"`{action.dest}` (positional)"
        if action.required and action.option_strings:
            name += " (required)"
        help_text = formatter._expand_help(action) if action.help else ""
        rows.append(f"| {name} | {_value(action)} | {_default(action)} | {_cell(help_text)} |")
    return "\n".join(rows)


def _parser(name: str, module_path: str, template_name: str | None = None) -> argparse.ArgumentParser:
    module = importlib.import_module(module_path)
    if template_name is not None:
        return module.build_parser(template_name=template_name)
    return module.build_parser()


def cli_reference() -> str:
    """Every command of `jaxembed.cli.COMMANDS`, in its order, with its parser's description and flags."""
    from jaxembed import templates
    from jaxembed.cli import COMMANDS

    sections = []
    for name, module_path in COMMANDS.items():
        lines = [f"## `{name}`", "",
                 f"`jaxembed {name} ...` or `python -m jaxembed.{name} ...` (module `{module_path}`).", ""]
        if name == "train":
            shown = SHOWN_TEMPLATE
            parser = _parser(name, module_path, template_name=shown)
            if parser.description:
                lines += [_cell(parser.description), ""]
            lines += [f"Shown for `--template {shown}`; each template has its own hyperparameters (the flags that "
                      "differ are listed after the table; all of them, with their ranges, in "
                      "[Hyperparameters](hyperparameters.md)).", "", flag_table(parser), ""]
            base = {option for action in parser._actions for option in action.option_strings}
            for other in templates.NAMES:
                if other == shown:
                    continue
                flags = {option for action in _parser(name, module_path, template_name=other)._actions
                         for option in action.option_strings}
                extra, missing = sorted(flags - base), sorted(base - flags)
                text = f"`--template {other}`"
                if not extra and not missing:
                    text += " takes the same flags"
                if extra:
                    text += " also takes " + ", ".join(f"`{o}`" for o in extra)
                if missing:
                    text += (" and" if extra else "") + " has no " + ", ".join(f"`{o}`" for o in missing)
                lines += [text + ".", ""]
        else:
            parser = _parser(name, module_path)
            if parser.description:
                lines += [_cell(parser.description), ""]
            lines += [flag_table(parser), ""]
        sections.append("\n".join(lines))
    return "\n".join(sections)


# ------------------------------------------------------------------------------------- the hyperparameters


def _bound(value) -> str:
    return "" if value is None else f"{value:g}"


def _range(spec) -> str:
    if spec.kind is bool:
        return "on / off"
    if spec.kind is str:
        return " \\| ".join(f"`{c}`" for c in spec.choices) if spec.choices else "a string"
    if spec.minimum is None and spec.maximum is None:
        return "any"
    if spec.maximum is None:
        text = f">= {_bound(spec.minimum)}"
    elif spec.minimum is None:
        text = f"<= {_bound(spec.maximum)}"
    else:
        text = f"{_bound(spec.minimum)} .. {_bound(spec.maximum)}"
    if spec.step is not None and not (spec.kind is int and spec.step == 1):
        text += f", step {spec.step:g}"
    return text


def _spec_default(spec) -> str:
    return "unset" if spec.default is None else f"`{spec.default}`"


def hparam_table(specs, templates_of=None) -> str:
    header = "| name | " + ("templates | " if templates_of else "") + "type | range | default | meaning |"
    rows = [header, "| --- | " + ("--- | " if templates_of else "") + "--- | --- | --- | --- |"]
    for name, spec in specs.items():
        used = f"{templates_of[name]} | " if templates_of else ""
        rows.append(f"| `{name}` | {used}{spec.kind.__name__} | {_range(spec)} | {_spec_default(spec)} | "
                    f"{_cell(spec.help)} |")
    return "\n".join(rows)


def hyperparameter_reference() -> str:
    from jaxembed import templates

    names: dict[str, list[str]] = {}
    specs = {}
    for template in templates.TEMPLATES.values():
        for name, spec in template.hparams.items():
            names.setdefault(name, []).append(template.name)
            specs.setdefault(name, spec)
    every = len(templates.TEMPLATES)
    templates_of = {name: "all" if len(used) == every else ", ".join(f"`{t}`" for t in used)
                    for name, used in names.items()}
    overview = ["| template | seed name | backbones (`--arch`, default first) | head | description |",
                "| --- | --- | --- | --- | --- |"]
    for template in templates.TEMPLATES.values():
        overview.append(f"| `{template.name}` | {template.seed_name} | "
                        f"{', '.join(f'`{a}`' for a in template.archs)} | {template.head} | "
                        f"{_cell(template.description)} |")
    return "\n".join([
        "## Templates", "", "\n".join(overview), "",
        "## Template hyperparameters", "",
        "`jaxembed.templates.get(NAME).hparams`; each is the flag `--NAME` of `jaxembed train`.", "",
        hparam_table(specs, templates_of), "",
        "## Run options", "",
        "`jaxembed.templates.RUN_OPTIONS`: the trainer's settings beside the template's, in the same config "
        "and `run.json`, each the flag `--NAME`. Options marked *may change on resume* are how a run is "
        "watched or stopped, not what it computes.", "",
        hparam_table({name: spec for name, spec in templates.RUN_OPTIONS.items()}), "",
        "May change on resume: " + ", ".join(f"`{name}`" for name, spec in templates.RUN_OPTIONS.items()
                                             if not spec.same_run) + ".", "",
    ])
