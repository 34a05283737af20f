"""`python -m jaxembed.evaluate`: retrieval, one-shot and classification metrics of embedded images.

    python -m jaxembed.evaluate --embeddings FILE.npz [--out metrics.json]     # from `python -m jaxembed.embed`
    python -m jaxembed.evaluate --workdir DIR --images FOLDER [--out metrics.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from jaxembed.cli import runner

PROG = "python -m jaxembed.evaluate"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
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
    runner.add_embedding_arguments(parser)
    return parser


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    embedding = runner.embedding_arguments(args)
    if embedding and not args.workdir:
        parser.error(f"--{next(iter(embedding))} needs --workdir (an .npz holds embeddings already made)")
    if args.workdir and not args.images:
        parser.error("--workdir needs --images")
    if args.images and not args.workdir:
        parser.error("--images needs --workdir (or give --embeddings)")
    if args.n_way < 2 or args.episodes < 1:
        parser.error(f"--n_way must be >= 2 and --episodes >= 1 (got {args.n_way}, {args.episodes})")

    def work() -> None:
        from jaxembed import data as data_lib
        from jaxembed import fileio
        from jaxembed.eval.evaluate import dataset_metrics, format_table, retrieval_metrics
        from jaxembed.inference import embed
        from jaxembed.metrics import concept_groups, max_n_way

        if args.embeddings:
            with np.load(args.embeddings) as saved:
                embeddings, labels = saved["embeddings"], saved["labels"].astype(str)
            metrics = retrieval_metrics(embeddings, labels, n_way=args.n_way, episodes=args.episodes, seed=args.seed)
        else:
            embedder = embed.load(args.workdir, **embedding)
            images = data_lib.load_source(args.images)
            outputs = embed.embed_dataset(embedder.apply_fn, embedder.variables, images,
                                          image_size=embedder.image_size, batch_size=args.batch_size)
            labels = np.asarray(images.concepts)[images.primary_labels[outputs["index"]]]
            metrics = dataset_metrics(outputs, images, embedder.concepts, embedder.task, n_way=args.n_way,
                                      episodes=args.episodes, seed=args.seed)
        if f"one_shot_{args.n_way}way" not in metrics:
            groups = concept_groups(labels)
            print(f"{prog}: note: {max_n_way(labels, groups)} concepts with two or more images at most "
                  f"{'share an alphabet (first path component)' if groups is not None else 'in all'}, fewer than "
                  f"--n_way {args.n_way}: the one-shot key says the episode size used", file=sys.stderr)
        print(format_table(metrics))
        if args.out:
            text = json.dumps(metrics, indent=2)
            if args.out == "-":
                print(text)
            else:
                fileio.write_bytes(args.out, (text + "\n").encode())

    return runner.run_tool(prog, work, bad_input=(KeyError,))


if __name__ == "__main__":
    sys.exit(main())
