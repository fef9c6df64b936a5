"""`--logger`: Lightning's own loggers by name, writing inside the run folder."""
import importlib.util

import lightning as L
import pytest
import torch
from lightning.pytorch import loggers

from effitune.config import ConfigError, load_config
from effitune.errors import UserError
from effitune.training.loggers import logger_names, make_loggers


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.layer(x), y)
        self.log("train_loss", loss, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_csv_and_tensorboard_write_in_the_run_folder(tmp_path):
    made = make_loggers("csv, TensorBoard", tmp_path, "stage1")
    assert [type(m) for m in made] == [loggers.CSVLogger, loggers.TensorBoardLogger]
    data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
    trainer = L.Trainer(max_epochs=1, logger=made, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, log_every_n_steps=1, default_root_dir=tmp_path)
    trainer.fit(Tiny(), torch.utils.data.DataLoader(data, batch_size=4))
    assert (tmp_path / "logs" / "stage1" / "metrics.csv").is_file()
    assert list((tmp_path / "tensorboard" / "stage1").glob("events.out.tfevents.*"))


def test_unknown_or_missing_logger_is_a_clear_error():
    with pytest.raises(UserError, match="Unknown logger 'wandb'"):
        logger_names("csv,wandb")
    with pytest.raises(ConfigError, match="train.logger"):
        load_config(overrides={"train.logger": "neptune"})
    if importlib.util.find_spec("mlflow") is None:
        with pytest.raises(UserError, match="pip install mlflow"):
            make_loggers("mlflow", ".", "stage1")
    else:
        assert isinstance(make_loggers("mlflow", ".", "stage1")[0], loggers.MLFlowLogger)


def test_a_missing_logger_package_stops_train_before_any_work(tiny_dataset_module, tmp_path, monkeypatch):
    from effitune.pipeline import train

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(UserError, match="needs the 'mlflow' package"):
        train(tiny_dataset_module, out=tmp_path / "run", config=load_config(overrides={"train.logger": "csv,mlflow"}),
              progress=False)
    assert not (tmp_path / "run").exists()  # refused before the scan
