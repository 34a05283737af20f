"""Do trained embeddings cluster into their concepts? k-means of each run's embeddings against raw pixels.

    python experiments/clustering.py RUN [RUN ...] --images FOLDER|holdout|omniglot [--seeds 5] [--whitening]
                                     [--out PREFIX]

Each RUN's newest checkpoint embeds the images (`jaxembed.load`, the embedding an index of them would
hold), and `jaxembed.cluster.kmeans`, the clustering `python -m jaxembed.cluster` runs, groups them into as
many clusters as they have concepts, once per k-means seed. `jaxembed.metrics.clustering_metrics` scores
each clustering against the concepts: NMI, adjusted Rand index, purity (mean over the seeds, and the
lowest). Beside each run, the same clustering of the same images' raw pixels (grey, after the evaluation
preprocessing at the run's image size, centred and L2-normalised as in every raw-pixel baseline here).

--images: a folder of concept sub-folders (e.g. the Fashion-MNIST test split that fashion_mnist.py writes),
`holdout` (each run's own held-out images, the split to decide by), or `omniglot` (omniglot.py's test set:
106 characters no run trained on). --whitening adds a row per run that has RUN/whitening.npz
(`python -m jaxembed.whitening --workdir RUN`), its embeddings projected by it. Writes PREFIX.json and
PREFIX.md (default experiments/results/clustering), with the command.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import numpy as np

import runner

SCORES = ("nmi", "adjusted_rand", "purity")


def clustering_scores(vectors: np.ndarray, names: np.ndarray, seeds: int) -> dict:
    """k-means of `vectors` into as many clusters as `names` has concepts, once per seed, each scored
    against `names`: per score its `mean` and lowest (`min`) over the seeds, and every seed's value."""
    from jaxembed import metrics
    from jaxembed.search import cluster

    k = len(np.unique(names))
    per_seed = [metrics.clustering_metrics(cluster.kmeans(vectors, k, seed=seed)[0], names) for seed in range(seeds)]
    return {"k": k, **{score: {"mean": statistics.fmean(s[score] for s in per_seed),
                               "min": min(s[score] for s in per_seed),
                               "seeds": [s[score] for s in per_seed]} for score in SCORES}}


def image_sets(spec: str, workdirs: list[str]):
    """`{workdir: (label, LabelledImages)}`: the images each run is clustered on (see --images)."""
    from jaxembed import data as data_lib
    from jaxembed import rundir

    if spec == "holdout":
        runs = {workdir: rundir.RunDir(workdir) for workdir in workdirs}
        return {workdir: ("holdout", run.heldout(run.data())) for workdir, run in runs.items()}
    if spec == "omniglot":
        import omniglot  # experiments/omniglot.py: extracts the shared zips on first use, as it does

        images = omniglot.splits(os.path.join(tempfile.gettempdir(), "jaxembed-omniglot"))[1]
    else:
        images = data_lib.load_source(spec)
    return {workdir: (spec, images) for workdir in workdirs}


def markdown(rows: list[dict], command: str) -> str:
    def cell(scores: dict, score: str) -> str:
        return f"{runner.number(scores[score]['mean'])} ({runner.number(scores[score]['min'])})"

    header = ["run", "images", "k", *(f"{score}: model (lowest)" for score in SCORES),
              *(f"{score}: raw pixels" for score in SCORES)]
    cells = [[os.path.basename(row["run"]) + (" + whitening" if row["whitening"] else ""),
              f"{os.path.basename(os.path.normpath(row['images']))} ({row['num_images']})",
              row["model"]["k"], *(cell(row["model"], score) for score in SCORES),
              *(cell(row["pixels"], score) for score in SCORES)] for row in rows]
    seeds = len(rows[0]["model"]["nmi"]["seeds"]) if rows else 0
    return "\n".join([f"`{command}`", "",
                      f"k-means (`jaxembed.cluster.kmeans`) into k clusters, k the number of concepts; mean over "
                      f"{seeds} k-means seeds, the lowest in brackets.", "",
                      *runner.markdown_table(header, cells), ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="finished training workdirs")
    parser.add_argument("--images", required=True, help="a folder of concept sub-folders, holdout, or omniglot")
    parser.add_argument("--seeds", type=int, default=5, help="k-means seeds per clustering")
    parser.add_argument("--whitening", action="store_true", help="also each run's RUN/whitening.npz, if any")
    parser.add_argument("--out", default=None, help="writes OUT.json and OUT.md (default: "
                                                    "experiments/results/clustering)")
    args = parser.parse_args(argv)
    runner.refuse_unfinished(parser, args.runs)
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: needs at least 1")
    command = " ".join(["python experiments/clustering.py", *args.runs, "--images", args.images,
                        *(["--seeds", str(args.seeds)] if args.seeds != 5 else []),
                        *(["--whitening"] if args.whitening else []), *(["--out", args.out] if args.out else [])])
    out = args.out or os.path.join(runner.REPO, "experiments", "results", "clustering")

    from jaxembed import metrics

    try:
        sets = image_sets(args.images, args.runs)
    except (FileNotFoundError, ValueError) as error:
        parser.error(f"--images {args.images}: {error}")
    rows, pixel_scores = [], {}  # pixel scores by (images, image size, embedded items): runs often share them
    for workdir, (label, images) in sets.items():
        whitening = os.path.join(workdir, "whitening.npz")
        if args.whitening and not os.path.exists(whitening):
            print(f"{workdir}: no whitening.npz, so no whitened row (python -m jaxembed.whitening --workdir "
                  f"{workdir} writes one)", file=sys.stderr, flush=True)
        for whiten in (False, True) if args.whitening and os.path.exists(whitening) else (False,):
            embedder, outputs = runner.embed(workdir, images, **({"whitening": whitening} if whiten else {}))
            names = runner.concept_names(images, outputs["index"])
            key = (id(images), embedder.image_size, tuple(outputs["index"]))
            if key not in pixel_scores:
                pixels = runner.eval_pixels(images, embedder.image_size)[outputs["index"]]
                pixel_scores[key] = clustering_scores(metrics.pixel_vectors(pixels), names, args.seeds)
            rows.append({"run": workdir, "whitening": whiten, "images": label, "num_images": len(names),
                         "model": clustering_scores(outputs["embedding"], names, args.seeds),
                         "pixels": pixel_scores[key]})
            print(markdown(rows[-1:], command).splitlines()[-1], flush=True)
    runner.write_results(out, {"command": command, "rows": rows}, markdown(rows, command))
    print(f"wrote {out}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
