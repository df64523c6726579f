"""Data of both stages: the spec's splits as ``datasets3d`` datasets, resumable loaders, training targets.

* :mod:`~nvp3d.data.datamodule` -- ``NVP3DDataModule(spec, stage="2d"|"3d")``.
* :mod:`~nvp3d.data.targets` -- loss targets of both stages from a collated batch.
* :mod:`~nvp3d.data.sampler` -- the deterministic, resumable training sampler and its position callback.
"""
