"""Embedding a data set and scoring it (`jaxembed.metrics`); the command is `python -m jaxembed.evaluate`.

    python -m jaxembed.evaluate --embeddings FILE.npz [--out metrics.json]     # from `python -m jaxembed.embed`
    python -m jaxembed.evaluate --workdir DIR --images FOLDER [--out metrics.json]
"""

from __future__ import annotations

import numpy as np

from jaxembed.metrics import (map_at_r, mean_average_precision, n_way_one_shot_accuracy,
                              recall_at_k, retrieval_metrics, top1_accuracy)

# The metrics are also reachable here (`evaluate.recall_at_k`, ...), where they were first published;
# `jaxembed.metrics` owns them.
__all__ = ["classification_metrics", "dataset_metrics", "format_table",
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
