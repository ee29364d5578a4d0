"""Models: output shapes, parameter counts, seeded init, the authors' init, name validation."""
import pytest
import torch

from gex.models import MODELS, ModelConfig, build_model, count_parameters


@pytest.mark.parametrize("name,shape", [("mlp", (2,)), ("mlp", (1, 8, 8)), ("cnn_small", (1, 28, 28)),
                                        ("cnn_small", (1, 8, 8)), ("vgg", (1, 28, 28)), ("resnet18", (3, 32, 32))])
def test_output_shape(name, shape):
    model = build_model(name, shape, 10, seed=0).eval()
    assert model(torch.randn(3, *shape)).shape == (3, 10)


def test_parameter_counts_match_the_documented_sizes():
    assert 80_000 < count_parameters(build_model("cnn_small", (1, 28, 28), 10)) < 90_000
    # The authors' VGG on 1-channel input: ~4.69M; ResNet-18 on CIFAR-10: ~11.17M (docs/protocols.md#models).
    assert abs(count_parameters(build_model("vgg", (1, 28, 28), 10)) - 4.69e6) < 0.02e6
    assert abs(count_parameters(build_model("resnet18", (3, 32, 32), 10)) - 11.17e6) < 0.02e6


def test_resnet_stride_placement_changes_only_where_the_stride_sits():
    first = build_model("resnet18", (3, 32, 32), 10, stride_on_second=False)
    second = build_model("resnet18", (3, 32, 32), 10, stride_on_second=True)
    block_first, block_second = first[5], second[5]  # stem (3 modules), 2 stride-1 blocks, then this
    assert block_first.conv1.stride == (2, 2) and block_first.conv2.stride == (1, 1)
    assert block_second.conv1.stride == (1, 1) and block_second.conv2.stride == (2, 2)
    assert count_parameters(first) == count_parameters(second)


def test_seeded_init_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model("mlp", (4,), 3, seed=7)
    after = torch.rand(1)
    b = build_model("mlp", (4,), 3, seed=7)
    c = build_model("mlp", (4,), 3, seed=8)
    assert torch.equal(before, after)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_haiku_init_is_truncated_normal_with_fan_in_scale():
    model = build_model("mlp", (400,), 10, init="haiku", seed=0, hidden=300, depth=1)
    weight = model[1].weight
    std = 1 / 400 ** 0.5
    assert weight.abs().max() <= 2 * std + 1e-6
    assert 0.8 * std < weight.std() < 0.95 * std  # truncation at 2 std shrinks the std to ~0.88
    assert torch.count_nonzero(model[1].bias) == 0


def test_every_model_has_batchnorm():
    for name in MODELS:
        shape = (3, 32, 32) if name in ("vgg", "resnet18") else (1, 28, 28)
        model = build_model(name, shape, 10)
        assert any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()), name


def test_bad_names_are_one_line_errors():
    with pytest.raises(ValueError, match=r"model.name='nope' is unknown; valid choices: \['cnn_small'"):
        ModelConfig(name="nope")
    with pytest.raises(ValueError, match="model.init='xavier' is unknown"):
        ModelConfig(init="xavier")
