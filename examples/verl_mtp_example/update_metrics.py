"""Every mini-batch update's MTP metrics of a trainer run, kept before verl averages them over the step.

verl 0.9.1's ``RayPPOTrainer.fit`` hands the lists that ``RayPPOTrainer._update_actor`` returns (one value per
mini-batch update; the ``occ_grad_*`` metrics one per diagnosed update) to ``reduce_metrics``, which replaces
each list by its mean before any logger sees it. The regime study compares the proxy's lambda with the exact
one update by update, so it needs the lists themselves.

With ``VERL_MTP_EXAMPLE_UPDATE_METRICS=<file>`` set and this module in ``VERL_USE_EXTERNAL_MODULES`` (the
launcher's ``--record-updates`` sets both for the trainer and, through it, every Ray process), the process that
runs the trainer appends one line per step to that file, in verl's file-logger format:
``{"step": N, "data": {"actor/mtp_1/occ_grad_c": [value per diagnosed update], ...}}``, for every
``actor/mtp_*`` metric that arrives as a list. It reads host lists the actor worker has already returned:
nothing runs inside the training step.
"""

from __future__ import annotations

import json
import os

UPDATE_METRICS_FILE = "VERL_MTP_EXAMPLE_UPDATE_METRICS"
MODULE = __name__
PREFIX = "actor/mtp_"


def per_update_values(metrics: dict) -> dict[str, list[float]]:
    """The ``actor/mtp_*`` metrics that still hold one value per update, as lists of floats."""
    return {key: [float(v) for v in value] for key, value in metrics.items()
            if key.startswith(PREFIX) and isinstance(value, (list, tuple))}


def record_updates_of(trainer_class, path: str) -> None:
    """Wrap ``trainer_class._update_actor`` so that each call appends its per-update lists to ``path``."""
    original = trainer_class._update_actor
    if getattr(original, "records_updates_to", None) == path:
        return

    def _update_actor(self, batch):
        output = original(self, batch)
        values = per_update_values(output.meta_info["metrics"])
        if values:
            with open(path, "a") as f:
                f.write(json.dumps({"step": self.global_steps, "data": values}) + "\n")
        return output

    _update_actor.records_updates_to = path
    trainer_class._update_actor = _update_actor


if os.environ.get(UPDATE_METRICS_FILE):
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    record_updates_of(RayPPOTrainer, os.environ[UPDATE_METRICS_FILE])
