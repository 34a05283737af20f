"""A run's fixed parts, built once from the config and the data: split, mesh, task, model, optimiser."""

from __future__ import annotations

import dataclasses
import logging

import jax
import numpy as np
import optax

from jaxembed import data as data_lib
from jaxembed import parallel, schedules, tasks, templates
from jaxembed.train.state import build_optimizer

log = logging.getLogger("jaxembed.train")


@dataclasses.dataclass
class Run:
    """What a run needs besides the state."""

    config: templates.Config
    task: tasks.Task
    data: data_lib.LabelledImages  # all of it; the two splits below index into it
    train_data: data_lib.LabelledImages
    eval_data: data_lib.LabelledImages
    heldout: np.ndarray  # positions of eval_data's images in data
    mesh: jax.sharding.Mesh
    model: object
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    steps_per_epoch: int
    total_steps: int

    @property
    def concepts(self) -> tuple[str, ...]:
        return tuple(self.train_data.concepts)

    @property
    def num_classes(self) -> int:
        """The training classes (the model may have more class-centre columns: padding)."""
        return len(self.concepts)

    @property
    def local_batch_size(self) -> int:
        return parallel.per_process_batch_size(self.config.batch_size, self.mesh)


def split(data: data_lib.LabelledImages, config: templates.Config, task: tasks.Task):
    """`(train, heldout, heldout positions)`: held out by images or by concepts (the task's default)."""
    holdout = config.holdout or task.default_holdout
    fraction = config.holdout_fraction
    if holdout == "images":
        train, heldout = data_lib.split_by_images(data, fraction, config.seed)
    else:
        if round(fraction * data.num_concepts) < 2 <= data.num_concepts - 2:
            # Retrieval among one unseen concept is trivially perfect: hold out at least two.
            fraction = 2 / data.num_concepts
            log.info("holding out 2 of %d concepts (holdout_fraction %.3f) so retrieval is meaningful",
                     data.num_concepts, fraction)
        train, heldout = data_lib.split_by_concepts(data, fraction, config.seed)
    position = {name: i for i, name in enumerate(data.item_names)}
    return train, heldout, np.asarray([position[name] for name in heldout.item_names], np.int64)


def _check(config: templates.Config, task: tasks.Task, data: data_lib.LabelledImages) -> None:
    if data.num_concepts < task.min_concepts:
        raise ValueError(f"{config.template.name} with this loss needs at least {task.min_concepts} concepts; the "
                         f"data ({data.source or 'default'}) has {data.num_concepts}: {list(data.concepts)}")
    if config.model_parallelism > 1 and not task.has_class_centres:
        raise ValueError(f"model_parallelism={config.model_parallelism} shards the ArcFace class centres, "
                         f"which the {config.template.name} template does not have: use model_parallelism=1")
    if config.init_from and config.stem != "imagenet":
        raise ValueError(f"init_from={config.init_from!r}: pretrained weights have the ImageNet stem (a 7x7/2 first "
                         f"convolution), stem={config.stem!r} has another first layer; use stem=imagenet to start "
                         "from them")


def prepare_run(config: templates.Config, data: data_lib.LabelledImages) -> Run:
    """Splits the data, builds mesh, model, optimiser and schedule, and checks they fit together.

    Raises:
      ValueError: naming the setting that does not fit the data or the devices.
    """
    task = tasks.for_config(config)
    _check(config, task, data)
    train_data, eval_data, heldout = split(data, config, task)
    mesh = parallel.make_mesh(model_parallelism=config.model_parallelism)
    local_batch = parallel.per_process_batch_size(config.batch_size, mesh)
    if len(train_data) // jax.process_count() < local_batch:
        raise ValueError(
            f"the training split has {len(train_data)} images, fewer than one batch per process "
            f"(batch_size={config.batch_size} over {jax.process_count()} process(es)); lower batch_size")
    items_per_epoch = config.num_items_per_epoch or len(train_data)
    schedule = schedules.learning_rate_schedule(
        batch_size=config.batch_size, per_item_lrate=config.per_item_lrate, init_epochs=config.init_epochs,
        step_epochs=config.step_epochs, num_epochs=config.num_epochs, items_per_epoch=items_per_epoch,
        decay=config.lr_decay, warmup_epochs=config.warmup_epochs, kind=config.lr_schedule)
    model = tasks.build_model(config, train_data.num_concepts)
    per_epoch = schedules.steps_per_epoch(items_per_epoch, config.batch_size)
    return Run(config=config, task=task, data=data, train_data=train_data, eval_data=eval_data, heldout=heldout,
               mesh=mesh, model=model, tx=build_optimizer(schedule, config), schedule=schedule,
               steps_per_epoch=per_epoch, total_steps=config.num_epochs * per_epoch)
