"""Omniglot: train on background_small1 (136 concepts), measure retrieval on background_small2's unseen ones.

    python experiments/omniglot.py [--templates inception_bn ...] [--image_size 80] [--num_epochs 5]
                                   [--rotations 4] [--mirror | --no-mirror] [--stem imagenet]
                                   [--embedding_layer inception_4c] [--embedding_pooling gem]
                                   [--trainer_flags='--crop pad --crop_padding 6']   # any trainer flags

Both zips come from ../shared/datasets/omniglot (never copied into the repository). The two splits are
not disjoint: Greek and Latin (50 characters, 1,000 drawings) are in both, byte for byte. The test set
is therefore background_small2 without the concepts background_small1 has (`unseen_concepts`): 106
concepts of Japanese (katakana), Sanskrit and Tagalog, 2,120 drawings. Each template is trained with
the command printed in the table; its embeddings of those give Recall@1/@5, MAP@R and 20-way one-shot
accuracy within an alphabet (1,000 episodes; katakana and Sanskrit have 20 or more characters). A
raw-pixel nearest-neighbour baseline at the same image size is in the same table.
With `--rotations 4` the training folder also holds every character turned by 90, 180 and 270 degrees,
each as a concept of its own (`Korean/character01_r90`): four times the concepts (544), as few-shot
work on Omniglot commonly does; a turned character is another shape, so it is a new concept, not an
augmentation of the old one. `--mirror` adds each of those mirrored left-right as a concept too
(`character01_m`, `character01_m_r90`, ...: 1,088 concepts with 4 rotations), for the same reason: the
mirror image of a glyph is another glyph. `--rotations 8` adds the 45-degree turns between those
(resampled; 2,176 concepts with mirrors). Classifier rows embed with a block chosen on an alphabet left
out of training (`EMBEDDING`, experiments/omniglot_embeddings.py); `--embedding_layer ''` embeds with the
last block's average, as rows from before did.
Writes experiments/results/omniglot.json and .md. Rows of templates not run now are kept from the
previous results, so `--templates resnext` adds or refreshes one row. Each row also holds the trainer's
held-out metrics (a 5% split of the training folder: images for the classifiers, concepts for ArcFace),
the only numbers to choose settings by, and the trainer's median images/s.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import sys
import tempfile
import zipfile

import runner  # experiments/runner.py: this script's folder is on sys.path
from jaxembed.models import POOLINGS, STEMS

SHARED = os.path.join(runner.REPO, "..", "shared", "datasets", "omniglot")
# Leave-one-out retrieval and 20-way one-shot episodes within an alphabet, the same for every row.
RETRIEVAL = {"n_way": 20, "episodes": 1000, "seed": 0}

# Per-template settings for a 2-core CPU; the --flag values a user can copy. Characters: no flips (a
# mirrored glyph is another concept), 0.1 per 128 images with a short warmup and cosine decay, Nesterov.
# No label smoothing: it makes the penultimate features of a classifier transfer worse to new classes
# (Kornblith et al., 2021). The stem here, the 3x3 stride-2 one of the first rows, is what row labels and
# names take as given (RECIPE_STEM); every row's stem is the script's --stem (default imagenet), which
# follows it in the command and so overrides it.
RECIPE = ["--stem", "small_s2", "--warmup_epochs", "0.3", "--lr_schedule", "cosine", "--nesterov",
          "--per_item_lrate", "0.0008"]
RECIPE_STEM = RECIPE[RECIPE.index("--stem") + 1]
SETTINGS = {
    "inception_bn": ["--logreg", "0", *RECIPE],
    "resnet_angular_margin": ["--arch", "resnet50", "--angular_scale", "32", "--angular_margin", "0.3",
                              "--embeddings_size", "128", *RECIPE],
    "resnext": ["--arch", "resnext50_32x4d", "--logreg", "0", *RECIPE],
}


def extract(split: str, root: str, zips: str = SHARED) -> str:
    """`root/split`: the folder of `zips/split.zip`, extracted there unless it already is."""
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        with zipfile.ZipFile(os.path.join(zips, f"{split}.zip")) as archive:
            archive.extractall(root)
    return folder


ROTATIONS = (1, 2, 4, 8)


def copies_folder(folder: str, rotations: int, mirror: bool = False) -> str:
    """Where `with_glyph_copies` writes `folder` with its turned (and mirrored) copies; `folder` itself for
    1 rotation without mirrors."""
    suffix = (f"_rot{rotations}" if rotations > 1 else "") + ("_mirror" if mirror else "")
    return folder + suffix


def with_glyph_copies(folder: str, rotations: int, mirror: bool = False) -> str:
    """`folder` (concept folders `Alphabet/characterNN/`) plus each character turned by every multiple of
    360/`rotations` degrees as a new concept `Alphabet/characterNN_r<degrees>`, and with `mirror` each of
    those also mirrored left-right first (`characterNN_m`, `characterNN_m_r<degrees>`): a mirrored glyph
    is another character, as a turned one is. Quarter turns and mirrors move pixels exactly; the 45-degree
    turns of 8 rotations are resampled (bilinear, white fill; a glyph's corners may leave the square).
    Written once next to `folder` (`copies_folder`); `folder` itself for 1 rotation without mirrors."""
    from PIL import Image

    if rotations not in ROTATIONS:
        raise ValueError(f"rotations={rotations}: expected 1, 2, 4 or 8 (turns by multiples of 360/rotations degrees)")
    target = copies_folder(folder, rotations, mirror)
    if target == folder:
        return folder
    marker = os.path.join(target, ".complete")
    if os.path.exists(marker):
        return target
    shutil.rmtree(target, ignore_errors=True)
    for alphabet in sorted(os.listdir(folder)):
        for character in sorted(os.listdir(os.path.join(folder, alphabet))):
            source = os.path.join(folder, alphabet, character)
            for mirrored in ((False, True) if mirror else (False,)):
                for degrees in range(0, 360, 360 // rotations):
                    name = character + ("_m" if mirrored else "") + (f"_r{degrees}" if degrees else "")
                    os.makedirs(os.path.join(target, alphabet, name))
                    for drawing in sorted(os.listdir(source)):
                        with Image.open(os.path.join(source, drawing)) as image:
                            # Exact pixel moves (transposes, no resampling); turns counter-clockwise.
                            copy = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirrored else image
                            if degrees % 90:  # counter-clockwise, like the transposes
                                copy = copy.convert("L").rotate(degrees, Image.Resampling.BILINEAR, fillcolor=255)
                            elif degrees:
                                copy = copy.transpose(Image.Transpose[f"ROTATE_{degrees}"])
                            copy.save(os.path.join(target, alphabet, name, drawing))
    with open(marker, "w") as f:
        f.write("done\n")
    return target


def splits(workdir: str, zips: str = SHARED):
    """`(training folder, test images)`: background_small1 extracted into `workdir`, and the images of
    background_small2 (extracted beside it) whose concepts it lacks (`unseen_concepts`), logged."""
    from jaxembed import data as data_lib

    train_folder = extract("images_background_small1", workdir, zips)
    all_test_images = data_lib.load_source(extract("images_background_small2", workdir, zips))
    test_images = unseen_concepts(all_test_images, data_lib.load_source(train_folder))
    print(f"test set: {len(test_images)} images of {len(test_images.concepts)} concepts; left out "
          f"{len(all_test_images) - len(test_images)} images of concepts also in the training split",
          file=sys.stderr, flush=True)
    return train_folder, test_images


def unseen_concepts(test_images, train_images):
    """The images of `test_images` whose concepts `train_images` lacks, with their own concept list."""
    seen = set(train_images.concepts)
    keep = [i for i, labels in enumerate(test_images.labels)
            if not any(test_images.concepts[c] in seen for c in labels)]
    return test_images.subset(keep).with_own_concepts()


def one_shot(embeddings, names, *, episodes: int, seed: int) -> float:
    """The table's one-shot accuracy (RETRIEVAL's n_way, within an alphabet) over another draw of
    `episodes` episodes: for measuring the evaluation's noise, or with it nearly gone."""
    from jaxembed import metrics

    return metrics.n_way_one_shot_accuracy(embeddings, names, metrics.concept_groups(names),
                                           n_way=RETRIEVAL["n_way"], episodes=episodes, seed=seed)


