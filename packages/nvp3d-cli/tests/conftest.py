"""Shared fixtures of the nvp3d-cli tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch


def find_repo_root() -> Path:
    """The workspace root: first parent of this file holding both ``packages/`` and ``pyproject.toml``."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "packages").is_dir() and (parent / "pyproject.toml").is_file():
            return parent
    raise RuntimeError("repository root not found above " + str(Path(__file__)))


@pytest.fixture
def repo_root() -> Path:
    return find_repo_root()


@pytest.fixture
def restore_actions():
    """Let a test replace entries of nvp3d.actions.ACTIONS; the originals come back afterwards."""
    from nvp3d import actions

    saved = dict(actions.ACTIONS)
    yield actions.ACTIONS
    actions.ACTIONS.clear()
    actions.ACTIONS.update(saved)


@pytest.fixture
def fake_synth(monkeypatch):
    """Install a stand-in ``datasets3d.synth`` module that records its calls and writes a marker file."""
    import types

    calls: list[dict] = []

    def generate(out_dir, scenes, frames_per_scene, grid, image_size, seed, extra_test_scenes=0):
        calls.append(
            dict(out_dir=Path(out_dir), scenes=scenes, frames_per_scene=frames_per_scene, grid=grid,
                 image_size=tuple(image_size), seed=seed, extra_test_scenes=extra_test_scenes)
        )
        (Path(out_dir) / "meta").mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "meta" / "train.json").write_text("{}")
        return Path(out_dir)

    module = types.ModuleType("datasets3d.synth")
    module.generate = generate
    monkeypatch.setitem(sys.modules, "datasets3d.synth", module)
    return calls


def _run_cli(*args: str, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``python [launcher...] -m nvp3d.cli args...`` on CPU with a clean distributed environment."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT", "RANK", "TORCHELASTIC_RUN_ID")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, *launcher, "-m", "nvp3d.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="session")
def run_cli():
    """Runs the command line in a subprocess (multi-process launches need a real process tree)."""
    return _run_cli


@pytest.fixture(scope="module")
def one_thread():
    """The tiny model's small kernels gain nothing from intra-op threads; on a busy 2-core CI machine
    OpenMP threads waiting for each other made training steps up to 20x slower (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class CrashAt(pl.Callback):
    """Raises a simulated crash right after the training step ``step`` (a stand-in for kill -9)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


@pytest.fixture
def crash_at() -> type[CrashAt]:
    """The :class:`CrashAt` callback class (tests build it with the step to crash after)."""
    return CrashAt


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """``synthetic_data(name, seed, image_size=(64, 48))``: a small synthetic dataset (2 scenes x 2 frames, 32^3
    grid) under the session's temp folder, generated once per name and shared by the tests that ask for it."""
    from nvp3d.demo.run import generate_demo_data

    def make(name: str, seed: int, image_size: tuple[int, int] = (64, 48)) -> Path:
        root = tmp_path_factory.getbasetemp() / name
        generate_demo_data(root, scenes=2, frames_per_scene=2, grid=32, image_size=image_size, seed=seed)
        return root

    return make


@pytest.fixture
def invoke_cli():
    """``invoke_cli(args, cwd)``: the Typer app run in-process from the folder ``cwd`` (relative spec paths and
    the default ``./results`` resolve there), restoring the working directory afterwards."""
    from nvp3d.cli import app
    from typer.testing import CliRunner

    runner = CliRunner()

    def invoke(args: list[str], cwd: Path):
        old = os.getcwd()
        os.chdir(cwd)
        try:
            return runner.invoke(app, args)
        finally:
            os.chdir(old)

    return invoke


@contextlib.contextmanager
def moto_s3(tmp_path_factory, bucket: str):
    """A moto S3 server on 127.0.0.1 with test credentials, its endpoint and a fresh ``NVP3D_CACHE`` in the
    environment; yields an s3fs filesystem holding the empty ``bucket``; stops the server afterwards.
    Callers ``pytest.importorskip("s3fs")`` and ``("moto.server")`` first."""
    import s3fs
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    home = tmp_path_factory.mktemp("awshome")
    try:
        with pytest.MonkeyPatch.context() as mp:
            for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "NVP3D_OFFLINE"):
                mp.delenv(var, raising=False)
            mp.setenv("AWS_ACCESS_KEY_ID", "testing")
            mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
            mp.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
            mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "credentials"))
            mp.setenv("AWS_CONFIG_FILE", str(home / "config"))
            mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
            mp.setenv("NVP3D_CACHE", str(tmp_path_factory.mktemp("cache")))
            fs = s3fs.S3FileSystem(skip_instance_cache=True)
            fs.mkdir(bucket)
            yield fs
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server():
    """:func:`moto_s3`, for module fixtures: ``with s3_server(tmp_path_factory, bucket) as fs: ...``."""
    return moto_s3


def random_inference_setup(root: Path, out: Path, *, frames: int, seed: int, batch_size: int,
                           image_size: tuple[int, int] = (64, 48)) -> tuple[object, Path]:
    """``frames`` synthetic images in ``out/images`` and a random-weight 3D checkpoint (tiny preset, 32^3) in
    ``out/model.pth``; returns the spec (``inference.images_dir`` and ``.checkpoint`` set, CPU, every query kept
    so that random weights still give segments) and the image folder."""
    from nvp3d.data.datamodule import NVP3DDataModule
    from nvp3d.demo.run import generate_demo_data
    from nvp3d.demo.specs import demo_spec, spec_3d_from_2d
    from nvp3d.model.build import build_net3d

    generate_demo_data(root, scenes=1, frames_per_scene=frames, grid=32, image_size=image_size, seed=seed)
    spec = demo_spec(root, out, image_size=image_size, voxel_size=0.24, num_gpus=0, min_instance_pixels=8,
                     batch_size=batch_size)
    spec = spec_3d_from_2d(spec, "", grid=32, unet_features=4)
    spec.model.object_mask_threshold = 0.0  # random weights: keep every query so segments exist
    spec.inference.num_gpus = 0
    dm = NVP3DDataModule(spec, splits=("test",))
    dm.setup()
    torch.manual_seed(0)
    model = build_net3d(spec, dm.thing_ids, dm.stuff_ids)
    ckpt = out / "model.pth"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    spec.inference.checkpoint = str(ckpt)
    images = out / "images"
    images.mkdir()
    for i, rgb in enumerate(sorted((root / "data").rglob("rgb_*.png"))[:frames]):
        shutil.copy(rgb, images / f"img{i}.png")
    spec.inference.images_dir = str(images)
    return spec, images


@pytest.fixture(scope="session")
def inference_setup():
    """:func:`random_inference_setup`, for module fixtures."""
    return random_inference_setup
