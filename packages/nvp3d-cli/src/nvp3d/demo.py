"""``nvp3d demo``: the whole pipeline on built-in synthetic data, runnable on a CPU-only machine.

Steps: generate a small synthetic dataset (``datasets3d.synth``) under ``<out>/data``, write a spec for it
(``<out>/experiment.yaml``), then run the registered ``train``, ``evaluate`` and ``inference`` actions in
turn, each in ``<out>/<action>`` with its own status.json. The demo's own ``<out>/status.json`` records the
overall outcome. Parts that do not exist yet stop the demo with NotBuiltYetError (exit code 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nvp3d.config import ExperimentSpec, dump_spec
from nvp3d.errors import NotBuiltYetError
from nvp3d.runner import EXPERIMENT_FILENAME, execute, prepare_results_dir
from nvp3d.status import STATUS_FILENAME, StatusLogger, status_run
from nvp3d.synthetic import generate_synthetic, synthetic_spec

#: Actions the demo runs after generating data, in order.
DEMO_STAGES = ("train", "evaluate", "inference")


@dataclass(frozen=True)
class DemoOptions:
    """Size of the generated demo dataset (small so that the demo runs in minutes on a CPU)."""

    out_dir: Path
    scenes: int = 2
    frames_per_scene: int = 2
    grid: int = 256
    image_size: tuple[int, int] = (320, 240)
    seed: int = 0
    num_gpus: int | None = None  # None = 1 when CUDA is available, else 0 (CPU)


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return bool(torch.cuda.is_available())


def demo_spec(options: DemoOptions, voxel_size: float | None = None) -> ExperimentSpec:
    """Spec of the demo run: synthetic data in ``<out>/data``, results in ``<out>/<action>``, tiny model.

    Image and grid sizes follow the options (half-resolution lifting plane, as the toolkit's 320x240 ->
    160x120); ``voxel_size`` is the generator's when known.
    """
    out = options.out_dir.as_posix()
    num_gpus = options.num_gpus if options.num_gpus is not None else (1 if _cuda_available() else 0)
    spec = synthetic_spec(f"{out}/data", out, stage="2d", num_gpus=num_gpus)
    width, height = options.image_size
    spec.dataset.target_size = [width, height]
    spec.dataset.reduced_target_size = [max(1, width // 2), max(1, height // 2)]
    spec.dataset.depth_size = [max(1, height // 2), max(1, width // 2)]
    spec.model.frustum3d.grid_dimensions = options.grid
    spec.model.frustum3d.frustum_dims = options.grid
    if voxel_size is not None:
        spec.model.projection.voxel_size = float(voxel_size)
    return spec


def _run_stage(action: str, spec: ExperimentSpec) -> None:
    results_dir = prepare_results_dir(spec, action)
    with status_run(results_dir / STATUS_FILENAME, f"Starting {action} (demo).") as status:
        execute(action, spec, results_dir, status)


def run_demo(options: DemoOptions, status: StatusLogger, say=print) -> None:
    """Generate data and run the demo stages; raises NotBuiltYetError at the first missing part.

    ``say`` receives one human-readable line per step.
    """
    out = options.out_dir
    out.mkdir(parents=True, exist_ok=True)
    data_dir = out / "data"
    spec = demo_spec(options)
    dump_spec(spec, out / EXPERIMENT_FILENAME)
    say(f"demo: generating synthetic data in {data_dir} ({options.scenes} scenes x {options.frames_per_scene} frames)")
    status.running(f"Generating synthetic data in {data_dir}.")
    summary = generate_synthetic(
        data_dir, options.scenes, options.frames_per_scene, options.grid, options.image_size, options.seed
    )
    if isinstance(summary, dict) and summary.get("voxel_size"):
        spec = demo_spec(options, voxel_size=summary["voxel_size"])
        dump_spec(spec, out / EXPERIMENT_FILENAME)
    status.running(f"Synthetic data ready in {data_dir}.")
    say(f"demo: synthetic data ready in {data_dir}")
    for action in DEMO_STAGES:
        say(f"demo: running {action} (results in {out / action})")
        try:
            _run_stage(action, spec)
        except NotBuiltYetError as exc:
            raise NotBuiltYetError(f"{exc.what}; the demo stopped after generating data in {data_dir}") from exc
        status.running(f"{action} finished.")


def demo_main(options: DemoOptions, say=print) -> None:
    """Run the demo inside ``<out>/status.json`` bookkeeping (always ends SUCCESS or FAILURE)."""
    with status_run(options.out_dir / STATUS_FILENAME, "Starting demo.", "Demo finished successfully.") as status:
        run_demo(options, status, say)