def baseline_row(images, image_size: int) -> dict:
    """Nearest neighbours on centred, L2-normalised grey pixels after the same eval preprocessing."""
    return {"method": f"raw pixels, {image_size} px", "command": "-", "train_minutes": 0.0,
            **runner.raw_pixel_baseline(runner.eval_pixels(images, image_size), runner.concept_names(images),
                                        **RETRIEVAL)}


# The script's arguments a row's command depends on, kept in the row (`script_args`) to rebuild it.
SCRIPT_ARGS = ("image_size", "num_epochs", "batch_size", "stem", "rotations", "mirror", "rotation_degrees",
               "shear_degrees", "embedding_layer", "embedding_pooling", "trainer_flags")
# The classifier's embedding for characters it never saw: chosen on an alphabet left out of training
# (experiments/omniglot_embeddings.py), not on the test set. Rows from before it lack the two script args.
EMBEDDING = {"embedding_layer": "inception_4c", "embedding_pooling": "gem"}


def train_flags(name: str, args, train_folder: str) -> list[str]:
    """The `python -m jaxembed.train` flags of a template's row (without --workdir)."""
    return runner.merged_flags(["--template", name, "--data", train_folder, "--image_size", str(args.image_size),
                                "--batch_size", str(args.batch_size), "--num_epochs", str(args.num_epochs),
                                "--min_crop_area", "0.6", "--holdout_fraction", "0.05", "--no_progress"],
                               SETTINGS[name], ["--stem", args.stem], distortion_flags(args),
                               embedding_flags(name, args), shlex.split(args.trainer_flags))


