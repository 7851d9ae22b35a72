"""The one training loop for every model family, and the run folder it writes.

Modules (imported individually: this package imports nothing, so ``import
flaresam.training.run_folder`` stays light for ``predict`` and ``compare``):

* :mod:`~flaresam.training.config`: :class:`TrainConfig`, what defines a run (saved in run.json);
* :mod:`~flaresam.training.devices`: device choice, torchrun processes, seeding and RNG states;
* :mod:`~flaresam.training.run_folder`: the run folder's files and formats, ``load_run`` and ``find_latest_run``;
* :mod:`~flaresam.training.evaluation`: 2D Dice on validation slices, shared by the trainer and ``compare``;
* :mod:`~flaresam.training.trainer`: the :class:`Trainer` and ``train()``: sampling, schedule, loop, resume, DDP.

Dependencies point one way: trainer -> evaluation, run_folder, devices, config.
"""
