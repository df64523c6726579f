"""How much host work is one training step? Count the ATen ops it dispatches and the ones that would sync a GPU.

    uv run --frozen --no-sync python tools/count_step_ops.py --stage 2d --preset small --batch 8
    uv run --frozen --no-sync python tools/count_step_ops.py --stage 3d --preset tiny --grid 32 --image 64x48
    uv run --frozen --no-sync python tools/count_step_ops.py --stage infer --preset small --grid 64    # inference

Why: on one H200 the small-preset 2D step and the 3D step are bound by the host (a batch-8 2D step takes about as
long as a batch-1 step), so a step's cost follows the number of kernels the host launches and the number of
times it waits for the device, not the FLOPs. Both can be counted on a CPU without a GPU: every dispatched ATen op
is about one kernel launch on a GPU, and ``_local_scalar_dense`` (``.item()``, ``bool(tensor)``), ``nonzero``,
``unique`` and boolean indexing each make the host wait for the device.

Limits: copies to the host (``.cpu()``, ``.tolist()``) are not seen on a CPU run (source and target are the same
device); optimizer ``.item()`` calls on its CPU step counters are not syncs on a GPU (they are listed apart); the
3D sparse convolutions run frustum3d's torch backend here, not the Triton kernels of a GPU.
A count is not a time: use ``tools/bench_training.py`` on a GPU for that; use this to see where launches and
syncs come from (``--by file`` or ``--by op``) and whether a change removed them.

What it runs: the synthetic frame and network of ``tools/bench_inference.py`` (random weights), one warm-up step,
then one counted step split into forward, criterion, backward and optimizer phases (fp32, CPU).

``--device cuda`` runs the same step on a GPU and also counts the waits the device itself reports: each phase runs
under ``torch.cuda.set_sync_debug_mode("warn")``, which warns at every synchronising CUDA call, blocking
host-to-device copies from pageable memory and device-to-host reads included (the CPU run sees neither); they are
listed by their innermost project ``file:line``. (torch calls that mode a prototype that does not catch every
synchronising operation, so the count is a floor.) There the sparse convolutions run their GPU backend and the
dispatched-op count is the real launch count of the eager step (the 3D stage's frozen 2D network is not graphed
here).
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the same spec, data and network as the benchmark
from bench_inference import batch_of, build, inference_phases, make_frame  # noqa: E402

#: ATen ops after which the host has to wait for the device
SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.unique", "aten._unique", "aten.masked_select",
            "aten.is_nonzero", "aten.equal", "aten.repeat_interleave.Tensor")


class OpCounter(TorchDispatchMode):
    """Counts dispatched ops (total, by op name, by the innermost project source file) and sync ops."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.by_op: collections.Counter = collections.Counter()
        self.by_file: collections.Counter = collections.Counter()
        self.by_func: collections.Counter = collections.Counter()
        self.syncs: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.total += 1
        name = str(func)
        self.by_op[name] += 1
        frames = [f for f in traceback.extract_stack()[:-1] if "/packages/" in f.filename]
        where = f"{Path(frames[-1].filename).name}" if frames else "(torch / outside the packages)"
        self.by_file[where] += 1
        self.by_func[f"{where}:{frames[-1].name}" if frames else where] += 1
        is_bool_index = name == "aten.index.Tensor" and any(
            torch.is_tensor(i) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) if i is not None)
        if name.startswith(SYNC_OPS) or is_bool_index:
            line = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "(outside the packages)"
            self.syncs[f"{name.split('.')[1]} at {line}"] += 1
        return func(*args, **(kwargs or {}))


