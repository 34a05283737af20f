"""Which embedding should a classifier template give: its pooled features as they are, or centred?

    python experiments/embedding_neck.py --workdir RUN [RUN ...] --images FOLDER [--unseen_against TRAIN_FOLDER]
                                         [--out experiments/results/embedding_neck.json]

RUN is a classifier run trained with `--embedding_neck center`, so its checkpoint holds
the running mean of the pooled features; the same weights then embed FOLDER's images both ways:
`none` (L2-normalised pooled features) and `center` (the running mean subtracted first). The neck
does not change training (the classifier reads the raw features), so one run compares both.
Retrieval among FOLDER's images (leave-one-out Recall@1, MAP@R, 20-way one-shot within an
alphabet) decides, MAP@R first. Writes JSON and a Markdown table (OUT with .md).
"""

from __future__ import annotations

import argparse
import os

import jax
import runner  # experiments/runner.py: this script's folder is on sys.path

RETRIEVAL = {"n_way": 20, "episodes": 1000, "seed": 0}


def neck_rows(workdir: str, images) -> list[dict]:
    import jaxembed
    from jaxembed.inference import embed as embed_lib
    from jaxembed import tasks

    embedder = jaxembed.load(workdir)
    if "feature_mean" not in embedder.variables["batch_stats"]:
        raise ValueError(f"{workdir} was not trained with --embedding_neck center: it has no feature mean")
    rows = []
    for neck in ("none", "center"):
        model = tasks.build_model(embedder.config.replace(embedding_neck=neck), len(embedder.concepts))
        apply_fn = jax.jit(lambda variables, pixels, model=model: model.apply(variables, pixels, train=False))
        outputs = embed_lib.embed_dataset(apply_fn, embedder.variables, images, image_size=embedder.image_size)
        rows.append({"embedding_neck": neck, "workdir": workdir, "template": embedder.config.template.name,
                     **runner.retrieval(outputs["embedding"], runner.concept_names(images, outputs["index"]),
                                        **RETRIEVAL)})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", nargs="+", required=True, help="classifier runs trained with the center neck")
    parser.add_argument("--images", required=True, help="the images to retrieve among (concept folders)")
    parser.add_argument("--unseen_against", default=None,
                        help="keep only the concepts this training folder lacks (Omniglot: omniglot.unseen_concepts)")
    parser.add_argument("--out", default=os.path.join(runner.REPO, "experiments", "results", "embedding_neck.json"))
    args = parser.parse_args(argv)
    from jaxembed import data as data_lib

    images = data_lib.load_source(args.images)
    if args.unseen_against:
        import omniglot

        images = omniglot.unseen_concepts(images, data_lib.load_source(args.unseen_against))
    rows = [row for workdir in args.workdir for row in neck_rows(workdir, images)]
    cells = [[row["template"], row["embedding_neck"], runner.number(row.get("recall@1")),
              runner.number(row.get("map@r")), runner.number(row.get("one_shot_20way"))] for row in rows]
    table = "\n".join([f"Retrieval among {len(images)} images of {len(images.concepts)} concepts ({args.images})", "",
                       *runner.markdown_table(["template", "embedding_neck", "Recall@1", "MAP@R", "20-way one-shot"],
                                              cells), ""])
    runner.write_results(os.path.splitext(args.out)[0], rows, table)
    print(table)


if __name__ == "__main__":
    main()
