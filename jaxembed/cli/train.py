"""The trainer's command: `python -m jaxembed.train --template NAME [--data SOURCE] [--workdir DIR] [--<setting> VALUE ...]`."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Mapping

import jax

from jaxembed import parallel, templates
from jaxembed.cli import runner
from jaxembed.train import TrainingStopped, train_and_evaluate

PROG = "python -m jaxembed.train"

# Settings for the bare command on a CPU, where the template defaults (224 px, 30 epochs of a
# 100-layer network) would take days. Flags given by the user override them.
CPU_DEMO = {
    # ArcFace holds out images here, not its default unseen concepts: 10 digits leave 2 to hold out,
    # which raw pixels already tell apart perfectly, so no model could beat them there. Unseen concepts
    # are measured on Omniglot (experiments/omniglot.py).
    "resnet_angular_margin": {"arch": "resnet50", "num_epochs": 4, "init_epochs": 3, "num_items_per_epoch": 1024,
                              "per_item_lrate": 0.0005, "angular_scale": 32, "holdout": "images"},
    # The classifiers train at the templates' own 0.1 per 256 images (per_item_lrate 0.0004): at 0.001 a
    # step's loss rose to 3.2-4.4x its logging window's mean after warmup (experiments/demo_runs.py).
    "inception_bn": {"num_epochs": 6, "init_epochs": 4},
    "resnext": {"arch": "resnext50_32x4d", "num_epochs": 4, "init_epochs": 3},
}
# The embedded digits are 8x8 pixels: crops of a quarter of that lose the digit. Half an epoch of
# warmup lets the short runs start at the full rate without the early loss spikes.
CPU_DEMO_SHARED = {"image_size": 32, "batch_size": 32, "step_epochs": 1, "min_crop_area": 0.7, "warmup_epochs": 0.5}


def build_parser(template_name: str = "inception_bn", prog: str = PROG) -> argparse.ArgumentParser:
    """The parser of the template named `template_name`: its hyperparameters are the flags."""
    template = templates.get(template_name)
    parser = argparse.ArgumentParser(
        prog=prog, description=f"Train the {template.name} template: {template.description}.")
    parser.add_argument("--template", required=True, choices=templates.NAMES,
                        help="which template to train: its backbone, head, loss and hyperparameters")
    parser.add_argument("--data", default=None,
                        help="a folder of concept sub-folders, a .csv/.jsonl manifest, or tfds:NAME[:SPLIT] "
                             "(default: the embedded default dataset)")
    parser.add_argument("--workdir", default=None, help="checkpoints and logs; an unfinished run there resumes "
                                                        "(default: runs/<template>)")
    template.add_arguments(parser)
    parser.add_argument("--no_progress", dest="progress", action="store_false", default=None,
                        help="no progress bar (for logs); the same as --no-progress")
    parser.add_argument("--coordinator_address", default=None, help="multi-host: the coordinator's host:port")
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)
    return parser


def demo_settings(template: templates.Template, args: argparse.Namespace) -> dict:
    """The CPU demo settings the user did not override, for a bare command on a CPU; else none."""
    if args.data is not None or jax.default_backend() != "cpu":
        return {}
    demo = {**CPU_DEMO[template.name], **CPU_DEMO_SHARED}
    demo = {name: value for name, value in demo.items() if getattr(args, name) is None}
    if demo:
        print(f"jaxembed: training on the embedded default dataset on a CPU; the template defaults would "
              f"take days here, so these demo settings apply (flags override them): "
              f"{', '.join(f'--{k} {v}' for k, v in demo.items())}", flush=True)
    return demo


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    argv = sys.argv[1:] if argv is None else argv
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--template", choices=templates.NAMES)
    known, _ = pre.parse_known_args(argv)
    if known.template is None:
        build_parser(prog=prog).parse_args(argv)  # prints usage and the error
        return runner.USAGE
    template = templates.get(known.template)
    args = build_parser(template.name, prog).parse_args(argv)

    def work() -> int:
        parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
        try:
            config = template.config_from_args(args, **demo_settings(template, args))
        except ValueError as error:
            raise runner.UsageError(error) from error
        workdir = args.workdir or os.path.join("runs", template.name)
        summary = train_and_evaluate(config, workdir, data_spec=args.data)
        print(json.dumps({k: v for k, v in summary.items() if k != "bad_files"}, indent=2))
        print(f"workdir: {workdir}")
        return exit_status(summary)

    return runner.run_tool(prog, work, bad_input=(TrainingStopped,),
                           log_format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def exit_status(summary: Mapping) -> int:
    """0, or for a run stopped by a signal the shell's 128 + its number (143 for SIGTERM), which
    tells a job scheduler the run was interrupted and should be restarted."""
    if summary.get("stopped_by"):
        return 128 + signal.Signals[summary["stopped_by"]].value
    return 0
