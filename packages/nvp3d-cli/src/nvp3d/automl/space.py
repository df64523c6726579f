"""The AutoML search space of ``nvp3d train``: which spec keys may be searched, in which ranges, with which
conditions, and how a trial samples them with Optuna.

This table is the single source of the AutoML metadata: ``nvp3d schema`` copies it into
``schemas/train.schema.json`` (``automl_default_parameters``, bounds, enums, option weights, math conditions,
dependencies, popular keys), and ``nvp3d automl`` samples from it. A test checks every entry against the
pydantic spec (the key exists; its bounds and options validate), so the two cannot drift apart.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from nvp3d.errors import SpecError

Kind = Literal["float", "int", "categorical", "int_list"]


@dataclass(frozen=True)
class SearchParam:
    """One searchable spec key.

    ``below`` names a key whose value the sampled value must stay under (``warmup_iters < max_steps``; each
    milestone ``< num_epochs``); ``when`` makes the key conditional: it is sampled only while the named key
    holds one of the listed values (``warmup_iters`` only with ``lr_scheduler: WarmupPoly``).
    """

    key: str
    kind: Kind
    low: float | None = None
    high: float | None = None
    log: bool = False
    options: tuple[Any, ...] = ()
    weights: tuple[float, ...] = ()
    below: str | None = None
    when: tuple[str, tuple[Any, ...]] | None = None
    popular: bool = False
    default: bool = False
    length: int = 2  # int_list only: number of elements
    note: str = field(default="", compare=False)

    @property
    def math_cond(self) -> str | None:
        """The numeric condition in words, as the schema publishes it."""
        if self.below is None:
            return None
        if self.kind == "int_list":
            return f"0 < {self.key}[i] < {self.below}, strictly increasing"
        return f"{self.key} < {self.below}"

    @property
    def depends_on(self) -> list[str]:
        """Conditions on other keys, e.g. ``train.optim.lr_scheduler == WarmupPoly``."""
        if self.when is None:
            return []
        key, values = self.when
        return [f"{key} in [{', '.join(str(v) for v in values)}]"]


_MULTISTEP = ("train.optim.lr_scheduler", ("MultiStep",))
_WARMUP = ("train.optim.lr_scheduler", ("WarmupPoly",))

#: Searchable keys in sampling order (a key a condition depends on comes first).
SEARCH_SPACE: tuple[SearchParam, ...] = (
    SearchParam("train.optim.lr", "float", 1e-6, 1e-2, log=True, popular=True, default=True),
    SearchParam("train.optim.weight_decay", "float", 1e-6, 0.3, log=True, popular=True, default=True),
    SearchParam("train.optim.backbone_multiplier", "float", 0.01, 1.0, log=True, default=True),
    SearchParam("train.optim.type", "categorical", options=("AdamW", "SGD"), weights=(0.8, 0.2)),
    SearchParam("train.optim.momentum", "float", 0.5, 0.99, when=("train.optim.type", ("SGD",))),
    SearchParam("train.optim.lr_scheduler", "categorical", options=("MultiStep", "WarmupPoly"),
                weights=(0.6, 0.4), popular=True,
                note="not searched by default: a WarmupPoly run resumed from its final epoch checkpoint with a "
                     "larger num_epochs trains one epoch too few (nvp3d train bug, reported)"),
    SearchParam("train.optim.milestones", "int_list", 0.1, 0.95, below="train.num_epochs", when=_MULTISTEP,
                default=True, note="sampled as fractions of num_epochs, rounded to distinct epochs"),
    SearchParam("train.optim.gamma", "float", 0.01, 0.5, log=True, when=_MULTISTEP, default=True),
    SearchParam("train.optim.warmup_iters", "int", 0, 2000, below="train.optim.max_steps", when=_WARMUP),
    SearchParam("train.optim.warmup_factor", "float", 0.001, 1.0, log=True, when=_WARMUP),
    SearchParam("train.clip_grad_norm", "float", 0.0, 5.0),
    SearchParam("dataset.train.batch_size", "categorical", options=(1, 2, 4, 8), weights=(0.2, 0.4, 0.3, 0.1),
                popular=True),
    SearchParam("model.mask_former.dropout", "float", 0.0, 0.5),
    SearchParam("model.mask_former.no_object_weight", "float", 0.01, 0.5, log=True),
    SearchParam("model.mask_former.class_weight", "float", 0.5, 10.0, log=True),
    SearchParam("model.mask_former.mask_weight", "float", 0.5, 10.0, log=True),
    SearchParam("model.mask_former.dice_weight", "float", 0.5, 10.0, log=True),
)

#: Keys a search must never change: the budget (set per rung), hardware, paths, seeds, data and network identity.
DISABLED_PARAMETERS: tuple[str, ...] = (
    "results_dir", "automl_policy", "train.num_epochs", "train.optim.max_steps", "train.num_gpus", "train.gpu_ids",
    "train.num_nodes", "train.seed", "train.results_dir", "train.resume_training_checkpoint_path",
    "train.checkpoint_2d", "train.checkpoint_3d", "train.precision", "train.is_dry_run", "train.optim.monitor_name",
    "dataset.name", "dataset.enable_3d", "model.preset", "model.sem_seg_head.num_classes",
)

PARAMS: dict[str, SearchParam] = {p.key: p for p in SEARCH_SPACE}
DEFAULT_PARAMETERS: tuple[str, ...] = tuple(p.key for p in SEARCH_SPACE if p.default)
POPULAR_PARAMETERS: tuple[str, ...] = tuple(p.key for p in SEARCH_SPACE if p.popular)


def schema_entry(param: SearchParam) -> dict[str, Any]:
    """The JSON-schema annotations of one searchable key (TAO-style names)."""
    entry: dict[str, Any] = {"automl_enabled": True, "automl_type": param.kind,
                             "automl_default": param.default, "popular": param.popular}
    if param.kind == "categorical":
        entry["valid_options"] = list(param.options)
        entry["option_weights"] = list(param.weights)
    else:
        entry.update(valid_min=param.low, valid_max=param.high, log_scale=param.log)
    if param.kind == "int_list":
        entry["length"] = param.length
    if param.math_cond:
        entry["math_cond"] = param.math_cond
    if param.depends_on:
        entry["depends_on"] = param.depends_on
    if param.note:
        entry["note"] = param.note
    return entry


# ------------------------------------------------------------------------------------------ selection


def _check_known(keys: Sequence[str], what: str) -> None:
    for key in keys:
        if key in DISABLED_PARAMETERS:
            raise SpecError(f"{what}: '{key}' cannot be searched (it is in automl_disabled_parameters); remove it")
        if key not in PARAMS:
            raise SpecError(f"{what}: '{key}' is not a searchable key; choose from {', '.join(PARAMS)}")


def select_parameters(parameters: Sequence[str] | None, add: Sequence[str] = (),
                      remove: Sequence[str] = ()) -> list[SearchParam]:
    """The searched keys: ``parameters`` (default: the default set) plus ``add`` minus ``remove``, in
    sampling order; a key that is unknown or disabled is a SpecError naming it."""
    base = list(DEFAULT_PARAMETERS if parameters is None else parameters)
    _check_known(base, "automl.parameters")
    _check_known(add, "automl.add_parameters")
    _check_known(remove, "automl.remove_parameters")
    chosen = (set(base) | set(add)) - set(remove)
    if not chosen:
        raise SpecError("automl.parameters: no key left to search; list at least one (e.g. train.optim.lr)")
    return [p for p in SEARCH_SPACE if p.key in chosen]


def apply_ranges(params: Sequence[SearchParam], ranges: Mapping[str, Any]) -> list[SearchParam]:
    """Narrow the searched keys by ``automl.ranges`` (pydantic RangeOverride objects); SpecError when a
    range leaves the key's valid bounds or options."""
    from dataclasses import replace

    by_key = {p.key: p for p in params}
    for key in ranges:
        if key not in by_key:
            raise SpecError(f"automl.ranges.{key}: not a searched key; add it to automl.parameters or drop the range")
    out = []
    for param in params:
        override = ranges.get(param.key)
        if override is None:
            out.append(param)
            continue
        where = f"automl.ranges.{param.key}"
        if param.kind == "categorical":
            options = tuple(override.options) if override.options is not None else param.options
            bad = [o for o in options if o not in param.options]
            if bad or not options:
                raise SpecError(f"{where}.options: {bad or options} not allowed; pick from {list(param.options)}")
            weights = tuple(param.weights[param.options.index(o)] for o in options)
            out.append(replace(param, options=options, weights=weights))
            continue
        low = param.low if override.min is None else override.min
        high = param.high if override.max is None else override.max
        log = param.log if override.log is None else override.log
        if low < param.low or high > param.high or low > high:
            raise SpecError(f"{where}: [{low}, {high}] must lie inside the valid range [{param.low}, {param.high}]")
        if log and low <= 0:
            raise SpecError(f"{where}: a log-scale range needs min > 0 (got {low}); raise min or set log: false")
        out.append(replace(param, low=low, high=high, log=log))
    return out


