"""Import a script of experiments/ (not a package) as a module, for tests of its helpers."""

import importlib.util
import json
import pathlib
import sys
from types import ModuleType

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"


def load(name: str) -> ModuleType:
    """experiments/<name>.py, executed as module `<name>_experiment` (its main() is not run).

    experiments/ goes on sys.path, as it is for `python experiments/<name>.py`: the scripts import
    their shared `runner` module from there.
    """
    if str(EXPERIMENTS) not in sys.path:
        sys.path.append(str(EXPERIMENTS))
    spec = importlib.util.spec_from_file_location(f"{name}_experiment", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import does: dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def committed_result(name: str) -> tuple:
    """`(parsed JSON, markdown text)` of experiments/results/<name>.{json,md}, the pair an experiment
    writes (names may hold dots: omniglot_embeddings_..._0.0004)."""
    results = EXPERIMENTS / "results"
    return json.loads((results / f"{name}.json").read_text()), (results / f"{name}.md").read_text()
