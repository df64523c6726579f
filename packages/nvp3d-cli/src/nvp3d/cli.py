"""The ``nvp3d`` command line (Typer): spec-driven actions, demo, schema generation, synthetic data.

    nvp3d <action> -e spec.yaml [dotted.key=value ...] [--verbose]   # train evaluate inference export gen_trt_engine
    nvp3d demo [--out DIR]
    nvp3d schema [--out-dir .]
    nvp3d dataset synth --out DIR [--scenes N --frames-per-scene K --grid 256 --image 320x240 --seed S]

Exit codes: 0 ok, 1 internal error, 2 bad input (spec/override/usage), 4 data error, 5 non-finite training loss,
130 interrupted, 143 terminated (SIGTERM). Errors print one line on stderr; ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import logging
import sys
import typing
from pathlib import Path
from typing import Annotated, Any

import typer

from nvp3d import __version__
from nvp3d.config import ACTION_SECTIONS, SPEC_ACTIONS, ExperimentSpec
from nvp3d.demo.defaults import DEMO_EXTRA_TEST_SCENES, DEMO_FRAMES_PER_SCENE, DEMO_SCENES
from nvp3d.errors import ExitCode
from nvp3d.outdir import output_folder_problem
from nvp3d.runner import report_error, run_action

#: The keys ``nvp3d <action> --help`` lists (the rest are in references/spec_template_<action>.yaml).
IMPORTANT_KEYS: dict[str, tuple[str, ...]] = {
    "train": (
        "results_dir", "dataset.name", "dataset.train.base_dir", "dataset.train.json_path",
        "dataset.train.batch_size", "dataset.val.json_path", "dataset.label_map", "dataset.frustum_mask_path",
        "dataset.enable_3d", "model.preset", "model.backbone.pretrained_model_path",
        "model.sem_seg_head.num_classes", "train.num_epochs", "train.num_gpus", "train.precision",
        "train.optim.lr", "train.optim.lr_scheduler", "train.optim.max_steps", "train.checkpoint_2d",
        "train.resume_training_checkpoint_path", "train.results_dir",
    ),
    "evaluate": (
        "results_dir", "dataset.name", "dataset.test.base_dir", "dataset.test.json_path",
        "dataset.test.batch_size", "dataset.label_map", "dataset.enable_3d", "model.preset",
        "evaluate.checkpoint", "evaluate.num_gpus", "evaluate.batch_size", "evaluate.results_dir",
    ),
    "inference": (
        "results_dir", "dataset.enable_3d", "dataset.test.batch_size", "model.preset", "model.mode",
        "inference.checkpoint", "inference.images_dir", "inference.recursive", "inference.num_gpus",
        "inference.results_dir",
    ),
    "export": (
        "results_dir", "dataset.enable_3d", "model.preset", "export.checkpoint", "export.format",
        "export.onnx_file_2d", "export.onnx_file_3d", "export.input_width", "export.input_height",
        "export.batch_size", "export.opset_version", "export.on_cpu", "export.results_dir",
    ),
    "gen_trt_engine": (
        "results_dir", "gen_trt_engine.onnx_file", "gen_trt_engine.trt_engine",
        "gen_trt_engine.tensorrt.data_type", "gen_trt_engine.tensorrt.workspace_size",
        "gen_trt_engine.tensorrt.max_batch_size", "gen_trt_engine.results_dir",
    ),
}

ACTION_HELP: dict[str, str] = {
    "train": "Train the 2D stage (dataset.enable_3d=false) or the 3D stage (dataset.enable_3d=true).",
    "evaluate": "Evaluate a checkpoint on dataset.test (2D PQ, or 3D PRQ/RSQ/RRQ).",
    "inference": "Reconstruct panoptic 3D scenes from the images in inference.images_dir.",
    "export": "Export the trained network to ONNX (or TensorRT with export.format=tensorrt).",
    "gen_trt_engine": "Build a TensorRT engine from an exported ONNX file (needs the tensorrt extra and a GPU).",
}


def _field_info(dotted: str) -> tuple[Any, Any]:
    """(FieldInfo, default value) of a dotted spec key."""
    model: type = ExperimentSpec
    instance: Any = ExperimentSpec()
    *sections, leaf = dotted.split(".")
    for part in sections:
        model = model.model_fields[part].annotation
        instance = getattr(instance, part)
    return model.model_fields[leaf], getattr(instance, leaf)


def key_help_lines(action: str) -> list[str]:
    """``key = default  description [choices]`` for each important key of ``action``."""
    lines = []
    for dotted in IMPORTANT_KEYS[action]:
        field, default = _field_info(dotted)
        choices = ""
        annotation = field.annotation
        if typing.get_origin(annotation) is typing.Literal:
            choices = " [" + "|".join(str(c) for c in typing.get_args(annotation)) + "]"
        shown = repr(default) if isinstance(default, str) else default
        lines.append(f"  {dotted} = {shown}  {(field.description or '').rstrip('.')}{choices}")
    return lines


def action_help(action: str) -> str:
    """Help text of an action command: what it does, usage, its important spec keys, exit codes."""
    keys = "\n".join(key_help_lines(action))
    return (
        f"{ACTION_HELP[action]}\n\n"
        f"Reads spec sections: {', '.join(ACTION_SECTIONS[action])} (plus top-level keys). Writes "
        f"experiment.yaml and status.json into {action}.results_dir, else <results_dir>/{action}.\n\n"
        f"\b\nImportant spec keys (key = default; override as key=value):\n{keys}\n\n"
        f"\b\nAll keys with defaults: references/spec_template_{action}.yaml; schema: schemas/{action}.schema.json"
        f"\nExample: nvp3d {action} -e references/spec_template_{action}.yaml {IMPORTANT_KEYS[action][-1]}=out\n\n"
        "\b\nExit codes: 0 ok, 1 internal error, 2 bad spec/override/usage, 4 data error, "
        "5 non-finite training loss, 130 interrupted, 143 terminated (training saves a checkpoint first)."
    )


app = typer.Typer(
    name="nvp3d",
    help="NVPanoptix3D (nvp3d): panoptic 3D scene reconstruction from single RGB images.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
dataset_app = typer.Typer(help="Dataset tools.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(dataset_app, name="dataset")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"nvp3d {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """NVPanoptix3D (nvp3d): panoptic 3D scene reconstruction from single RGB images."""


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def _image_size_option(prefix: str, text: str) -> tuple[int, int]:
    """``--image WxH`` as (width, height); a bad value ends the command with one line and exit code 2."""
    from nvp3d.demo.specs import parse_image_size

    try:
        return parse_image_size(text)
    except ValueError as exc:
        typer.echo(f"{prefix}: error: --image: {exc}", err=True)
        raise typer.Exit(int(ExitCode.BAD_INPUT)) from None


SpecOption = Annotated[
    str | None, typer.Option("-e", "--spec", metavar="FILE", help="Experiment spec (YAML).", show_default=False)
]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(metavar="[KEY=VALUE]...", help="Dotted overrides applied after the file, e.g. train.num_epochs=3.",
                   show_default=False),
]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging and tracebacks on errors.")]


def _make_action_command(action: str) -> None:
    def command(spec: SpecOption = None, overrides: OverridesArg = None, verbose: VerboseOption = False) -> None:
        _setup_logging(verbose)
        if spec is None:
            typer.echo(f"nvp3d {action}: error: no spec file given: pass -e/--spec FILE "
                       f"(template: references/spec_template_{action}.yaml)", err=True)
            raise typer.Exit(int(ExitCode.BAD_INPUT))
        if action == "train":  # automl_policy=on: the search runs the trainings (nvp3d.automl)
            from nvp3d.automl.command import automl_requested, run_automl

            if automl_requested(spec, overrides or []):
                raise typer.Exit(run_automl(spec, overrides or [], verbose=verbose))
        raise typer.Exit(run_action(action, spec, overrides or [], verbose=verbose))

    command.__name__ = f"{action}_command"
    app.command(name=action, help=action_help(action), short_help=ACTION_HELP[action])(command)


for _action in SPEC_ACTIONS:
    _make_action_command(_action)


@app.command("demo", short_help="Train and evaluate both stages on built-in synthetic data (CPU, minutes).")
def demo_command(
    out: Annotated[Path, typer.Option("--out", metavar="DIR", help="Output folder (data, checkpoints, results).")] = Path(
        "results/demo"
    ),
    scenes: Annotated[int, typer.Option(
        min=2, help="Synthetic scenes to generate (split 80/10/10 into train / validation / held out).")] = DEMO_SCENES,
    extra_test_scenes: Annotated[int, typer.Option(
        "--extra-test-scenes", min=0,
        help="More unseen scenes for the held-out metrics (training scenes unchanged).")] = DEMO_EXTRA_TEST_SCENES,
    frames_per_scene: Annotated[int, typer.Option(
        min=1, help="Frames (camera views) per scene.")] = DEMO_FRAMES_PER_SCENE,
    grid: Annotated[int, typer.Option(min=32, help="Voxel grid side of the 3D targets (multiple of 32).")] = 32,
    image: Annotated[str, typer.Option(metavar="WxH", help="Image size, width x height.")] = "80x60",
    epochs: Annotated[int, typer.Option(min=1, help="2D-stage epochs.")] = 48,
    epochs_3d: Annotated[int, typer.Option("--epochs-3d", min=1, help="3D-stage epochs.")] = 5,
    skip_3d: Annotated[bool, typer.Option("--skip-3d", help="Stop after the 2D stage.")] = False,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    test_time_flip: Annotated[bool, typer.Option(
        "--test-time-flip/--one-pass", help="2D evaluations average each image with its mirror image "
        "(model.test_time_flip; the one-pass numbers are printed too).")] = True,
    verbose: VerboseOption = False,
) -> None:
    """Run NVPanoptix3D end to end on built-in synthetic data (no downloads, no GPU needed).

    Generates a small synthetic dataset in <out>/data, evaluates the untrained tiny model, trains the 2D stage
    (<out>/train), evaluates it (<out>/evaluate), then trains and evaluates the 3D stage (<out>/train3d,
    <out>/evaluate3d: PRQ/RSQ/RRQ) on the held-out scenes (32 by default) and reconstructs the first one's images
    (<out>/inference: overlays, npz, PLY).
    Prints the loss curve and the metrics before and after training; about 4-6 minutes on 2 CPU cores.
    """
    from nvp3d.demo.run import demo

    _setup_logging(verbose)
    size = _image_size_option("nvp3d demo", image)
    if grid % 32:
        typer.echo(f"nvp3d demo: error: --grid {grid} must be a multiple of 32", err=True)
        raise typer.Exit(int(ExitCode.BAD_INPUT))
    try:
        demo(out, scenes=scenes, frames_per_scene=frames_per_scene, grid=grid, image_size=size, epochs=epochs,
             seed=seed, say=typer.echo, enable_progress_bar=False, stage3d=not skip_3d, epochs_3d=epochs_3d,
             extra_test_scenes=extra_test_scenes, test_time_flip=test_time_flip)
    except Exception as exc:  # noqa: BLE001 - mapped to documented exit codes
        raise typer.Exit(int(report_error("nvp3d demo", exc, verbose=verbose, err=sys.stderr))) from None
    except KeyboardInterrupt as exc:
        raise typer.Exit(int(report_error("nvp3d demo", exc, verbose=verbose, err=sys.stderr))) from None
    typer.echo(f"nvp3d demo: finished; results in {out}")


@app.command("automl", short_help="Hyper-parameter search (Optuna): each trial is an nvp3d train run.")
def automl_command(spec: SpecOption = None, overrides: OverridesArg = None, verbose: VerboseOption = False) -> None:
    """Search the train spec's hyper-parameters; settings in the automl section (automl.algorithm = bayesian |
    random | hyperband | asha | bohb, automl.max_trials, automl.max_epochs, ...). Trials: <results_dir>/automl/
    trial_NNN; results: automl_results.json, leaderboard.csv, best_spec.yaml, PNG plots. Rerun to continue."""
    from nvp3d.automl.command import run_automl

    _setup_logging(verbose)
    if spec is None:
        typer.echo("nvp3d automl: error: no spec file given: pass -e/--spec FILE "
                   "(template: references/spec_template_train.yaml)", err=True)
        raise typer.Exit(int(ExitCode.BAD_INPUT))
    raise typer.Exit(run_automl(spec, overrides or [], verbose=verbose))


@app.command("schema", short_help="Regenerate schemas/ and references/ (JSON Schemas, spec templates).")
def schema_command(
    out_dir: Annotated[Path, typer.Option("--out-dir", metavar="DIR", help="Root to write schemas/ and references/ under.")] = Path("."),
) -> None:
    """Write schemas/<action>.schema.json, schemas/manifest.json and references/spec_*.yaml."""
    from nvp3d.schema_gen import write_generated

    try:
        paths = write_generated(out_dir)
    except OSError as exc:
        typer.echo(f"nvp3d schema: error: cannot write under {out_dir}: {exc.strerror or exc}", err=True)
        raise typer.Exit(int(ExitCode.BAD_INPUT)) from None
    for path in paths:
        typer.echo(f"wrote {path}")


@dataset_app.command("synth")
def synth_command(
    out: Annotated[Path, typer.Option("--out", metavar="DIR", help="Output dataset folder.")] = Path("data/synthetic"),
    scenes: Annotated[int, typer.Option(min=1, help="Number of scenes.")] = 4,
    frames_per_scene: Annotated[int, typer.Option(min=1, help="Frames (camera views) per scene.")] = 2,
    grid: Annotated[int, typer.Option(min=8, help="Voxel grid side of the 3D targets.")] = 256,
    image: Annotated[str, typer.Option(metavar="WxH", help="Image size, width x height.")] = "320x240",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    extra_test_scenes: Annotated[int, typer.Option(
        "--extra-test-scenes", min=0,
        help="More scenes for the test split only (the train/val scenes stay those of --scenes).")] = 0,
    verbose: VerboseOption = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into a non-empty --out folder.")] = False,
) -> None:
    """Generate a synthetic dataset in the toolkit's on-disk layout (datasets3d.synth)."""
    _setup_logging(verbose)
    size = _image_size_option("nvp3d dataset synth", image)
    problem = output_folder_problem(out, overwrite=overwrite)  # never replace an existing dataset silently
    if problem:
        typer.echo(f"nvp3d dataset synth: error: {problem}", err=True)
        raise typer.Exit(int(ExitCode.BAD_INPUT))
    try:
        from datasets3d.synth import generate

        summary = generate(out_dir=out, scenes=scenes, frames_per_scene=frames_per_scene, grid=grid, image_size=size,
                           seed=seed, extra_test_scenes=extra_test_scenes)
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - mapped to documented exit codes
        code = report_error("nvp3d dataset synth", exc, verbose=verbose, err=sys.stderr)
        raise typer.Exit(int(code)) from None
    typer.echo(f"nvp3d dataset synth: wrote {scenes + extra_test_scenes} scenes x {frames_per_scene} frames to {out}")
    if isinstance(summary, dict):
        shown = {k: summary[k] for k in ("splits", "grid", "voxel_size", "seconds") if k in summary}
        typer.echo(f"nvp3d dataset synth: {shown}")


def main() -> None:
    """Console-script entry point (``nvp3d``)."""
    app(prog_name="nvp3d")


if __name__ == "__main__":
    main()
