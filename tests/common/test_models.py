import pytest
import torch

from hccfed.common.models.fusion import FusionNet, build_model


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


def test_a_per_patient_layer_norm_leaves_two_radiomics_only_their_order():
    """What tabular_norm "none" is for: a LayerNorm over each patient's 2 radiomics features maps
    (x1, x2) to about (-1, 1) or (1, -1), so the head cannot see how large they are."""
    clinical = torch.zeros(4, 7)
    small, large = torch.tensor([[0.1, 0.2]] * 4), torch.tensor([[-3.0, 2.5]] * 4)
    outputs = {}
    for norm in ("layer", "none"):
        model = build_model("none", 5, 7, seed=1, n_radiomics=2, tabular_norm=norm).eval()
        outputs[norm] = [model(torch.zeros(4, 5, 8, 8, 8), clinical, r)[0] for r in (small, large)]
    assert torch.allclose(*outputs["layer"], atol=1e-3)  # the magnitude is lost
    assert not torch.allclose(*outputs["none"], atol=1e-3)  # it reaches the head
    with pytest.raises(ValueError, match="tabular_norm must be one of"):
        FusionNet(5, 7, tabular_norm="batch")


@pytest.mark.parametrize("kwargs, message", [
    ({"encoder": "resnet1000"}, "encoder must be one of"),
    ({"in_channels": 1}, "in_channels"),
    ({"encoder": "none", "n_clinical": 0}, "needs an image encoder, radiomics or clinical"),
])
def test_bad_constructor_values_raise(kwargs, message):
    args = {"in_channels": 5, "n_clinical": 7, **kwargs}
    with pytest.raises(ValueError, match=message):
        FusionNet(**args)


def test_no_batch_statistics_so_federated_averaging_is_complete():
    model = build_model("cnn", 5, 7, width=4)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert len(list(model.buffers())) == 0  # every state entry is a parameter FedAvg averages


# ---------------------------------------------------------------- encoders
from opacus.validators import ModuleValidator  # noqa: E402

from hccfed.common.models.fusion import ENCODERS, norm_parameter_names  # noqa: E402
from hccfed.common.models.resnet import ResNet10Encoder3d  # noqa: E402
from hccfed.common.models.vit import ViTEncoder3d, sinusoidal_position_code  # noqa: E402

TINY = {"cnn": {"width": 4}, "resnet10": {"width": 4}, "vit": {"width": 8, "patch_size": 8, "depth": 2, "heads": 2},
        "none": {}}


def _tiny(encoder, seed=0):
    return build_model(encoder, 5, 7, seed=seed, **TINY[encoder])


def _images(n=2, size=(16, 16, 16), channels=5, seed=0):
    """Random phases and a binary tumour mask (last channel), as the sites prepare them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, *size, generator=g)
    x[:, -1] = (torch.rand(n, *size, generator=g) < 0.2).float()
    return x


@pytest.mark.parametrize("encoder", ENCODERS)
def test_every_encoder_gives_two_heads_and_gradients(encoder):
    model = _tiny(encoder)
    logit, risk = model(_images(), torch.randn(2, 7))
    assert logit.shape == (2,) and risk.shape == (2,) and torch.isfinite(logit).all()
    (logit.sum() + risk.sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("encoder", ["resnet10", "vit"])
def test_encoder_weights_and_outputs_follow_the_seed(encoder):
    x, c = _images(), torch.randn(2, 7)
    a, b, other = _tiny(encoder, 1).eval(), _tiny(encoder, 1).eval(), _tiny(encoder, 2).eval()
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.equal(a(x, c)[0], b(x, c)[0])
    assert not torch.equal(a(x, c)[0], other(x, c)[0])


@pytest.mark.parametrize("encoder", ["cnn", "resnet10", "vit"])
def test_models_pass_opacus_validation_as_built(encoder):
    """No BatchNorm, no unsupported layer: Opacus' standard hooks mode works without ModuleValidator.fix."""
    model = _tiny(encoder)
    assert ModuleValidator.validate(model, strict=False) == []
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert not any(getattr(m, "inplace", False) for m in model.modules())


def test_encoder_embedding_sizes_and_input_channels():
    assert ResNet10Encoder3d(3, width=4)(_images(channels=3)).shape == (2, 64)
    assert ResNet10Encoder3d(5, widths=(2, 4, 6, 8))(_images(1)).shape == (1, 16)
    vit = ViTEncoder3d(7, width=12, patch_size=4, depth=1, heads=3)
    assert vit(_images(channels=7, size=(16, 8, 12))).shape == (2, 24)  # any size divisible by the patch
    code = sinusoidal_position_code((2, 3, 4), 12)
    assert code.shape == (24, 12) and len({tuple(r.tolist()) for r in code}) == 24