class DeviceSyncs:
    """Counts the synchronising CUDA calls torch's sync debug mode reports, by innermost project ``file:line``
    (a no-op off CUDA). The warning is shown in the frame that called the op, so the stack names the caller."""

    def __init__(self, device: torch.device) -> None:
        self.enabled = device.type == "cuda"
        self.calls: collections.Counter = collections.Counter()
        self._catch = warnings.catch_warnings()

    def __enter__(self) -> DeviceSyncs:
        if self.enabled:
            self._catch.__enter__()
            warnings.simplefilter("always")
            shown = warnings.showwarning

            def count(message, category, filename, lineno, file=None, line=None):
                if "synchroniz" not in str(message):
                    return shown(message, category, filename, lineno, file, line)
                frames = [f for f in traceback.extract_stack()[:-1] if "/packages/" in f.filename]
                where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else f"{filename}:{lineno}"
                self.calls[where] += 1

            warnings.showwarning = count
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            torch.cuda.set_sync_debug_mode("default")
            self._catch.__exit__(*exc)


def phases_2d(spec, batch_size: int, device: torch.device = torch.device("cpu")):
    """(name, callable) phases of one 2D-stage step (``PanopticModule2D``: forward, criterion, backward, AdamW)."""
    from nvp3d.data.datamodule import NVP3DDataModule
    from nvp3d.data.targets import criterion_targets
    from nvp3d.training.module2d import PanopticModule2D

    dm2 = NVP3DDataModule(spec, stage="2d", splits=("train",))
    dm2.setup()
    torch.manual_seed(0)
    module = PanopticModule2D(spec, dm2.thing_ids, dm2.stuff_ids).to(device)
    module.train()
    # foreach: the multi-tensor path AdamW takes on CUDA (its CPU default is one op chain per parameter)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    batch = batch_of(dm2, batch_size, device)
    state: dict = {}

    def forward() -> None:
        state["out"] = module.model(batch["image"])

    def criterion() -> None:
        out = state["out"]
        targets = criterion_targets(batch, out["padded_size"], module.device, with_occupancy=module.use_occupancy)
        state["total"] = module.criterion.weighted_total(module.criterion(out, targets, distributed=False))

    return opt, state, [("forward", forward), ("criterion", criterion)]


class HostReads:
    """Counts ``.tolist()``, ``.cpu()`` and ``.numpy()`` calls by their innermost project ``file:line``.

    On a CPU run these dispatch no op (source and target are the host), so :class:`OpCounter` cannot see them;
    on a GPU each one on a device tensor copies to the host and waits for the device. Reads of tensors that stay
    on the host on a GPU as well (kernel offsets, for one) are counted too: read the sites, not only the total."""

    METHODS = ("tolist", "cpu", "numpy")

    def __init__(self) -> None:
        self.calls: collections.Counter = collections.Counter()
        self._saved: dict = {}

    def __enter__(self) -> HostReads:
        for method in self.METHODS:
            original = getattr(torch.Tensor, method)
            self._saved[method] = original

            def counted(t, *args, _original=original, _method=method, **kwargs):
                frames = [f for f in traceback.extract_stack()[:-1] if "/packages/" in f.filename]
                where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "(outside)"
                self.calls[f"{_method} at {where}"] += 1
                return _original(t, *args, **kwargs)

            setattr(torch.Tensor, method, counted)
        return self

    def __exit__(self, *exc) -> None:
        for method, original in self._saved.items():
            setattr(torch.Tensor, method, original)


def phases_3d(spec, dm, model, batch_size: int = 1, device: torch.device = torch.device("cpu")):
    """(name, callable) phases of one 3D-stage step at ``batch_size`` (``tools/bench_training.py``'s step, split)."""
    from bench_training import parts_3d

    opt, forward, loss = parts_3d(spec, dm, model, device, batch_size)
    state: dict = {}

    def run_forward() -> None:
        state["out"] = forward()

    def criterion() -> None:
        state["total"] = loss(state["out"])

    return opt, state, [("forward", run_forward), ("criterion", criterion)]


def phases_infer(dm, model, batch_size: int = 1, device: torch.device = torch.device("cpu")):
    """(name, callable) phases of one inference forward (``tools/bench_inference.py``'s
    :func:`~bench_inference.inference_phases`): 2D network, lifting plane, lifting, sparse decoder, fusion; eval
    mode, no gradients, 2D eager."""
    model.eval()
    model.net2d.enable_cuda_graphs(False)
    phases, _ = inference_phases(model, batch_of(dm, batch_size, device), dm.stuff_ids)
    return [(name, torch.no_grad()(fn)) for name, fn in phases]


