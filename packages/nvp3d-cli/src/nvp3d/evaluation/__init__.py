"""Evaluation of both stages: ``nvp3d evaluate`` and the metric adaptors.

* :mod:`~nvp3d.evaluation.evaluate` -- ``evaluate(spec, results_dir, status)`` (2D PQ or 3D PRQ by the spec).
* :mod:`~nvp3d.evaluation.pq2d` -- 2D panoptic quality KPIs and tables (``maskformer_head`` metric).
* :mod:`~nvp3d.evaluation.prq3d` -- PRQ/RSQ/RRQ per frame and summed (``frustum3d.metrics``).
"""
