"""Does whitening fitted on the training images' features help retrieval of characters never trained on?

    python experiments/omniglot_whitening.py VALIDATION_RUN [VALIDATION_RUN ...] [--validation_alphabet Korean]
                                             [--test_runs RUN_DIR ...]

VALIDATION_RUN is a run of experiments/omniglot_embeddings.py (omniglot.py's command trained without the
validation alphabet, e.g. /tmp/jaxembed-omniglot/run_validation_without_Korean_trainer_flags_seed_1). Each
run embeds, with omniglot.py's embedding (`omniglot.EMBEDDING`), the images it trained on (--fit_on
training, the default: the turned and mirrored copies too, as `python -m jaxembed.whitening` does; or
--fit_on upright: its alphabets' drawings as drawn) and the validation alphabet's drawings; a projection
fitted on the first is applied to the second, which is scored as omniglot_embeddings.py scores (MAP@R,
Recall@1, 20-way one-shot within the alphabet). Projections: centring on the training mean; PCA whitening;
the leading principal axes, unscaled; and `jaxembed.whitening`'s learned whitening (Radenovic et al., 2018)
over a grid of its `shrinkage` and `dims`. The one chosen (the largest smallest gain over the runs) is what
`jaxembed.whitening` defaults to. Only then are the finished omniglot.py runs named by --test_runs scored on
omniglot.md's unseen concepts, without and with it, fitted the same way on each run's own images and
applied through `jaxembed.load(whitening=)`, as a user would. Writes
experiments/results/omniglot_whitening.{json,md} (suffixed _upright with --fit_on upright).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import numpy as np

import omniglot  # experiments/omniglot.py: this script's folder is on sys.path
import omniglot_embeddings
import runner
from jaxembed.inference import whitening

SHRINKAGES = (0.0, 0.1, 1.0, 3.0, 10.0)
DIMS = (None, 32, 64, 128)


def pca_whitening(features: np.ndarray, *, shrinkage: float) -> tuple[np.ndarray, np.ndarray]:
    """`(mean, P)`: `(x - mean) @ P` has identity covariance over `features` (shrinkage 0)."""
    mean = features.mean(0)
    return mean, whitening.inverse_sqrt(whitening.shrunk_covariance(features - mean, shrinkage))


def principal_axes(features: np.ndarray, *, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """`(mean, P)`: the `dims` axes of largest variance over `features`, unscaled (no whitening)."""
    mean = features.mean(0)
    variances, axes = np.linalg.eigh(whitening.shrunk_covariance(features - mean, 0.0))
    return mean, axes[:, np.argsort(variances)[::-1][:dims]]


def projections(features: np.ndarray, concepts: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray, dict]]:
    """Every candidate `name -> (mean, P, learned whitening's settings or {})` fitted on the training features."""
    identity = np.eye(features.shape[1])
    candidates = {"none": (np.zeros(features.shape[1]), identity, {}), "centred": (features.mean(0), identity, {})}
    for shrinkage in (0.0, 1.0):
        candidates[f"pca whitening, shrinkage {shrinkage:g}"] = (*pca_whitening(features, shrinkage=shrinkage), {})
    for dims in DIMS[1:]:
        candidates[f"principal axes, {dims} dims"] = (*principal_axes(features, dims=dims), {})
    for shrinkage in SHRINKAGES:
        for dims in DIMS:
            learned = whitening.fit(features, concepts, shrinkage=shrinkage, dims=dims)
            candidates[f"learned, shrinkage {shrinkage:g}, {dims or 'all'} dims"] = (
                learned.mean, learned.projection, {"shrinkage": shrinkage, "dims": dims})
    return candidates


def fitting_images(workdir: str, upright_images, fit_on: str):
    """The images a run's projections are fitted on: with `fit_on` "training" what `python -m jaxembed.whitening`
    fits on by default, the images the run trained on (the turned and mirrored copies too, the held-out
    drawings left out); with "upright", `upright_images` (its training alphabets' drawings as drawn)."""
    from jaxembed import rundir

    if fit_on == "upright":
        return upright_images
    run = rundir.RunDir(workdir)
    return run.trained_on(run.data())


def run_rows(workdir: str, train_images, validation_images) -> list[dict]:
    """One row per projection: the run's validation-alphabet retrieval after it."""
    _, train = runner.embed(workdir, train_images, **omniglot.EMBEDDING)
    _, valid = runner.embed(workdir, validation_images, **omniglot.EMBEDDING)
    train_concepts = runner.concept_names(train_images, train["index"])
    names = runner.concept_names(validation_images, valid["index"])
    features = train["embedding"].astype(np.float64)
    rows = []
    for name, (mean, projection, settings) in projections(features, train_concepts).items():
        projected = (valid["embedding"].astype(np.float64) - mean) @ projection
        rows.append({"run": os.path.basename(os.path.normpath(workdir)), "projection": name, "whitening": settings,
                     **omniglot_embeddings.scored(projected, names)})
    print(f"{rows[0]['run']}: MAP@R {rows[0]['map@r']:.3f} unprojected, best "
          f"{max(row['map@r'] for row in rows):.3f}", file=sys.stderr, flush=True)
    return rows


def chosen(rows: list[dict]) -> dict:
    """The learned whitening's settings whose smallest MAP@R gain over the validation runs is largest: a
    setting must help every run, not the average (4-5 runs of one alphabet are few)."""
    by_projection: dict[str, list[dict]] = {}
    for row in rows:
        by_projection.setdefault(row["projection"], []).append(row)
    learned = [group for group in by_projection.values() if group[0]["whitening"]]
    unprojected = {row["run"]: row["map@r"] for row in by_projection["none"]}
    best = max(learned, key=lambda group: min(row["map@r"] - unprojected[row["run"]] for row in group))
    return best[0]["whitening"]


def scored_test_runs(workdirs: list[str], upright_images, test_images, settings: dict, *, fit_on: str,
                     episodes: int) -> list[dict]:
    """Each finished omniglot.py run on omniglot.md's unseen concepts, without and with the learned whitening
    `settings`, fitted on `fitting_images` and applied by `jaxembed.load`."""
    rows = []
    for workdir in workdirs:
        train_images = fitting_images(workdir, upright_images, fit_on)
        embedder, train = runner.embed(workdir, train_images, **omniglot.EMBEDDING)
        fitted = whitening.fit(train["embedding"], runner.concept_names(train_images, train["index"]), **settings,
                               step=embedder.step, **omniglot.EMBEDDING)
        row = {"run": os.path.basename(os.path.normpath(workdir))}
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "whitening.npz")
            whitening.save(fitted, path)
            for key, extra in (("unwhitened", {}), ("whitened", {"whitening": path})):
                _, outputs = runner.embed(workdir, test_images, **omniglot.EMBEDDING, **extra)
                names = runner.concept_names(test_images, outputs["index"])
                row[key] = omniglot_embeddings.scored(outputs["embedding"], names, more_episodes=episodes)
        print(f"{row['run']}: one-shot {row['unwhitened']['one_shot_20way']:.3f} -> "
              f"{row['whitened']['one_shot_20way']:.3f}", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def markdown(result: dict) -> str:
    rows, alphabet = result["rows"], result["alphabet"]
    fitted_on = {"upright": "upright training drawings", "training": "training images (the turned and mirrored "
                 "copies too)"}[result["fit_on"]]
    runs = list(dict.fromkeys(row["run"] for row in rows))
    projection_names = list(dict.fromkeys(row["projection"] for row in rows))
    metric_names = ("map@r", "recall@1", "one_shot_20way")
    by_key = {(row["run"], row["projection"]): row for row in rows}
    cells = []
    for name in projection_names:
        means = [statistics.mean(by_key[run, name][m] for run in runs) for m in metric_names]
        gains = [by_key[run, name]["map@r"] - by_key[run, "none"]["map@r"] for run in runs]
        cells.append([name, *(runner.number(value) for value in means),
                      f"{min(gains):+.3f} / {max(gains):+.3f}"])
    header = ["projection (fitted on the run's images)", "MAP@R", "Recall@1", "20-way one-shot",
              "MAP@R change, min / max over runs"]
    settings = result["chosen"]
    lines = [
        f"Validation: {alphabet}'s drawings (never trained on) embedded with `{omniglot.EMBEDDING}` by {len(runs)} "
        f"runs trained without it, projected as fitted on each run's {fitted_on}; "
        f"means over the runs: {', '.join(runs)}. Chosen by the smallest MAP@R gain over the runs: learned "
        f"whitening with shrinkage "
        f"{settings['shrinkage']:g}, {settings['dims']} dims.", "", *runner.markdown_table(header, cells), ""]
    if result["test"]:
        lines += [
            "Test: finished omniglot.py runs on omniglot.md's 106 unseen concepts, without -> with the chosen "
            "whitening, fitted on each run's " + fitted_on + " and applied by `jaxembed.load(whitening=)`.", "",
            *omniglot_embeddings.before_and_after(result["test"], "unwhitened", "whitened",
                                                  episodes=result["episodes"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("validation_runs", nargs="+", help="finished runs of omniglot_embeddings.py")
    parser.add_argument("--validation_alphabet", default="Korean", help="the alphabet those runs left out")
    parser.add_argument("--test_runs", nargs="*", default=[],
                        help="finished omniglot.py runs to score with the chosen whitening (read only after the choice)")
    parser.add_argument("--episodes", type=int, default=20_000, help="one-shot episodes of the low-noise test column")
    parser.add_argument("--workdir", default=omniglot.parser().get_default("workdir"),
                        help="where omniglot.py extracted the zips")
    parser.add_argument("--fit_on", choices=("training", "upright"), default="training",
                        help="fit on the images each run trained on (turned and mirrored copies too: what "
                             "python -m jaxembed.whitening does by default), or on the training alphabets' "
                             "drawings as drawn")
    parser.add_argument("--out", help="results path without extension (default: experiments/results/"
                                      "omniglot_whitening, suffixed _upright with --fit_on upright)")
    args = parser.parse_args(argv)
    args.out = args.out or os.path.join(runner.RESULTS, "omniglot_whitening" + ("_upright" if args.fit_on == "upright" else ""))
    runner.refuse_unfinished(parser, [*args.validation_runs, *args.test_runs])
    from jaxembed import data as data_lib

    folder = omniglot.extract("images_background_small1", args.workdir)
    validation_images = omniglot_embeddings.alphabet_images(folder, args.validation_alphabet)
    train_images = data_lib.load_source(omniglot_embeddings.without_alphabet(folder, args.validation_alphabet))
    rows = [row for workdir in args.validation_runs
            for row in run_rows(workdir, fitting_images(workdir, train_images, args.fit_on), validation_images)]
    result = {"alphabet": args.validation_alphabet, "fit_on": args.fit_on, "rows": rows,
              "chosen": chosen(rows), "episodes": args.episodes, "test": []}
    if args.test_runs:
        original_train_folder, test_images = omniglot.splits(args.workdir)  # read only now that the choice is made
        upright = data_lib.load_source(original_train_folder)
        result["test"] = scored_test_runs(args.test_runs, upright, test_images, result["chosen"], fit_on=args.fit_on,
                                          episodes=args.episodes)
    table = markdown(result)
    runner.write_results(args.out, result, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