def count_step(stage: str, args: argparse.Namespace) -> dict[str, OpCounter]:
    """One warm-up step, then one counted step; returns a counter per phase."""
    with tempfile.TemporaryDirectory() as tmp:
        data = make_frame(Path(tmp) / "data", args.grid, args.image)
        device = torch.device(getattr(args, "device", "cpu"))
        spec, dm, model = build(args, data, device)
        if stage == "infer":
            phases = phases_infer(dm, model, getattr(args, "batch_3d", 1), device)
        else:
            if stage == "2d":
                del model
                opt, state, phases = phases_2d(spec, args.batch, device)
            else:
                opt, state, phases = phases_3d(spec, dm, model, getattr(args, "batch_3d", 1), device)
            phases = phases + [("backward", lambda: state["total"].backward()),
                               ("optimizer", lambda: (opt.step(), opt.zero_grad(set_to_none=True)))]
        for _, run in phases:  # warm-up: lazily built caches and optimizer state
            run()
        counters: dict[str, OpCounter] = {}
        for name, run in phases:
            counters[name] = OpCounter()
            with counters[name], HostReads() as reads, DeviceSyncs(device) as device_syncs:
                run()
            counters[name].host_reads = reads.calls
            counters[name].device_syncs = device_syncs.calls
        return counters


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage", choices=("2d", "3d", "infer"), default="2d",
                    help="a 2D or 3D training step, or one inference forward (2D, plane, lifting, decoder, fusion)")
    ap.add_argument("--preset", default="small", choices=("full", "small", "tiny"))
    ap.add_argument("--batch", type=int, default=8, help="2D batch size")
    ap.add_argument("--batch-3d", type=int, default=1, help="3D batch size (and the inference batch)")
    ap.add_argument("--grid", type=int, default=32)
    ap.add_argument("--image", default="160x120")
    ap.add_argument("--by", choices=("file", "func", "op"), default="file",
                    help="group the counts by source file, by file:function or by ATen op")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: also count the waits torch's sync debug mode "
                    "reports (module docstring)")
    args = ap.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device here; leave --device out for the CPU count")
    from nvp3d.demo.specs import parse_image_size

    w, h = parse_image_size(args.image)
    args.image, args.checkpoint = (w, h), ""
    counters = count_step(args.stage, args)
    total = sum(c.total for c in counters.values())
    print(f"{args.stage} {'forward' if args.stage == 'infer' else 'step'}, preset {args.preset}, batch "
          f"{args.batch if args.stage == '2d' else args.batch_3d}, "
          f"image {w}x{h}, grid {args.grid}: {total} ops dispatched")
    for name, c in counters.items():
        syncs = {k: v for k, v in c.syncs.items() if not (name == "optimizer" and "_local_scalar_dense" in k)}
        top = {"file": c.by_file, "func": c.by_func, "op": c.by_op}[args.by].most_common(args.top)
        print(f"\n{name}: {c.total} ops, {sum(syncs.values())} host syncs"
              + (f" (+{sum(c.syncs.values()) - sum(syncs.values())} optimizer step-counter reads, "
                 "not syncs on a GPU)" if len(syncs) != len(c.syncs) else ""))
        for k, v in top:
            print(f"  {v:6d}  {k}")
        for k, v in sorted(syncs.items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"  sync {v:4d}  {k}")
        if args.device != "cpu":
            print(f"  {sum(c.device_syncs.values())} synchronising CUDA calls (sync debug mode)")
            for k, v in c.device_syncs.most_common(args.top):
                print(f"  wait {v:4d}  {k}")
        reads = c.host_reads
        if reads:
            print(f"  {sum(reads.values())} host reads (.tolist / .cpu / .numpy: a copy and a wait each when the "
                  "tensor is on the GPU)")
            for k, v in reads.most_common(args.top):
                print(f"  read {v:4d}  {k}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
