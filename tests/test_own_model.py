"""GEX and the baselines on a model the package does not define, wrapped by ``InfluenceTask.from_model`` without
any config object; and the README's Python blocks, run verbatim."""
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import baselines  # noqa: F401  (registers the methods)
from gex import GEX, InfluenceTask, MethodError, build_method
from gex.runs import ArtifactCache

README = Path(__file__).resolve().parents[1] / "README.md"
TOL_EXACT = 1e-6


def _blobs(n: int = 120, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three Gaussian blobs as 1 x 4 x 4 images, with 10% of the labels flipped."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 1, 4, 4, generator=gen) * 0.5 + y.view(-1, 1, 1, 1).float()
    flip = torch.randperm(n, generator=gen)[: n // 10]
    y = y.clone()
    y[flip] = (y[flip] + 1) % 3
    return x, y


def _own_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(64, 3))


def _trained(x: torch.Tensor, y: torch.Tensor, epochs: int = 30) -> nn.Module:
    """A plain PyTorch training loop: nothing of the package's own recipe."""
    model = _own_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(epochs):
        for rows in torch.arange(len(x)).split(32):
            opt.zero_grad()
            F.cross_entropy(model(x[rows]), y[rows]).backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def own_task() -> InfluenceTask:
    x, y = _blobs()
    return InfluenceTask.from_model(_trained(x, y), (x, y), _blobs(30, seed=1), loss="ce", device="cpu")


def test_gex_tracin_and_loss_score_a_model_the_package_never_saw(own_task):
    task = own_task
    gex = GEX(num_members=3, ft_step=10, ft_batch_size=32, bn_batches=2).fit(task)
    scores = gex.self_influence(task.train)
    assert scores.shape == (120,) and bool(torch.isfinite(scores).all()) and bool((scores >= 0).all())
    pairwise = gex.influence(task.train, task.train)
    assert torch.allclose(pairwise.diagonal(), scores, atol=TOL_EXACT)
    assert gex.influence(task.train, task.test).shape == (120, 30)
    tracin = build_method("tracin").fit(task).self_influence(task.train)
    assert tracin.shape == (120,) and bool((tracin > 0).all())
    loss = build_method("loss").fit(task).self_influence(task.train)
    with torch.no_grad():
        expected = F.cross_entropy(task.model(task.train.x), task.train.y, reduction="none")
    assert torch.allclose(loss.double(), expected.double(), atol=TOL_EXACT)


def test_tensors_and_datasets_give_the_same_task():
    x, y = _blobs(40)
    model = _own_model().eval()

    class Pairs(Dataset):
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return x[i], int(y[i])

    tasks = [InfluenceTask.from_model(model, data, device="cpu") for data in ((x, y), TensorDataset(x, y), Pairs())]
    for other in tasks[1:]:
        assert torch.equal(other.train.x, tasks[0].train.x) and torch.equal(other.train.y, tasks[0].train.y)
    assert tasks[0].train.num_classes == 3 and not bool(tasks[0].train.is_noisy.any())
    assert tasks[0].test is tasks[0].train  # no test set given: the training set


def test_bad_input_and_missing_recipe_are_one_line_errors(own_task):
    x, y = _blobs(40)
    with pytest.raises(ValueError, match=r"labels must be a 1-d integer tensor of classes in \[0, 3\)"):
        InfluenceTask.from_model(_own_model(), (x, y + 5), device="cpu")
    with pytest.raises(ValueError, match="loss='mse' is unknown"):
        InfluenceTask.from_model(_own_model(), (x, y), loss="mse", device="cpu")
    with pytest.raises(MethodError, match="el2n trains new models from scratch, so it needs task.recipe"):
        build_method("el2n").fit(own_task)


def test_the_cache_is_keyed_by_the_weights_and_the_data(tmp_path):
    x, y = _blobs(40)
    cache = ArtifactCache(tmp_path)
    one = InfluenceTask.from_model(_own_model(), (x, y), device="cpu", cache=cache)
    same = InfluenceTask.from_model(_own_model(), (x, y), device="cpu", cache=cache)
    other_weights = InfluenceTask.from_model(_trained(x, y, epochs=1), (x, y), device="cpu", cache=cache)
    other_data = InfluenceTask.from_model(_own_model(), (x, y.flip(0)), device="cpu", cache=cache)
    assert one.cache_spec == same.cache_spec
    assert other_weights.cache_spec["model"] != one.cache_spec["model"]
    assert other_data.cache_spec["train_data"] != one.cache_spec["train_data"]
    options = dict(num_members=2, ft_step=3, ft_batch_size=16, bn_batches=1)
    first = GEX(**options).fit(one).self_influence(one.train)
    again = GEX(**options).fit(same).self_influence(same.train)  # members read back from the cache
    assert torch.equal(first, again) and len(list(tmp_path.glob("ensemble/*/member_*.pt"))) == 2


def test_a_torchvision_model_works_as_is():
    torchvision = pytest.importorskip("torchvision")
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, 32, 32, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    task = InfluenceTask.from_model(torchvision.models.resnet18(num_classes=10), (x, y), device="cpu")
    scores = GEX(num_members=2, ft_step=2, ft_batch_size=16, bn_batches=1).fit(task).self_influence(task.train)
    assert scores.shape == (64,) and bool(torch.isfinite(scores).all())


def test_the_readme_python_blocks_run_verbatim(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no Python block"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own README
