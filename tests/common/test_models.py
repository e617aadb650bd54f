import pytest
import torch

from common.models.fusion import FusionNet, build_model


def test_fusion_outputs_two_heads_per_patient():
    model = build_model("cnn", in_channels=5, n_clinical=7, width=4)
    logit, risk = model(torch.randn(3, 5, 16, 16, 16), torch.randn(3, 7))
    assert logit.shape == (3,) and risk.shape == (3,)
    (logit.sum() + risk.sum()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_clinical_only_model_ignores_images():
    model = build_model("none", in_channels=5, n_clinical=7).eval()
    clinical = torch.randn(2, 7)
    a = model(torch.randn(2, 5, 16, 16, 16), clinical)
    b = model(torch.zeros(2, 5, 16, 16, 16), clinical)
    assert torch.equal(a[0], b[0])


def test_same_seed_same_weights_and_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model("cnn", 5, 7, width=4, seed=3)
    after = torch.rand(1)
    b = build_model("cnn", 5, 7, width=4, seed=3)
    assert before == after
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("kwargs, message", [
    ({"encoder": "resnet1000"}, "encoder must be one of"),
    ({"in_channels": 1}, "in_channels"),
    ({"encoder": "none", "n_clinical": 0}, "needs an image encoder or clinical"),
])
def test_bad_constructor_values_raise(kwargs, message):
    args = {"in_channels": 5, "n_clinical": 7, **kwargs}
    with pytest.raises(ValueError, match=message):
        FusionNet(**args)


def test_no_batch_statistics_so_federated_averaging_is_complete():
    model = build_model("cnn", 5, 7, width=4)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert len(list(model.buffers())) == 0  # every state entry is a parameter FedAvg averages
