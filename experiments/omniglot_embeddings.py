"""Which layer of a trained Omniglot classifier embeds unseen characters best, chosen on an alphabet never trained on.

    python experiments/omniglot_embeddings.py [--validation_alphabet Korean] [RUN_DIR ...]

A classifier's last pooled features are shaped by the training concepts; for concepts it never saw, an
earlier block's features may retrieve better. Choosing that layer on the test set would flatter it, so
the choice is made on a validation alphabet: omniglot.py's default command is trained on
background_small1 without `--validation_alphabet` (its turned and mirrored copies as concepts, as the
default does), and every candidate embedding (a block's output pooled by average, max or generalised
mean) is scored on that alphabet's drawings. The candidate with the best validation MAP@R is then
scored, beside the last block's average (the embedding omniglot.md scored), on omniglot.md's test set
for each finished omniglot.py run named (RUN_DIR, e.g.
/tmp/jaxembed-omniglot/run_inception_bn_80px_5ep_rot4_mirror): no training, and the test set is read
only once the choice is made. A finished validation run is reused.

    python experiments/omniglot_embeddings.py --setting="--rotations 8 --trainer_flags='--per_item_lrate 0.0004'"

validates a training setting the same way: omniglot.py's training flags (`TRAINING_SETTINGS`) change its
default command, trained without the validation alphabet, every candidate scored on it (workdir and
results beside the default's, suffixed with the flags). A setting earns a 30-minute test run (omniglot.py
with the same flags) only by beating the default here.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile

import numpy as np

import omniglot  # experiments/omniglot.py: this script's folder is on sys.path
import runner


def without_alphabet(folder: str, alphabet: str) -> str:
    """`folder` (alphabet folders) without `alphabet`: a sibling folder of links to the other alphabets."""
    if alphabet not in os.listdir(folder):
        raise ValueError(f"--validation_alphabet {alphabet}: not an alphabet of {folder} "
                         f"(it has {', '.join(sorted(os.listdir(folder)))})")
    target = f"{folder}_without_{alphabet}"
    os.makedirs(target, exist_ok=True)
    for name in sorted(os.listdir(folder)):
        link = os.path.join(target, name)
        if name != alphabet and not os.path.lexists(link):
            os.symlink(os.path.join(os.path.abspath(folder), name), link)
    return target


# omniglot.py's flags that change how its command trains: those a row's command depends on, less the
# embedding, which is what this script chooses.
TRAINING_SETTINGS = tuple(key for key in omniglot.SCRIPT_ARGS if key not in omniglot.EMBEDDING)


def training_setting(flags: list[str]) -> argparse.Namespace:
    """omniglot.py's arguments for its default command changed by `flags` (a setting to validate), with
    no embedding choice (the candidates are read from every block).

    Raises:
      ValueError: naming a flag of omniglot.py that does not change the training, or one it lacks.
    """
    omniglot_parser = omniglot.parser()
    try:
        setting = omniglot_parser.parse_args(["--embedding_layer", "", *flags])
    except SystemExit:
        raise ValueError(f"{shlex.join(flags)}: not flags of experiments/omniglot.py (see its --help)") from None
    default = omniglot_parser.parse_args(["--embedding_layer", ""])
    other = sorted(key for key in vars(setting) if getattr(setting, key) != getattr(default, key)
                   and key not in TRAINING_SETTINGS)
    if other:
        raise ValueError(f"{shlex.join(flags)}: --{', --'.join(other)} do not change the training; "
                         f"a setting to validate may change --{', --'.join(TRAINING_SETTINGS)}")
    return setting


def validation_run(args) -> runner.TrainedRun:
    """omniglot.py's default command with the setting `args.setting` (its flags; none: the default), before
    its embedding choice, trained without the validation alphabet (now, unless a finished run of it is
    there: then its `seconds` are 0)."""
    defaults = training_setting(args.setting)
    train_folder = omniglot.extract("images_background_small1", args.workdir)
    folder = omniglot.with_glyph_copies(without_alphabet(train_folder, args.validation_alphabet),
                                        defaults.rotations, defaults.mirror)
    flags = omniglot.train_flags("inception_bn", defaults, folder)
    workdir = os.path.join(args.workdir, f"run_validation_without_{args.validation_alphabet}"
                                         f"{omniglot.flags_label(shlex.join(args.setting))}")
    if os.path.isfile(os.path.join(workdir, "summary.json")):
        print(f"{workdir}: finished, reused", file=sys.stderr, flush=True)
        return runner.TrainedRun(command=shlex.join(["python", "-m", "jaxembed.train", *flags]), workdir=workdir,
                                 seconds=0.0)
    return runner.train(flags, workdir)


def alphabet_images(folder: str, alphabet: str):
    """The drawings of `alphabet` in `folder`, with their own concept list."""
    from jaxembed import data as data_lib

    images = data_lib.load_source(folder)
    keep = [i for i, label in enumerate(images.primary_labels) if images.concepts[label].startswith(alphabet + "/")]
    return images.subset(keep).with_own_concepts()


def candidate_embeddings(workdir: str, images) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """`({"<block>/<pooling>": (N, C) pooled maps}, item index)`: every block of the run's backbone under
    every pooling, from one forward pass (flax's captured intermediates, so one compilation)."""
    import jax
    import jax.numpy as jnp

    import jaxembed
    from jaxembed.inference import embed as embed_lib
    from jaxembed import models, tasks
    from jaxembed.models import heads

    embedder = jaxembed.load(workdir)
    model = tasks.build_model(embedder.config.replace(model_parallelism=1), len(embedder.concepts))
    blocks = models.block_names(embedder.config.arch)

    @jax.jit
    def apply_fn(variables, batch):
        _, state = model.apply(variables, batch, mutable=["intermediates"],
                               capture_intermediates=lambda module, method: module.name in blocks and method == "__call__")
        maps = state["intermediates"]["backbone"]
        return {f"{block}/{how}": heads.pool(maps[block]["__call__"][0].astype(jnp.float32), how)
                for block in blocks for how in heads.POOLINGS}

    keys = [f"{block}/{how}" for block in blocks for how in heads.POOLINGS]
    outputs = embed_lib.embed_dataset(apply_fn, embedder.variables, images, image_size=embedder.image_size, keep=keys)
    return {key: outputs[key] for key in keys}, outputs["index"]


def scored(embeddings: np.ndarray, names: np.ndarray, *, more_episodes: int | None = None) -> dict:
    """omniglot.md's metrics (its episodes), and the one-shot accuracy over `more_episodes` too."""
    row = runner.retrieval(runner.unit_rows(embeddings), names, **omniglot.RETRIEVAL)
    if more_episodes:
        row["one_shot_20way_more_episodes"] = omniglot.one_shot(embeddings, names, episodes=more_episodes, seed=1)
    return row


def validation(args) -> dict:
    """Every candidate embedding scored on the validation alphabet, and the chosen one (best MAP@R),
    checked against `jaxembed.load` with those settings."""
    run = validation_run(args)
    workdir = run.workdir
    images = alphabet_images(omniglot.extract("images_background_small1", args.workdir), args.validation_alphabet)
    candidates, index = candidate_embeddings(workdir, images)
    names = runner.concept_names(images, index)
    rows = [{"embedding_layer": key.split("/")[0], "embedding_pooling": key.split("/")[1], **scored(value, names)}
            for key, value in candidates.items()]
    best = max(rows, key=lambda row: row["map@r"])
    chosen = {"embedding_layer": best["embedding_layer"], "embedding_pooling": best["embedding_pooling"]}
    _, outputs = runner.embed(workdir, images, **chosen)  # what a user of the two settings gets
    np.testing.assert_allclose(outputs["embedding"], runner.unit_rows(candidates["/".join(chosen.values())]),
                               atol=1e-5, err_msg="jaxembed.load with the chosen settings differs from the candidate")
    return {"alphabet": args.validation_alphabet, "images": len(images), "concepts": len(images.concepts),
            "command": run.command, "holdout": run.holdout(), "candidates": rows, "chosen": chosen}


# The classifier's embedding without a choice: its last block, average-pooled (what the runs scored in omniglot.md).
LAST = {"embedding_layer": None, "embedding_pooling": "avg"}


def scored_test_runs(workdirs: list[str], test_images, chosen: dict, *, episodes: int) -> list[dict]:
    """Each finished omniglot.py run on omniglot.md's unseen concepts: the last block's embedding and the chosen one."""
    rows = []
    for workdir in workdirs:
        row = {"run": os.path.basename(os.path.normpath(workdir))}
        for key, settings in (("last", LAST), ("chosen", chosen)):
            _, outputs = runner.embed(workdir, test_images, **settings)
            names = runner.concept_names(test_images, outputs["index"])
            row[key] = scored(outputs["embedding"], names, more_episodes=episodes)
        print(f"{row['run']}: one-shot {row['last']['one_shot_20way']:.3f} -> {row['chosen']['one_shot_20way']:.3f}",
              file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def markdown(result: dict) -> str:
    number = runner.number
    valid = result["validation"]
    chosen = valid["chosen"]
    cells = [[row["embedding_layer"], row["embedding_pooling"], number(row["recall@1"]), number(row["map@r"]),
              number(row.get("one_shot_20way"))] for row in valid["candidates"]]
    candidates = runner.markdown_table(["block", "pooling", "Recall@1", "MAP@R", "20-way one-shot"], cells)
    return "\n".join([
        f"Validation: omniglot.py's default command trained without {valid['alphabet']} "
        f"(`{valid['command']}`), every block's output map pooled three ways, scored on the {valid['images']:,} "
        f"drawings of {valid['alphabet']}'s {valid['concepts']} characters (never trained on). Chosen by MAP@R: "
        f"`--embedding_layer {chosen['embedding_layer']} --embedding_pooling {chosen['embedding_pooling']}`.", "",
        *candidates, "",
        "Test: finished omniglot.py runs on omniglot.md's 106 unseen concepts, the last block average-pooled (the "
        "embedding omniglot.md scored) -> the chosen one (same weights: the setting changes no parameter).", "",
        *before_and_after(result["test"], "last", "chosen", episodes=result["episodes"]), ""])


def before_and_after(test_rows: list[dict], before: str, after: str, *, episodes: int) -> list[str]:
    """Markdown lines: each test run's metrics `before` -> `after` (keys of its row), and the one-shot gain
    over `episodes` episodes."""
    number = runner.number
    metric_names = ("recall@1", "map@r", "one_shot_20way", "one_shot_20way_more_episodes")
    cells = [[row["run"], *(f"{number(row[before][m])} -> {number(row[after][m])}" for m in metric_names)]
             for row in test_rows]
    header = ["run (omniglot.py workdir)", "Recall@1", "MAP@R", f"one-shot, {omniglot.RETRIEVAL['episodes']:,} episodes",
              f"one-shot, {episodes:,} episodes"]
    gains = [row[after]["one_shot_20way_more_episodes"] - row[before]["one_shot_20way_more_episodes"]
             for row in test_rows]
    return [*runner.markdown_table(header, cells), "",
            (f"- one-shot gain over {episodes:,} episodes: mean {statistics.mean(gains):+.3f}, min {min(gains):+.3f}, "
             f"max {max(gains):+.3f} over {len(gains)} runs" if gains else "- (no test runs named)")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("test_runs", nargs="*", help="finished omniglot.py runs to score with the chosen embedding")
    parser.add_argument("--validation_alphabet", default="Korean",
                        help="the background_small1 alphabet left out of training and chosen on (Korean: 40 characters)")
    parser.add_argument("--episodes", type=int, default=20_000, help="one-shot episodes of the low-noise test column")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "jaxembed-omniglot"),
                        help="where omniglot.py extracted the zips")
    parser.add_argument("--out", help="results path without extension (default: experiments/results/"
                                      "omniglot_embeddings, suffixed with the setting's flags)")
    parser.add_argument("--setting", type=shlex.split, default=[],
                        help="a training setting to validate: omniglot.py flags in one argument, of "
                             f"--{', --'.join(TRAINING_SETTINGS)}, after '=': --setting='--rotations 8' (default: none)")
    args = parser.parse_args(argv)
    try:
        training_setting(args.setting)
    except ValueError as error:
        parser.error(str(error))
    args.out = args.out or os.path.join(runner.RESULTS, "omniglot_embeddings" + omniglot.flags_label(shlex.join(args.setting)))
    runner.refuse_unfinished(parser, args.test_runs)

    result = {"validation": validation(args), "episodes": args.episodes}
    _, test_images = omniglot.splits(args.workdir)  # read only now that the choice is made
    result["test"] = scored_test_runs(args.test_runs, test_images, result["validation"]["chosen"], episodes=args.episodes)
    table = markdown(result)
    runner.write_results(args.out, result, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
