"""The one type every source produces: images, their concepts, and what could not be used."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np

from jaxembed import fileio
from jaxembed.data.decode import ImageRef


@dataclasses.dataclass(frozen=True)
class BadFile:
    """Something a source named that training will not use, and why.

    `path` is a file path, a folder path (empty concept folder), a manifest line ("m.csv:12") or an
    in-memory item's name ("tfds:mnist:train[7]").
    """

    path: str
    reason: str


@dataclasses.dataclass(frozen=True, repr=False)
class LabelledImages:
    """Images labelled with one or more concepts each.

    Attributes:
      items: per image, a file path (str) or the encoded file's bytes (in-memory sources).
      labels: per image, the indices into `concepts` it shows; never empty. The first index is the
        primary concept (the folder, or the first one a manifest lists), used as the single label.
      concepts: concept names, sorted; position = concept index.
      item_names: per image, a human-readable name: the path, or e.g. "tfds:mnist:train[7]".
      bad_files: what the source named but skipped (unreadable, corrupt, missing, empty folder...),
        with reasons; each was also logged when loading. `summary()` gives it JSON-ready for the run
        summary. Subsets and splits keep the whole source's list (so never add theirs up).
      source: where the data came from: the absolute folder or manifest path, "tfds:NAME:SPLIT" or
        "default".
    """

    items: tuple[ImageRef, ...]
    labels: tuple[tuple[int, ...], ...]
    concepts: tuple[str, ...]
    item_names: tuple[str, ...]
    bad_files: tuple[BadFile, ...] = ()
    source: str = ""

    def __post_init__(self):
        if not len(self.items) == len(self.labels) == len(self.item_names):
            raise ValueError(
                f"items, labels and item_names differ in length: "
                f"{len(self.items)}, {len(self.labels)}, {len(self.item_names)}"
            )
        if list(self.concepts) != sorted(set(self.concepts)):
            raise ValueError("concepts must be unique and sorted")
        flat = np.fromiter(itertools.chain.from_iterable(self.labels), np.int64)
        if (self.labels and min(map(len, self.labels)) == 0) or (
            flat.size and not 0 <= flat.min() <= flat.max() < len(self.concepts)
        ):
            raise ValueError(f"every image needs at least one label, each an index below {len(self.concepts)}")

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:  # the default would print every item, encoded images included
        return (
            f"LabelledImages(source={self.source!r}, images={len(self)}, concepts={self.num_concepts}, "
            f"bad_files={len(self.bad_files)})"
        )

    @property
    def num_concepts(self) -> int:
        return len(self.concepts)

    @property
    def primary_labels(self) -> np.ndarray:
        """int32 `(N,)`: each image's first concept (the single-label target)."""
        return np.fromiter((label[0] for label in self.labels), np.int32, len(self.labels))

    def concept_counts(self) -> np.ndarray:
        """int64 `(num_concepts,)`: how many images show each concept (any position)."""
        counts = np.zeros(self.num_concepts, np.int64)
        for label in self.labels:
            counts[list(label)] += 1
        return counts

    def subset(self, indices: Iterable[int]) -> LabelledImages:
        """The images at `indices` (in that order), with the same concepts and report."""
        picked = [int(i) for i in indices]
        return dataclasses.replace(
            self,
            items=tuple(self.items[i] for i in picked),
            labels=tuple(self.labels[i] for i in picked),
            item_names=tuple(self.item_names[i] for i in picked),
        )

    def with_own_concepts(self) -> LabelledImages:
        """The same images, with `concepts` reduced to those they show (labels re-indexed)."""
        used = sorted({index for label in self.labels for index in label})
        new_index = {old: new for new, old in enumerate(used)}
        return dataclasses.replace(
            self,
            labels=tuple(tuple(new_index[i] for i in label) for label in self.labels),
            concepts=tuple(self.concepts[i] for i in used),
        )

    def summary(self, max_listed: int = 100) -> dict:
        """A JSON-ready description for logs and `summary.json`: sizes and the skipped files."""
        return {
            "source": self.source,
            "num_images": len(self),
            "num_concepts": self.num_concepts,
            "num_bad_files": len(self.bad_files),
            "bad_files": [dataclasses.asdict(bad) for bad in self.bad_files[:max_listed]],
        }


def save_label_map(concepts: Sequence[str], path: str | os.PathLike) -> None:
    """Writes the concept names (index -> name) as JSON `{"concepts": [...]}`, atomically."""
    text = json.dumps({"concepts": list(concepts)}, ensure_ascii=False, indent=1) + "\n"
    fileio.write_bytes(path, text.encode("utf-8"))


def load_label_map(path: str | os.PathLike) -> tuple[str, ...]:
    """Reads what `save_label_map` wrote: the concept names, index -> name."""
    with open(path, encoding="utf-8") as f:
        content = json.load(f)
    concepts = content.get("concepts") if isinstance(content, dict) else None
    if not isinstance(concepts, list) or not all(isinstance(name, str) for name in concepts):
        raise ValueError(f"{path}: expected a JSON object {{\"concepts\": [names...]}}")
    return tuple(concepts)
