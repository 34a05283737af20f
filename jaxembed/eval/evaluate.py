"""Embedding a data set and scoring it (`jaxembed.metrics`), and `python -m jaxembed.evaluate`.

    python -m jaxembed.evaluate --embeddings FILE.npz [--out metrics.json]     # from `python -m jaxembed.embed`
    python -m jaxembed.evaluate --workdir DIR --images FOLDER [--out metrics.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from jaxembed import data as data_lib
from jaxembed import cli, embed, fileio
from jaxembed.metrics import (concept_groups, map_at_r, max_n_way, mean_average_precision, n_way_one_shot_accuracy,
                              recall_at_k, retrieval_metrics, top1_accuracy)

# The metrics are also reachable here (`evaluate.recall_at_k`, ...), where they were first published;
# `jaxembed.metrics` owns them.
__all__ = ["classification_metrics", "dataset_metrics", "format_table", "main",
           "map_at_r", "mean_average_precision", "n_way_one_shot_accuracy", "recall_at_k", "retrieval_metrics",
           "top1_accuracy"]

# ----------------------------------------------------------------------------- scoring


def classification_metrics(outputs: dict[str, np.ndarray], images, concepts, task) -> dict[str, float]:
    """The task's classification metrics (top-1, mAP; none for ArcFace) on the images whose concepts
    the model was trained on.

    Args:
      outputs: `jaxembed.embed.embed_dataset` outputs with `logits` `(N, len(concepts))` and `index` `(N,)`.
      images: the `LabelledImages` embedded; their concepts are matched to `concepts` by name.
      concepts: the model's concept names (index -> name).
      task: the run's `jaxembed.tasks.Task`.

    Returns:
      `num_classified` and the task's metrics; empty when there are no logits or no image shows only
      known concepts.
    """
    if "logits" not in outputs:
        return {}
    position = {name: i for i, name in enumerate(concepts)}
    rows, targets = [], []
    for row, index in enumerate(outputs["index"]):
        names = [images.concepts[c] for c in images.labels[index]]
        if all(name in position for name in names):
            rows.append(row)
            targets.append([position[name] for name in names])
    if not rows:
        return {}
    return {"num_classified": len(rows), **task.metrics({"logits": outputs["logits"][rows]}, targets)}


def dataset_metrics(outputs: dict[str, np.ndarray], images, concepts, task, **retrieval_options) -> dict[str, float]:
    """`retrieval_metrics` of the embeddings by each image's primary concept, and the task's
    `classification_metrics`: what the trainer reports on its held-out split and
    `python -m jaxembed.evaluate` on any images."""
    labels = np.asarray(images.concepts)[images.primary_labels[outputs["index"]]]
    return {**retrieval_metrics(outputs["embedding"], labels, **retrieval_options),
            **classification_metrics(outputs, images, concepts, task)}


# ----------------------------------------------------------------------------- command line


def format_table(metrics: dict[str, float]) -> str:
    """A two-column plain-text table: integers as integers, rates with 4 decimals."""
    width = max(len("metric"), *(len(name) for name in metrics))
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    for name, value in metrics.items():
        text = str(value) if isinstance(value, int) else f"{value:.4f}"
        lines.append(f"{name:<{width}}  {text:>6}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxembed.evaluate",
        description="Retrieval (Recall@1/5, MAP@R), N-way one-shot and, for classifiers, top-1/mAP metrics "
                    "of embedded images. Concept names like Alphabet/character07 make one-shot episodes "
                    "draw their concepts from one alphabet.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--embeddings",
                        help="an .npz written by `python -m jaxembed.embed` (paths, embeddings, labels)")
    source.add_argument("--workdir", help="a training workdir; embeds --images with its newest checkpoint")
    parser.add_argument("--images", help="with --workdir: a folder of concept sub-folders, a manifest, "
                                         "tfds:NAME[:SPLIT] or 'default'")
    parser.add_argument("--out", help="also write the metrics as JSON to this file ('-': stdout)")
    parser.add_argument("--n_way", type=int, default=20, help="one-shot episode size (default 20; fewer when "
                                                              "no group has that many concepts)")
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=64)
    cli.add_embedding_arguments(parser)
    args = parser.parse_args(argv)
    embedding = cli.embedding_arguments(args)
    if embedding and not args.workdir:
        parser.error(f"--{next(iter(embedding))} needs --workdir (an .npz holds embeddings already made)")
    if args.workdir and not args.images:
        parser.error("--workdir needs --images")
    if args.images and not args.workdir:
        parser.error("--images needs --workdir (or give --embeddings)")
    if args.n_way < 2 or args.episodes < 1:
        parser.error(f"--n_way must be >= 2 and --episodes >= 1 (got {args.n_way}, {args.episodes})")

    try:
        if args.embeddings:
            with np.load(args.embeddings) as saved:
                embeddings, labels = saved["embeddings"], saved["labels"].astype(str)
            metrics = retrieval_metrics(embeddings, labels, n_way=args.n_way, episodes=args.episodes, seed=args.seed)
        else:
            embedder = embed.load(args.workdir, **embedding)
            images = data_lib.load_source(args.images)
            outputs = embed.embed_dataset(embedder.apply_fn, embedder.variables, images, image_size=embedder.image_size,
                                    batch_size=args.batch_size)
            labels = np.asarray(images.concepts)[images.primary_labels[outputs["index"]]]
            metrics = dataset_metrics(outputs, images, embedder.concepts, embedder.task, n_way=args.n_way,
                                      episodes=args.episodes, seed=args.seed)
    except (FileNotFoundError, ValueError, KeyError) as error:
        print(f"jaxembed.evaluate: error: {error}", file=sys.stderr)
        return 1
    if f"one_shot_{args.n_way}way" not in metrics:
        groups = concept_groups(labels)
        print(f"jaxembed.evaluate: note: {max_n_way(labels, groups)} concepts with two or more images at most "
              f"{'share an alphabet (first path component)' if groups is not None else 'in all'}, fewer than "
              f"--n_way {args.n_way}: the one-shot key says the episode size used", file=sys.stderr)
    print(format_table(metrics))
    if args.out:
        text = json.dumps(metrics, indent=2)
        if args.out == "-":
            print(text)
        else:
            fileio.write_bytes(args.out, (text + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