# ------------------------------------------------------------------------------------------- sampling


def _lookup(values: Mapping[str, Any], base: Mapping[str, Any], key: str) -> Any:
    if key in values:
        return values[key]
    node: Any = base
    for part in key.split("."):
        node = node[part]
    return node


def _weighted_choice(u: float, options: Sequence[Any], weights: Sequence[float]) -> Any:
    """Map u in [0, 1) onto an option with probability proportional to its weight."""
    total = float(sum(weights))
    edges = list(itertools.accumulate(w / total for w in weights))
    return options[min(bisect.bisect_right(edges, u), len(options) - 1)]


def sample(trial: Any, params: Sequence[SearchParam], base: Mapping[str, Any], budget: int) -> dict[str, Any]:
    """Spec values of one trial, keyed by dotted key (conditional keys only when their condition holds).

    ``trial`` is an ``optuna.Trial``; ``base`` the base spec as a dict; ``budget`` the top-rung epochs, which
    stands in for ``train.num_epochs`` in conditions. Weighted enums are sampled through a uniform number
    mapped by cumulative weight, so random samplers honour the weights and TPE still models them.
    """
    values: dict[str, Any] = {}
    context = {"train.num_epochs": budget}
    for param in params:
        if param.when is not None:
            key, allowed = param.when
            if _lookup(values, base, key) not in allowed:
                continue
        if param.kind == "categorical":
            u = trial.suggest_float(f"{param.key}~u", 0.0, 1.0)
            values[param.key] = _weighted_choice(u, param.options, param.weights)
        elif param.kind == "float":
            values[param.key] = trial.suggest_float(param.key, param.low, param.high, log=param.log)
        elif param.kind == "int":
            high = int(param.high)
            if param.below is not None:
                high = min(high, int(context.get(param.below, _lookup(values, base, param.below))) - 1)
            values[param.key] = trial.suggest_int(param.key, int(param.low), max(int(param.low), high),
                                                  log=param.log)
        else:  # int_list: sorted distinct integers in (0, limit)
            limit = int(context.get(param.below, _lookup(values, base, param.below))) if param.below else budget
            fractions = sorted(trial.suggest_float(f"{param.key}[{i}]", param.low, param.high)
                               for i in range(param.length))
            values[param.key] = sorted({min(limit - 1, max(1, round(f * limit))) for f in fractions}) \
                if limit > 1 else []
    return values


def default_params(params: Sequence[SearchParam], base: Mapping[str, Any], budget: int) -> dict[str, Any]:
    """Optuna parameters that reproduce the base spec's own values of the searched keys (clipped into the
    search ranges), so the unchanged spec can run as a trial of the study: the baseline the search must beat."""
    fixed: dict[str, Any] = {}
    for param in params:
        if param.when is not None:
            key, allowed = param.when
            if _lookup({}, base, key) not in allowed:
                continue
        value = _lookup({}, base, param.key)
        if param.kind == "categorical":
            if value not in param.options:
                continue
            total = float(sum(param.weights))
            index = param.options.index(value)
            before = sum(param.weights[:index]) / total
            fixed[f"{param.key}~u"] = before + param.weights[index] / total / 2
        elif param.kind == "int_list":
            fractions = [m / budget for m in value] or [param.low]
            fractions = (fractions * param.length)[:param.length]
            for i, f in enumerate(sorted(fractions)):
                fixed[f"{param.key}[{i}]"] = min(param.high, max(param.low, f))
        else:
            fixed[param.key] = min(param.high, max(param.low, value))
            if param.kind == "int":
                fixed[param.key] = int(fixed[param.key])
    return fixed
