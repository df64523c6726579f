"""Training of both stages with Lightning: one fit path, the two LightningModules and their machinery.

    from nvp3d.training.fit import train
    train(spec, "runs/a/train", status)   # dataset.enable_3d picks the stage

* :mod:`~nvp3d.training.fit` -- ``train`` (both stages: data, network, resume, report).
* :mod:`~nvp3d.training.module2d`, :mod:`~nvp3d.training.module3d` -- the LightningModules;
  :mod:`~nvp3d.training.eval_hooks` -- their shared validation/test hooks; :mod:`~nvp3d.training.losses`.
* :mod:`~nvp3d.training.trainer` -- the Trainer (devices, precision, loggers, callbacks);
  :mod:`~nvp3d.training.checkpointing` (toolkit file names, atomic saves, latest pointers),
  :mod:`~nvp3d.training.optim`, :mod:`~nvp3d.training.seeding`, :mod:`~nvp3d.training.monitors`,
  :mod:`~nvp3d.training.status_callback`.
"""
