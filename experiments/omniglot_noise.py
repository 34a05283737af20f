"""How much of a difference between two Omniglot rows is noise: the episodes' draw against the training's.

    python experiments/omniglot_noise.py RUN_DIR [RUN_DIR ...] [--episode_seeds 10] [--episodes 20000]

Scores finished `experiments/omniglot.py` runs (their workdirs, `run_*` under /tmp/jaxembed-omniglot)
again on the same unseen concepts, without training: each run's 20-way one-shot accuracy with the table's
1,000 episodes under `--episode_seeds` other episode draws (their spread is the evaluation's noise), and
over `--episodes` episodes (the run's accuracy with that noise all but gone). Given runs of one command
with different `--seed`s, the spread of their accuracies is the training's noise, which a setting must
beat before a single-run difference means anything. Writes experiments/results/omniglot_noise.json and
.md (runs scored before and not named now are kept).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import omniglot  # experiments/omniglot.py: this script's folder is on sys.path
import runner

TABLE_EPISODES = omniglot.RETRIEVAL["episodes"]


def scored_run(workdir: str, test_images, *, episode_seeds: int, episodes: int) -> dict:
    """One run's one-shot accuracy over `episode_seeds` draws of the table's episodes, and over `episodes`."""
    _, outputs = runner.embed(workdir, test_images)
    names = runner.concept_names(test_images, outputs["index"])

    def one_shot(count: int, seed: int) -> float:
        return omniglot.one_shot(outputs["embedding"], names, episodes=count, seed=seed)

    draws = [one_shot(TABLE_EPISODES, seed) for seed in range(episode_seeds)]  # seed 0: the table's draw
    return {"run": os.path.basename(os.path.normpath(workdir)), "config": run_config(workdir),
            "one_shot_table_episodes": draws[0], "episode_draws": draws,
            "episode_draw_sd": statistics.stdev(draws) if len(draws) > 1 else None,
            "episodes": episodes, "one_shot": one_shot(episodes, seed=episode_seeds)}


def run_config(workdir: str) -> dict:
    """The run's whole trainer config as `RunDir.config` reads it: an option newer than the run (a key
    its run.json lacks) has its default, which is what the run trained with."""
    from jaxembed import rundir

    config = rundir.RunDir(workdir).config()
    return {"template": config.template.name, **config}


def seed_groups(rows: list[dict]) -> list[dict]:
    """Runs whose trainer configs differ only in `seed`, two or more: the spread of their accuracies."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        key = repr(sorted((k, v) for k, v in row["config"].items() if k != "seed"))
        groups.setdefault(key, []).append(row)
    summaries = []
    for members in groups.values():
        if len(members) < 2:
            continue
        accuracies = [row["one_shot"] for row in members]
        summaries.append({"runs": [row["run"] for row in members], "seeds": [row["config"]["seed"] for row in members],
                          "mean": statistics.mean(accuracies), "sd": statistics.stdev(accuracies)})
    return summaries


def markdown(rows: list[dict]) -> str:
    number = runner.number
    cells = [[row["run"], row["config"]["seed"], number(row["one_shot_table_episodes"]),
              number(row["episode_draw_sd"], 4), f"{row['one_shot']:.3f}"] for row in rows]
    episodes = rows[0]["episodes"] if rows else 0
    draws = len(rows[0]["episode_draws"]) if rows else 0
    table = runner.markdown_table(
        ["run (workdir of experiments/omniglot.py)", "seed", f"one-shot, the table's {TABLE_EPISODES:,} episodes",
         f"sd over {draws} draws of {TABLE_EPISODES:,} episodes", f"one-shot, {episodes:,} episodes"], cells)
    seeds = [f"- {', '.join(g['runs'])} (seeds {', '.join(map(str, g['seeds']))}): one-shot mean {g['mean']:.3f}, "
             f"sd {g['sd']:.3f} over {episodes:,} episodes each" for g in seed_groups(rows)]
    caption = ("20-way one-shot accuracy of finished Omniglot runs on the unseen concepts of omniglot.md, scored again "
               "(`experiments/omniglot_noise.py`). The sd column is the evaluation's noise; runs of one command "
               "with other seeds show the training's:")
    return "\n".join([caption, "", *table, "", *(seeds or ["- (no runs of one command with two seeds)"]), ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", help="finished runs of experiments/omniglot.py")
    parser.add_argument("--episode_seeds", type=int, default=10, help="draws of the table's episodes per run")
    parser.add_argument("--episodes", type=int, default=20_000, help="episodes of the low-noise accuracy")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "jaxembed-omniglot"),
                        help="where omniglot.py extracted the zips")
    parser.add_argument("--out", default=os.path.join(runner.RESULTS, "omniglot_noise"))
    args = parser.parse_args(argv)
    if args.episode_seeds < 1 or args.episodes < 1:
        parser.error("--episode_seeds and --episodes must be >= 1")
    runner.refuse_unfinished(parser, args.workdirs)

    _, test_images = omniglot.splits(args.workdir)
    rows = {row["run"]: row for row in runner.previous_rows(args.out + ".json")}
    for workdir in args.workdirs:
        row = scored_run(workdir, test_images, episode_seeds=args.episode_seeds, episodes=args.episodes)
        rows[row["run"]] = row
        print(f"{row['run']}: one-shot {row['one_shot']:.4f} over {args.episodes:,} episodes; draws of "
              f"{TABLE_EPISODES:,}: sd {runner.number(row['episode_draw_sd'], 4)}", file=sys.stderr, flush=True)
    ordered = sorted(rows.values(), key=lambda row: row["run"])
    runner.write_results(args.out, ordered, markdown(ordered))
    print(markdown(ordered))
    return 0


if __name__ == "__main__":
    sys.exit(main())
