"""``train.ema_decay`` (:mod:`nvp3d.training.weight_ema`) against a brute-force average of the weights after every
step: what validation sees, what checkpoints hold, what the module holds after training, and an exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from nvp3d.training.weight_ema import CURRENT_STATE_KEY, EMA_STATE_KEY, WeightEMA, ema_decay_at
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

DECAY = 0.8


class _Regression(pl.LightningModule):
    """A linear layer with a batch norm (a floating buffer) and its step counter (an integer buffer)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
        self.history: list[dict[str, torch.Tensor]] = []  # floating state after every optimizer step
        self.seen_in_validation: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.net(x) - y) ** 2).mean()

    def on_train_batch_end(self, *args) -> None:
        self.history.append({k: v.detach().clone() for k, v in self.state_dict().items() if v.is_floating_point()})

    def validation_step(self, batch, batch_idx) -> None:
        self.seen_in_validation.append(self.net[0].weight.detach().clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 3, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def _trainer(tmp: Path, epochs: int, callbacks: list) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      default_root_dir=str(tmp), callbacks=callbacks)


def _brute_force_average(initial: dict[str, torch.Tensor], history: list[dict[str, torch.Tensor]]):
    avg = {k: v.clone() for k, v in initial.items()}
    for n, state in enumerate(history):
        d = ema_decay_at(DECAY, n)
        avg = {k: d * avg[k] + (1 - d) * state[k] for k in avg}
    return avg


def test_checkpoints_validation_and_the_final_module_hold_the_average(tmp_path: Path) -> None:
    module = _Regression()
    initial = {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}
    ema = WeightEMA(DECAY)
    trainer = _trainer(tmp_path, 2, [ema])
    trainer.fit(module, _loader(), _loader())
    assert ema.updates == len(module.history) == 12
    expected = _brute_force_average(initial, module.history)
    trained = module.history[-1]
    # the module holds the average after training, integer buffers as trained
    for k, v in expected.items():
        torch.testing.assert_close(module.state_dict()[k], v, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(expected["net.0.weight"], trained["net.0.weight"])
    assert int(module.state_dict()["net.1.num_batches_tracked"]) == 12
    # validation after epoch 0 saw the average of its 6 steps
    torch.testing.assert_close(module.seen_in_validation[0],
                               _brute_force_average(initial, module.history[:6])["net.0.weight"])
    # a checkpoint: state_dict = the average, the trained weights beside it
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert ckpt[EMA_STATE_KEY] == {"decay": DECAY, "updates": 12}
    torch.testing.assert_close(ckpt["state_dict"]["net.0.weight"], expected["net.0.weight"])


@pytest.mark.parametrize("split_epoch", [1, 2])
def test_resume_continues_average_and_weights_exactly(tmp_path: Path, split_epoch: int) -> None:
    straight = _Regression()
    ema_straight = WeightEMA(DECAY)
    _trainer(tmp_path / "a", 3, [ema_straight]).fit(straight, _loader())

    first = _Regression()
    t1 = _trainer(tmp_path / "b", split_epoch, [WeightEMA(DECAY)])
    t1.fit(first, _loader())
    # saved after fit, when the module holds the average: the checkpoint still holds both
    path = tmp_path / "mid.ckpt"
    t1.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    torch.testing.assert_close(ckpt[CURRENT_STATE_KEY]["net.0.weight"], first.history[-1]["net.0.weight"])
    torch.testing.assert_close(ckpt["state_dict"]["net.0.weight"], first.state_dict()["net.0.weight"])
    resumed = _Regression()
    ema_resumed = WeightEMA(DECAY)
    _trainer(tmp_path / "c", 3, [ema_resumed]).fit(resumed, _loader(), ckpt_path=str(path))
    assert ema_resumed.updates == ema_straight.updates == 18
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=k)
