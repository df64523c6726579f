"""Remote dataset paths against a real S3-compatible server (moto's server mode on 127.0.0.1).

The synthetic dataset is uploaded the way the toolkit ships it: ``meta/`` as files and the scene folders
packed as ``data/images.tar.gz``. Reading the split through ``s3://`` must give the same samples as the
local copy; the cache must not download twice, must notice changed objects, and must refuse archives
that escape their folder. Errors are one line and name what to fix.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import shutil
import socket
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets3d import (
    DatasetConfig,
    MissingDataError,
    PanopticReconstructionDataset,
    RemoteAccessError,
    RemoteSupportError,
    UnsafeArchiveError,
    UnsupportedURLError,
    prepare_scene_folders,
    resolve_dataset_path,
)
from datasets3d.archives import marker_path
from datasets3d.synth import generate

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

BUCKET = "nvp3d-remote-test"
SMALL = dict(name="synthetic", target_size=(80, 60), reduced_target_size=(40, 30), depth_size=(30, 40),
             min_instance_pixels=20, enable_3d=True)


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """2 scenes x 2 frames, grid 32, 80x60: the local reference copy."""
    root = tmp_path_factory.mktemp("synth")
    generate(root, scenes=2, frames_per_scene=2, grid=32, image_size=(80, 60), seed=0)
    return root


def pack_scenes(root: Path, archive: Path) -> None:
    """``root/data/<scene>/...`` -> tar.gz whose members are ``<scene>/...`` (the toolkit's images.tar.gz)."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tf:
        for scene in sorted(p for p in (root / "data").iterdir() if p.is_dir()):
            tf.add(scene, arcname=scene.name)


def packed_copy(synth: Path, dest: Path) -> Path:
    """The dataset as shipped: meta/ plus data/images.tar.gz, no scene folders."""
    shutil.copytree(synth / "meta", dest / "meta")
    pack_scenes(synth, dest / "data" / "images.tar.gz")
    return dest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(synth, tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with credentials in the environment; yields an s3fs client.

    The bucket holds the packed dataset under ``packed/``.
    """
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    home = tmp_path_factory.mktemp("awshome")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "NVP3D_CACHE", "NVP3D_OFFLINE"):
            mp.delenv(var, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "credentials"))
        mp.setenv("AWS_CONFIG_FILE", str(home / "config"))
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir(BUCKET)
        packed = packed_copy(synth, tmp_path_factory.mktemp("packed"))
        fs.put(str(packed) + "/", f"{BUCKET}/packed", recursive=True)
        try:
            yield fs
        finally:
            server.stop()


def assert_samples_equal(a, b, where: str = "sample") -> None:
    """Recursive equality of sample dicts: tensors bit-identical, everything else ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_samples_equal(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_samples_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def file_states(folder: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every file: a re-download or re-extraction replaces the inode."""
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file() and p.name != ".nvp3d.lock"}


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


# ------------------------------------------------------------------------------------------ S3 tests
def test_s3_split_reads_like_the_local_copy_and_second_read_hits_the_cache(s3, synth, tmp_path):
    cache = tmp_path / "cache"
    remote_cfg = DatasetConfig(root=f"s3://{BUCKET}/packed", json_path="meta/val.json", cache_dir=cache, **SMALL)
    assert remote_cfg.is_remote
    remote = PanopticReconstructionDataset(remote_cfg)
    local = PanopticReconstructionDataset(DatasetConfig(root=synth, json_path="meta/val.json", **SMALL))

    mirror = cache / "s3" / BUCKET / "packed"
    assert remote.config.root == mirror
    assert sorted(p.name for p in (mirror / "data").iterdir() if p.is_dir()) == ["synth-0000-00000", "synth-0000-00001"]
    assert marker_path(mirror / "data" / "images.tar.gz").is_file()
    assert len(remote) == len(local) == 4
    for i in range(len(local)):
        assert_samples_equal(remote[i], local[i], f"frame {i}")

    before = file_states(mirror)
    again = PanopticReconstructionDataset(remote_cfg)  # lists the bucket again; downloads and extracts nothing
    assert file_states(mirror) == before
    assert_samples_equal(again[3], local[3])


def test_changed_objects_are_fetched_again(s3, synth, tmp_path):
    cache = tmp_path / "cache"
    s3.pipe(f"{BUCKET}/changing/notes.txt", b"first")
    prefix = f"s3://{BUCKET}/changing"
    local = resolve_dataset_path(prefix, cache_dir=cache)
    first = (local / "notes.txt").stat().st_ino
    assert (local / "notes.txt").read_bytes() == b"first"
    # same size, other content: only the ETag tells them apart
    s3.pipe(f"{BUCKET}/changing/notes.txt", b"other")
    assert resolve_dataset_path(prefix, cache_dir=cache) == local
    assert (local / "notes.txt").read_bytes() == b"other"
    assert (local / "notes.txt").stat().st_ino != first

    # a changed archive is downloaded and extracted again
    work = packed_copy(synth, tmp_path / "work")
    s3.put(str(work) + "/", f"{BUCKET}/changing/ds", recursive=True)
    cfg = DatasetConfig(root=f"{prefix}/ds", json_path="meta/val.json", cache_dir=cache, **SMALL)
    ds = PanopticReconstructionDataset(cfg)
    rgb = ds.config.root / "data" / "synth-0000-00000" / "rgb_0000.png"
    original = rgb.read_bytes()
    changed = tmp_path / "changed"
    shutil.copytree(synth / "data", changed / "data")
    from PIL import Image

    img = np.asarray(Image.open(changed / "data" / "synth-0000-00000" / "rgb_0000.png"))
    Image.fromarray(255 - img).save(changed / "data" / "synth-0000-00000" / "rgb_0000.png")
    pack_scenes(changed, tmp_path / "images.tar.gz")
    s3.put(str(tmp_path / "images.tar.gz"), f"{BUCKET}/changing/ds/data/images.tar.gz")
    ds2 = PanopticReconstructionDataset(cfg)
    assert rgb.read_bytes() != original
    assert torch.equal(ds2[0]["image"], torch.from_numpy(255 - img).permute(2, 0, 1).float())


def test_malicious_archive_is_refused(s3, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in (("scene-a/rgb_0000.png", b"x"), ("../evil.txt", b"pwned")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    s3.pipe(f"{BUCKET}/evil/data/images.tar.gz", buf.getvalue())
    local = resolve_dataset_path(f"s3://{BUCKET}/evil", cache_dir=tmp_path / "cache")
    with pytest.raises(UnsafeArchiveError) as exc:
        prepare_scene_folders(local, ["scene-a"])
    assert "'../evil.txt'" in one_line(exc)
    assert not (local / "evil.txt").exists() and not (local / "data" / "scene-a").exists()
    assert not list((local / "data").glob(".*.extracting"))  # the temporary folder is gone too


def test_missing_credentials_name_the_variables(s3, tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(RemoteAccessError) as exc:
        resolve_dataset_path(f"s3://{BUCKET}/packed", cache_dir=tmp_path)
    text = one_line(exc)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        assert var in text
    assert f"s3://{BUCKET}/packed" in text
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")  # a named profile that is not configured
    with pytest.raises(RemoteAccessError) as exc:
        resolve_dataset_path(f"s3://{BUCKET}/packed", cache_dir=tmp_path)
    assert "no-such-profile" in one_line(exc) and "AWS_ACCESS_KEY_ID" in one_line(exc)


def test_missing_object_names_the_url(s3, tmp_path):
    url = f"s3://{BUCKET}/packed/meta/nothere.json"
    with pytest.raises(MissingDataError) as exc:
        resolve_dataset_path(url, cache_dir=tmp_path)
    assert url in one_line(exc)
    with pytest.raises(MissingDataError) as exc:  # through the dataset: a URL-valued label_map
        PanopticReconstructionDataset(DatasetConfig(root=f"s3://{BUCKET}/packed", label_map=url,
                                                    cache_dir=tmp_path, **SMALL))
    assert url in one_line(exc)


def test_single_file_urls_land_in_the_cache(s3, synth, tmp_path):
    url = f"s3://{BUCKET}/packed/meta/colormap.json"
    path = resolve_dataset_path(url, cache_dir=tmp_path)
    assert path == tmp_path / "s3" / BUCKET / "packed" / "meta" / "colormap.json"
    assert path.read_bytes() == (synth / "meta" / "colormap.json").read_bytes()
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------------------ without a server
def test_plain_paths_and_file_urls(synth, tmp_path):
    assert resolve_dataset_path(tmp_path / "x") == tmp_path / "x"
    assert resolve_dataset_path("relative/x") == Path("relative/x")
    assert resolve_dataset_path(f"file://{synth}") == synth
    assert resolve_dataset_path("file://localhost/data/x") == Path("/data/x")
    via_url = PanopticReconstructionDataset(DatasetConfig(root=f"file://{synth}", json_path="meta/val.json",
                                                          label_map=f"file://{synth}/meta/colormap.json", **SMALL))
    local = PanopticReconstructionDataset(DatasetConfig(root=synth, json_path="meta/val.json", **SMALL))
    assert via_url.config.root == synth and not via_url.config.is_remote
    assert_samples_equal(via_url[1], local[1])


def test_unknown_protocol_and_missing_backend(tmp_path):
    with pytest.raises(UnsupportedURLError) as exc:
        resolve_dataset_path("nosuchproto://bucket/x", cache_dir=tmp_path)
    assert "nosuchproto" in one_line(exc)
    with pytest.raises(UnsupportedURLError, match="chained"):
        resolve_dataset_path("simplecache::s3://bucket/x", cache_dir=tmp_path)
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(RemoteSupportError) as exc:
            resolve_dataset_path("gs://bucket/x", cache_dir=tmp_path)
        assert "pip install gcsfs" in one_line(exc)


def test_no_scene_folder_and_no_archive(synth, tmp_path):
    shutil.copytree(synth / "meta", tmp_path / "meta")
    with pytest.raises(MissingDataError) as exc:
        PanopticReconstructionDataset(DatasetConfig(root=tmp_path, json_path="meta/val.json", **SMALL))
    text = one_line(exc)
    assert "no scene folder" in text and "synth-0000-00000" in text and "images.tar.gz" in text


def test_unsafe_links_are_refused(tmp_path):
    for link, kind in (("/etc/passwd", tarfile.SYMTYPE), ("../../outside", tarfile.SYMTYPE),
                       ("../x", tarfile.LNKTYPE)):
        root = tmp_path / f"case{kind!r}{len(link)}"
        (root / "data").mkdir(parents=True)
        with tarfile.open(root / "data" / "images.tar.gz", "w:gz") as tf:
            info = tarfile.TarInfo("scene-a/link")
            info.type, info.linkname = kind, link
            tf.addfile(info)
        with pytest.raises(UnsafeArchiveError) as exc:
            prepare_scene_folders(root, ["scene-a"])
        assert "scene-a/link" in one_line(exc) and link in one_line(exc)


def _extract_in_child(root: str, queue) -> None:
    queue.put(len(prepare_scene_folders(Path(root), ["synth-0000-00000", "synth-0000-00001"])))


def test_local_archive_extracted_once_by_concurrent_processes(synth, tmp_path):
    root = packed_copy(synth, tmp_path / "ds")
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_extract_in_child, args=(str(root), queue)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 4
    assert sorted(queue.get(timeout=5) for _ in procs) == [0, 0, 0, 1]  # exactly one extracted
    for scene in ("synth-0000-00000", "synth-0000-00001"):
        want = sorted(p.name for p in (synth / "data" / scene).iterdir())
        assert sorted(p.name for p in (root / "data" / scene).iterdir()) == want
        for name in want:
            assert (root / "data" / scene / name).read_bytes() == (synth / "data" / scene / name).read_bytes()
    assert not list((root / "data").glob(".*.extracting"))

    # unchanged archive: nothing to do; a changed one (other mtime) is extracted again
    assert prepare_scene_folders(root, ["synth-0000-00000"]) == []
    archive = root / "data" / "images.tar.gz"
    st = archive.stat()
    os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    time.sleep(0.01)
    assert prepare_scene_folders(root, ["synth-0000-00000"]) == [archive]
