"""`python -m jaxembed.embed --workdir DIR --images FOLDER --out FILE.npz`: a folder of images embedded into an .npz
(paths, embeddings, labels) by `jaxembed.inference.embed`."""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np

from jaxembed.cli import runner

PROG = "python -m jaxembed.embed"
log = logging.getLogger("jaxembed.embed")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Embed a folder of images.")
    parser.add_argument("--workdir", required=True, help="a training workdir")
    parser.add_argument("--images", required=True, help="a folder of images (concept sub-folders give labels)")
    parser.add_argument("--out", required=True, help="the .npz file to write")
    parser.add_argument("--batch_size", type=int, default=64)
    runner.add_embedding_arguments(parser)
    return parser


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)

    def work() -> None:
        from jaxembed import data as data_lib
        from jaxembed import fileio
        from jaxembed.inference.embed import embed_dataset, load

        embedder = load(args.workdir, **runner.embedding_arguments(args))
        images = data_lib.load_source(args.images)
        outputs = embed_dataset(embedder.apply_fn, embedder.variables, images, image_size=embedder.image_size,
                                batch_size=args.batch_size, progress=True)
        for bad in images.bad_files:
            log.warning("skipped %s: %s", bad.path, bad.reason)
        paths = np.asarray(images.item_names)[outputs["index"]]
        labels = np.asarray(images.concepts)[images.primary_labels[outputs["index"]]]
        with fileio.atomic_file(args.out) as f:  # a crash never leaves half an .npz under the real name
            np.savez(f, paths=paths, embeddings=outputs["embedding"], labels=labels)
        print(f"wrote {len(paths)} embeddings to {args.out}")

    return runner.run_tool(prog, work)


if __name__ == "__main__":
    sys.exit(main())
