"""`python -m jaxembed.whitening --workdir RUN [--images FOLDER] [--dims 64 --shrinkage 1]`: a learned whitening
(`jaxembed.inference.whitening`) fitted on a run's embeddings of labelled images."""

from __future__ import annotations

import argparse
import os
import sys

from jaxembed.cli import runner
from jaxembed.inference import whitening as whitening_lib

PROG = "python -m jaxembed.whitening"
DIMS, SHRINKAGE = whitening_lib.DIMS, whitening_lib.SHRINKAGE


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=whitening_lib.__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a training workdir (its newest checkpoint embeds)")
    parser.add_argument("--images", help="labelled images to fit on, as for jaxembed.train's --data (default: the "
                                         "images the run trained on, its held-out ones left out)")
    parser.add_argument("--out", help="the .npz to write (default: WORKDIR/whitening.npz)")
    parser.add_argument("--dims", type=int, default=DIMS, help=f"dimensions kept (default {DIMS}; chosen on Omniglot)")
    parser.add_argument("--shrinkage", type=float, default=SHRINKAGE,
                        help="added to the within-concept covariance, in units of its mean eigenvalue "
                             f"(default {SHRINKAGE:g})")
    parser.add_argument("--batch_size", type=int, default=64)
    runner.add_embedding_arguments(parser, whitening=False)
    return parser


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.shrinkage < 0:
        parser.error(f"--shrinkage must be >= 0 (got {args.shrinkage:g})")
    out = args.out or os.path.join(args.workdir, "whitening.npz")

    def work() -> None:
        from jaxembed import data as data_lib
        from jaxembed import rundir
        from jaxembed.inference import embed

        embedder = embed.load(args.workdir, **runner.embedding_arguments(args))
        if args.images:
            images = data_lib.load_source(args.images)
        else:
            run = rundir.RunDir(args.workdir)
            images = run.trained_on(run.data())
        # Checked before the forward pass, which takes minutes.
        whitening_lib.check_dims(args.dims, embedder.embedding_dim)
        whitening_lib.check_concepts(images.primary_labels)
        outputs = embed.embed_dataset(embedder.apply_fn, embedder.variables, images, image_size=embedder.image_size,
                                      batch_size=args.batch_size, progress=True)
        concepts = images.primary_labels[outputs["index"]]
        whitening = whitening_lib.fit(
            outputs["embedding"], concepts, dims=args.dims, shrinkage=args.shrinkage, step=embedder.step,
            workdir=os.path.abspath(args.workdir),
            images_source=os.path.abspath(args.images) if args.images else "the run's training images",
            **embed.embedding_of(embedder.config, flip_average=embedder.flip_average))
        whitening_lib.save(whitening, out)
        print(f"wrote {out}: {whitening.fitted_on['images']} images of {whitening.fitted_on['concepts']} concepts, "
              f"{whitening.projection.shape[0]} -> {whitening.fitted_on['dims']} dimensions")

    return runner.run_tool(prog, work)


if __name__ == "__main__":
    sys.exit(main())