def distortion_flags(args) -> list[str]:
    """The trainer's random rotation and shear flags of a row; none when both are 0 (rows from before)."""
    return [flag for key in ("rotation_degrees", "shear_degrees") if getattr(args, key)
            for flag in (f"--{key}", f"{getattr(args, key):g}")]


def embedding_flags(name: str, args) -> list[str]:
    """The trainer's embedding flags of a classifier row; none without `embedding_layer` (the last pooled
    features, as rows from before had) or for ArcFace, which embeds with its own head."""
    from jaxembed import templates

    layer = getattr(args, "embedding_layer", None)
    if not layer or templates.get(name).head == "arcface":
        return []
    return ["--embedding_layer", layer, "--embedding_pooling", args.embedding_pooling]


def flags_label(flags: str) -> str:
    """A workdir or results-file suffix naming extra flags: "--seed 1" -> "_seed_1"; "" for none."""
    return "_" + re.sub(r"[^A-Za-z0-9.]+", "_", flags).strip("_") if flags else ""


def trained_row(name: str, args, train_folder: str, test_images) -> dict:
    """Trains a template from scratch and scores its embeddings of the unseen concepts."""
    other_stem = args.stem != RECIPE_STEM
    distorted = args.rotation_degrees or args.shear_degrees
    label = (f"{name}_{args.image_size}px{f'_{args.stem}' if other_stem else ''}_{args.num_epochs}ep_rot{args.rotations}"
             f"{'_mirror' if args.mirror else ''}"
             f"{f'_affine{args.rotation_degrees:g}-{args.shear_degrees:g}' if distorted else ''}"
             f"{f'_{args.embedding_layer}_{args.embedding_pooling}' if embedding_flags(name, args) else ''}"
             f"{flags_label(args.trainer_flags)}")
    run = runner.train(train_flags(name, args, train_folder), os.path.join(args.workdir, f"run_{label}"))
    embedder, outputs = runner.embed(run.workdir, test_images)
    turns = f", {args.rotations} rotations as concepts" if args.rotations > 1 else ""
    turns += ", mirrored copies as concepts" if args.mirror else ""
    stem = f", {args.stem} stem" if other_stem else ""
    affine = (f", random rotation +-{args.rotation_degrees:g} deg and shear +-{args.shear_degrees:g} deg"
              if distorted else "")
    embedding = (f", {args.embedding_pooling} of {args.embedding_layer} as the embedding"
                 if embedding_flags(name, args) else "")
    more = f", {args.trainer_flags}" if args.trainer_flags else ""
    method = f"{name} ({embedder.config.arch}), {args.image_size} px{stem}, {args.num_epochs} epochs{turns}{affine}{embedding}{more}"
    return {"method": method, "train_minutes": run.seconds / 60,
            "images_per_second": run.images_per_second(), "holdout": run.holdout(), "command": run.command,
            "script_args": {key: getattr(args, key) for key in SCRIPT_ARGS},
            **runner.loss_curve_record(run, f"omniglot_{label}"),
            **runner.retrieval(outputs["embedding"], runner.concept_names(test_images, outputs["index"]), **RETRIEVAL)}