@pytest.mark.parametrize("build, message", [
    (lambda: ResNet10Encoder3d(1), "in_channels"),
    (lambda: ResNet10Encoder3d(5, width=0), "width must be >= 1, got 0"),
    (lambda: ResNet10Encoder3d(5, widths=(4, 8)), "four positive stage widths"),
    (lambda: ViTEncoder3d(5, width=10, heads=4), "width 10, heads 4"),
    (lambda: ViTEncoder3d(5, patch_size=0), "patch_size must be >= 1, got 0"),
    (lambda: ViTEncoder3d(5, depth=0), "depth must be >= 1, got 0"),
    (lambda: ViTEncoder3d(1), "in_channels"),
    (lambda: FusionNet(5, 7, encoder="vit", width=8, heads=3), "width 8, heads 3"),
    (lambda: FusionNet(5, 7, dropout=1.5), "dropout"),
])
def test_encoders_reject_bad_values_naming_them(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_vit_register_tokens_take_part_are_not_pooled_and_get_per_sample_gradients():
    from opacus import GradSampleModule

    torch.manual_seed(0)
    vit = ViTEncoder3d(5, width=8, patch_size=4, depth=1, heads=2, registers=3)
    x = _images()
    out = vit(x)
    assert out.shape == (2, 16) and vit.registers.weight.shape == (3, 8)
    with torch.no_grad():
        vit.registers.weight.add_(torch.randn(3, 8))
    assert not torch.allclose(vit(x), out)  # the patch tokens attend to the registers
    private = GradSampleModule(vit)
    private(x).sum().backward()
    assert vit.registers.weight.grad_sample.shape == (2, 3, 8)  # Opacus' per-patient gradients
    with pytest.raises(ValueError, match="registers must be >= 0"):
        ViTEncoder3d(5, width=8, heads=2, registers=-1)


def test_vit_rejects_input_not_divisible_by_patch():
    with pytest.raises(ValueError, match="not a multiple of patch_size 8"):
        ViTEncoder3d(5, width=8, patch_size=8, depth=1, heads=2)(torch.randn(1, 5, 12, 16, 16))


def test_norm_parameter_names_are_the_group_and_layer_norms():
    model = _tiny("resnet10")
    names = norm_parameter_names(model)
    state = model.state_dict()
    assert names and set(names) <= set(state)
    assert any(".norm1.weight" in n for n in names) and "image_proj.0.weight" in names
    assert "clinical_norm.weight" not in names  # the clinical vector enters as given (tabular_norm "none")
    assert not any("conv" in n for n in names)
    layered = build_model("resnet10", 5, 7, seed=0, tabular_norm="layer", **TINY["resnet10"])
    assert "clinical_norm.weight" in norm_parameter_names(layered)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("encoder", ["cnn", "resnet10", "vit"])
def test_forward_backward_on_cuda_with_mixed_precision(encoder):
    model = _tiny(encoder).cuda()
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
        logit, risk = model(_images().cuda(), torch.randn(2, 7, device="cuda"))
    (logit.float().sum() + risk.float().sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_the_wide_head_adds_a_linear_term_that_can_hold_a_logistic_model():
    from opacus import GradSampleModule

    model = build_model("cnn", 5, 7, width=4, seed=1, n_radiomics=2, head="wide").eval()
    images, clinical, radiomics = _images(3), torch.randn(3, 7), torch.randn(3, 2)
    with torch.no_grad():
        for p in model.head.parameters():
            p.zero_()  # the MLP silenced: what is left is the linear term alone
        model.wide.weight.zero_()
        model.wide.bias.zero_()
        model.wide.weight[0, -7:] = torch.arange(1.0, 8.0)  # a logistic model of the labs
        model.wide.bias[0] = -0.5
        logit, _ = model(images, clinical, radiomics)
    torch.testing.assert_close(logit, clinical @ torch.arange(1.0, 8.0) - 0.5)
    plain = build_model("cnn", 5, 7, width=4, seed=1, n_radiomics=2)
    assert plain.wide is None and set(model.state_dict()) - set(plain.state_dict()) == {"wide.weight", "wide.bias"}
    model.train()
    private = GradSampleModule(model)
    private(images, clinical, radiomics)[0].sum().backward()
    assert model.wide.weight.grad_sample.shape == (3, 2, model.wide.in_features)  # DP-SGD works with it
    with pytest.raises(ValueError, match="head must be one of"):
        build_model("cnn", 5, 7, width=4, head="deep")
