"""AutoML for nvp3d: Optuna hyper-parameter search whose trials are real ``nvp3d train`` runs.

- :mod:`nvp3d.automl.space`: searchable keys, bounds, conditions (also published in the train schema);
- :mod:`nvp3d.automl.schema_meta`: the schema annotations and ``references/skill_info.yaml``;
- :mod:`nvp3d.automl.trial_run`: one rung of one trial = one ``nvp3d train`` subprocess, and its metric;
- :mod:`nvp3d.automl.study`: storage, sampler and pruner per algorithm, crash recovery;
- :mod:`nvp3d.automl.search`: the search loop (rungs, promotion by resume, GPU slots);
- :mod:`nvp3d.automl.report`: leaderboard, best spec, plots;
- :mod:`nvp3d.automl.command`: ``nvp3d automl`` (and ``nvp3d train ... automl_policy=on``).
"""
