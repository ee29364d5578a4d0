"""Shared fixtures: tiny seeded tasks built through the real pipeline (data -> noise -> model -> training)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("GEX_QUIET", "1")
# Several processes may share 2 cores: GEX_TEST_THREADS=1 avoids oversubscription.
torch.set_num_threads(int(os.environ.get("GEX_TEST_THREADS", "1")))
torch.set_flush_denormal(True)  # denormals slow tiny-model training and HVPs 2-3x

from gex.attribution import InfluenceTask  # noqa: E402
from gex.data import DataConfig, NoiseConfig, load_data  # noqa: E402
from gex.models import ModelConfig  # noqa: E402
from gex.pipeline import pretrained_task  # noqa: E402
from gex.train import TrainConfig  # noqa: E402

# Named float64 tolerances for exact-answer checks.
TOL_EXACT = 1e-8
TOL_FLOAT32 = 1e-4


def make_task(data: str = "digits", n_train: int | None = 300, n_test: int | None = 100, noise: str = "symmetric",
              rate: float = 0.2, model: str = "mlp", options: dict | None = None, epochs: int = 30,
              batch_size: int = 64, lr: float = 0.1, seed: int = 0, dtype: torch.dtype = torch.float32,
              **train_kw) -> InfluenceTask:
    """A small task through the real pipeline (no cache). ``dtype=torch.float64`` for exact-answer tests."""
    data_cfg = DataConfig(name=data, n_train=n_train, n_test=n_test)
    noise_cfg = NoiseConfig(kind=noise, rate=rate)
    bundle = load_data(data_cfg, noise_cfg, seed)
    if dtype != torch.float32:
        bundle.train.x, bundle.test.x = bundle.train.x.to(dtype), bundle.test.x.to(dtype)
    options = options if options is not None else ({"hidden": 16, "depth": 1} if model == "mlp" else {})
    model_cfg = ModelConfig(name=model, options=options)
    recipe = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, bn_batches=4, **train_kw)
    torch.set_default_dtype(dtype)
    try:
        task = pretrained_task(bundle, model_cfg, recipe, seed=seed,
                               device="cpu")
    finally:
        torch.set_default_dtype(torch.float32)
    return task


@pytest.fixture(scope="session")
def digits_task() -> InfluenceTask:
    """Digits, 300 train / 100 test, 20% symmetric noise, BN MLP (hidden 16), trained 30 epochs."""
    return make_task()


@pytest.fixture(scope="session")
def tiny_task64() -> InfluenceTask:
    """A float64 task small enough for the explicit Hessian: digits 120 train, BN MLP hidden 6 (P ~ 470)."""
    return make_task(n_train=120, n_test=40, options={"hidden": 6, "depth": 1}, epochs=40, dtype=torch.float64)
