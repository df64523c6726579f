"""How many processes a run has and which one this is, from the spec and the launcher's environment.

Three ways to launch a multi-GPU / multi-node run, all honoured:

- ``nvp3d train`` alone (one command per node): Lightning spawns ``devices`` processes per node. The spec
  gives ``train.num_gpus`` (per node) and ``train.num_nodes``; the environment may override them with
  ``NUM_GPU_PER_NODE`` (processes per node) and ``WORLD_SIZE`` (processes in all, so
  ``num_nodes = WORLD_SIZE / NUM_GPU_PER_NODE``); ``NODE_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` say
  which node this is and where rank 0 listens (Lightning reads them).
- ``torchrun`` (``TORCHELASTIC_RUN_ID`` set): every process already exists; ``LOCAL_WORLD_SIZE`` is the
  per-node count and ``WORLD_SIZE / LOCAL_WORLD_SIZE`` the node count.
- SLURM ``srun`` (``SLURM_NTASKS`` set and the job is not named ``bash``/``interactive``): one task per
  GPU; ``SLURM_NTASKS_PER_NODE`` (or ``SLURM_NTASKS / SLURM_NNODES``) per node, ``SLURM_NNODES`` nodes.

A launcher's numbers win over the spec (the processes exist already); each override is reported in
:attr:`LaunchPlan.notes` so the run says what it used.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["LaunchPlan", "global_rank", "is_rank_zero", "launch_plan", "launcher"]


def _int(env: Mapping[str, str], key: str) -> int | None:
    value = env.get(key)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value.split("(")[0])  # SLURM writes e.g. "2(x3)" for uneven task layouts
    except ValueError as exc:
        raise ValueError(f"environment variable {key}={value!r} is not an integer; unset it or fix it") from exc


def launcher(env: Mapping[str, str] | None = None) -> str:
    """``"torchrun"``, ``"slurm"`` or ``"lightning"`` (processes spawned by Lightning itself)."""
    env = os.environ if env is None else env
    if env.get("TORCHELASTIC_RUN_ID") is not None:
        return "torchrun"
    if "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        return "slurm"
    return "lightning"


def global_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's rank over all nodes as the launcher numbers it (0 before any launcher is involved).

    A Lightning-spawned child knows only ``NODE_RANK`` and ``LOCAL_RANK``; since only "is it zero" matters
    to callers (who writes files), they are folded as ``NODE_RANK * 1000 + LOCAL_RANK``.
    """
    env = os.environ if env is None else env
    kind = launcher(env)
    if kind == "torchrun":
        return _int(env, "RANK") or 0
    if kind == "slurm":
        return _int(env, "SLURM_PROCID") or 0
    node, local = _int(env, "NODE_RANK") or 0, _int(env, "LOCAL_RANK") or 0
    return node * 1000 + local


def is_rank_zero(env: Mapping[str, str] | None = None) -> bool:
    """True in the one process that writes results (checkpoints, status.json, experiment.yaml, metrics)."""
    return global_rank(env) == 0


@dataclass(frozen=True)
class LaunchPlan:
    """Processes per node and nodes for the Trainer, and where the numbers came from."""

    devices_per_node: int
    num_nodes: int
    launcher: str
    notes: tuple[str, ...] = field(default=())

    @property
    def world_size(self) -> int:
        return self.devices_per_node * self.num_nodes


def launch_plan(num_gpus: int, num_nodes: int, env: Mapping[str, str] | None = None) -> LaunchPlan:
    """Resolve the spec's per-node process count and node count against the launcher's environment.

    ``num_gpus`` 0 means CPU (one process per node unless the environment says otherwise).
    Raises ValueError (naming the variables) when the environment is inconsistent.
    """
    env = os.environ if env is None else env
    kind = launcher(env)
    spec_devices, spec_nodes = max(1, int(num_gpus)), max(1, int(num_nodes))
    if kind == "torchrun":
        world, local = _int(env, "WORLD_SIZE"), _int(env, "LOCAL_WORLD_SIZE")
        if not world or not local:
            raise ValueError("torchrun launch without WORLD_SIZE/LOCAL_WORLD_SIZE in the environment; "
                             "launch with torchrun --nproc_per_node N --nnodes M")
        devices, nodes = local, _exact_div(world, local, "WORLD_SIZE", "LOCAL_WORLD_SIZE")
    elif kind == "slurm":
        nodes = _int(env, "SLURM_NNODES") or _int(env, "SLURM_JOB_NUM_NODES") or 1
        devices = _int(env, "SLURM_NTASKS_PER_NODE") or _exact_div(
            _int(env, "SLURM_NTASKS") or 1, nodes, "SLURM_NTASKS", "SLURM_NNODES")
    else:
        devices = _int(env, "NUM_GPU_PER_NODE") or spec_devices
        world = _int(env, "WORLD_SIZE")
        nodes = _exact_div(world, devices, "WORLD_SIZE", "NUM_GPU_PER_NODE (or train.num_gpus)") if world else spec_nodes
        node_rank = _int(env, "NODE_RANK") or 0
        if node_rank >= nodes:
            raise ValueError(f"NODE_RANK={node_rank} but the run has {nodes} node(s): set train.num_nodes (or "
                             "WORLD_SIZE = nodes x NUM_GPU_PER_NODE) to the number of nodes")
    if devices < 1 or nodes < 1:
        raise ValueError(f"the launcher environment gives {devices} process(es) per node on {nodes} node(s)")
    notes = []
    if num_gpus > 0 and devices != spec_devices:
        notes.append(f"{kind} launch: {devices} process(es) per node (train.num_gpus={num_gpus} overridden)")
    if nodes != spec_nodes:
        notes.append(f"{kind} launch: {nodes} node(s) (train.num_nodes={num_nodes} overridden)")
    return LaunchPlan(devices, nodes, kind, tuple(notes))


def _exact_div(total: int, part: int, total_name: str, part_name: str) -> int:
    if part <= 0 or total % part:
        raise ValueError(f"{total_name}={total} is not a multiple of {part_name}={part}: every node must run the "
                         "same number of processes")
    return total // part