def parser() -> argparse.ArgumentParser:
    """The script's arguments (its defaults are the default row's settings)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Defaults: the best row within the 30 minutes (inception_bn trains ~2.7x faster than resnext50 at 48 px).
    parser.add_argument("--templates", nargs="*", choices=list(SETTINGS), default=["inception_bn"])
    parser.add_argument("--image_size", type=int, default=80)
    parser.add_argument("--num_epochs", type=int, default=5)
    parser.add_argument("--rotations", type=int, default=4, choices=ROTATIONS,
                        help="train on each character turned this many ways, each turn a concept of its own")
    parser.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=True,
                        help="also train on each character (and each turn) mirrored left-right, as a concept of its own")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--rotation_degrees", type=float, default=0.0,
                        help="the trainer's random rotation of each training image, up to this many degrees either way")
    parser.add_argument("--shear_degrees", type=float, default=0.0,
                        help="the trainer's random horizontal shear, up to this many degrees either way")
    parser.add_argument("--stem", default="imagenet", choices=STEMS,
                        help="the backbone stem (imagenet: 4x cheaper than small_s2, so 4x the epochs per minute)")
    parser.add_argument("--embedding_layer", default=EMBEDDING["embedding_layer"],
                        help="classifier rows: the block whose pooled output is the embedding ('': the last "
                             "pooled features); chosen by experiments/omniglot_embeddings.py")
    parser.add_argument("--embedding_pooling", default=EMBEDDING["embedding_pooling"], choices=POOLINGS)
    parser.add_argument("--trainer_flags", default="",
                        help="more `python -m jaxembed.train` flags for the rows, overriding the script's, in one "
                             "argument: --trainer_flags='--crop pad --crop_padding 6'")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "jaxembed-omniglot"))
    parser.add_argument("--out", default=os.path.join(runner.REPO, "experiments", "results", "omniglot.json"))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)

    original_train_folder, test_images = splits(args.workdir)
    train_folder = with_glyph_copies(original_train_folder, args.rotations, args.mirror)
    rows = {row["method"]: row for row in runner.previous_rows(args.out)}
    baseline = baseline_row(test_images, args.image_size)
    rows[baseline["method"]] = baseline
    for name in args.templates:
        row = trained_row(name, args, train_folder, test_images)
        rows[row["method"]] = row
        print(f"{row['method']}: {row['train_minutes']:.1f} min, recall@1 {row['recall@1']:.3f}", file=sys.stderr,
              flush=True)

    ordered = sorted(rows.values(), key=lambda row: (row["command"] != "-", row["method"]))  # baselines first
    table = markdown(ordered)
    runner.write_results(os.path.splitext(args.out)[0], ordered, table)
    print(table)


def markdown(rows: list[dict]) -> str:
    number = runner.number
    cells = []
    for row in rows:
        holdout = row.get("holdout", {})
        held = "; ".join(f"{name} {holdout[name]:.3f}" for name in ("top1", "mAP", "recall@1", "map@r")
                         if name in holdout) or "-"
        cells.append([row["method"], f"{row['recall@1']:.3f}", f"{row['recall@5']:.3f}", f"{row['map@r']:.3f}",
                      number(row.get("one_shot_20way")), held, f"{row['train_minutes']:.1f} min",
                      number(row.get("images_per_second"), 0), runner.loss_curve_cell(row)])
    table = runner.markdown_table(["method", "Recall@1", "Recall@5", "MAP@R", "20-way one-shot",
                                   "holdout (background_small1)", "train time", "images/s",
                                   "largest step loss / window mean"], cells)
    commands = [f"- {row['method']}: `{row['command']}`" for row in rows if row["command"] != "-"]
    caption = ("Omniglot background_small2 without the concepts background_small1 also has (Greek, Latin): "
               "106 concepts, 2,120 images, none trained on; holdout: the trainer's metrics on 5% of "
               "background_small1.")
    return "\n".join([caption, "", *table, "", *commands, ""])


if __name__ == "__main__":
    main()
