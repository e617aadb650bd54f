"""Self-supervised pretraining: the masked autoencoder's and DINO's objectives, the federated average, the
encoder file."""

from collections import OrderedDict

import pytest
import torch

from hccfed.client.pretraining import pretrain_local
from hccfed.client.training import TrainSettings
from hccfed.common.models.fusion import build_model
from hccfed.common.models.pretrain import DinoViT3d, MaskedAutoencoder3d, load_pretrained_encoder, pretraining_model, \
    weighted_average
from hccfed.common.run_config import RunConfig
from hccfed.simulation.pretraining import federated_pretraining


def _scans(n, seed=0, size=16):
    """Each scan: a level per phase, the tumour enhanced by its own amount per phase, a little noise, so
    hidden voxels are predictable from the visible ones."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(size, size, size)
    mask[4:10, 4:10, 4:10] = 1.0
    level, enhancement = torch.randn(n, 4, 1, 1, 1, generator=g), torch.randn(n, 4, 1, 1, 1, generator=g)
    phases = 0.2 * level + enhancement * mask + 0.1 * torch.randn(n, 4, size, size, size, generator=g)
    return torch.cat([phases, mask.expand(n, 1, size, size, size)], dim=1)


def test_hidden_voxels_are_whole_cubes_at_the_ratio_and_only_they_count():
    model = MaskedAutoencoder3d(5, width=4, patch=4, mask_ratio=0.6)
    x = _scans(64)
    hidden = model.hidden(x, torch.Generator().manual_seed(1))
    assert 0.55 < float(hidden.mean()) < 0.65
    cubes = hidden[:, 0].unfold(1, 4, 4).unfold(2, 4, 4).unfold(3, 4, 4)
    assert torch.all(cubes.amin(dim=(-1, -2, -3)) == cubes.amax(dim=(-1, -2, -3)))  # constant on each cube
    # the target of a visible voxel does not enter the loss: change it where the reconstruction does not see it
    g = torch.Generator().manual_seed(2)
    hidden = model.hidden(x[:2], g)
    with torch.no_grad():
        recon = model.reconstruct(x[:2], hidden)
    error = (recon - x[:2, :-1]) ** 2 * hidden * (1 + model.tumour_weight * x[:2, -1:])
    assert float(error.sum()) > 0 and float((error * (1 - hidden)).sum()) == 0
    with pytest.raises(ValueError, match="multiples of 8"):
        model.hidden(torch.zeros(1, 5, 12, 16, 16), g)


def test_local_pretraining_lowers_the_reconstruction_loss():
    torch.manual_seed(0)
    model = MaskedAutoencoder3d(5, width=8)
    x = _scans(24)
    with torch.no_grad():
        before = float(model.loss(x, torch.Generator().manual_seed(9)))
    metrics = pretrain_local(model, x, TrainSettings(epochs=30, learning_rate=3e-3, batch_size=8, seed=0,
                                                     augment="none"), torch.device("cpu"))
    with torch.no_grad():
        after = float(model.loss(x, torch.Generator().manual_seed(9)))
    assert metrics["num-examples"] == 24 and after < 0.8 * before


def test_federated_average_is_weighted_by_scans():
    a = OrderedDict(w=torch.tensor([0.0, 2.0]))
    b = OrderedDict(w=torch.tensor([3.0, 8.0]))
    assert torch.allclose(weighted_average([a, b], [1, 2])["w"], torch.tensor([2.0, 6.0]))


def test_pretrained_encoder_file_initialises_the_fusion_model(tmp_path):
    run = RunConfig(seed=3, encoder_width=4, batch_size=8, augment="none")
    out = federated_pretraining({"a": _scans(6, 1), "b": _scans(10, 2)}, run, rounds=2, out=tmp_path / "encoder.pt")
    assert out["scans"] == {"a": 6, "b": 10} and out["rounds"] == 2
    model = build_model("cnn", 5, 7, width=4, seed=3)
    fresh = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    meta = load_pretrained_encoder(model, str(tmp_path / "encoder.pt"))
    saved = torch.load(tmp_path / "encoder.pt", weights_only=True)["encoder"]
    assert meta["objective"].startswith("masked autoencoder")
    assert all(torch.equal(model.encoder.state_dict()[k], saved[k]) for k in saved)
    assert any(not torch.equal(fresh[k], saved[k]) for k in saved)  # it changed the encoder
    with pytest.raises(ValueError, match="does not fit"):
        load_pretrained_encoder(build_model("cnn", 5, 7, width=6), str(tmp_path / "encoder.pt"))
    with pytest.raises(ValueError, match="model's encoder is 'vit'"):
        load_pretrained_encoder(build_model("vit", 5, 7, width=8, heads=2, depth=1), str(tmp_path / "encoder.pt"))
    with pytest.raises(ValueError, match="cnn and vit encoders"):
        federated_pretraining({"a": _scans(2)}, RunConfig(encoder="resnet10"), 1, tmp_path / "x.pt")


def _dino(**kw):
    torch.manual_seed(0)
    return DinoViT3d(5, width=8, patch_size=4, depth=1, heads=2, registers=2, prototypes=16, hidden=16,
                     bottleneck=8, **kw)


def test_dino_trains_the_student_and_moves_the_teacher_by_its_average_only():
    model = _dino(teacher_momentum=0.9)
    x = _scans(8, size=16)
    loss = model.loss(x, torch.Generator().manual_seed(1))
    loss.backward()
    assert torch.isfinite(loss) and float(loss.detach()) > 0
    assert model.encoder.registers.weight.grad is not None and model.encoder.patch_embed.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.teacher_encoder.parameters())  # no gradient reaches the teacher
    assert float(model.center.abs().sum()) > 0  # the centre follows the teacher's outputs
    teacher = model.teacher_encoder.patch_embed.weight.detach().clone()
    with torch.no_grad():
        model.encoder.patch_embed.weight.add_(1.0)
    model.after_step()
    moved = model.teacher_encoder.patch_embed.weight
    assert torch.allclose(moved, 0.9 * teacher + 0.1 * model.encoder.patch_embed.weight)
    # the same generator gives the same views and loss (the run is reproducible from its seed)
    a = _dino().loss(x, torch.Generator().manual_seed(4))
    b = _dino().loss(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="multiples of the ViT patch"):
        model.loss(torch.zeros(1, 5, 6, 16, 16), torch.Generator())


def test_dino_local_views_are_sub_cubes_of_half_the_crop():
    model = _dino()
    x = torch.arange(2 * 5 * 16**3, dtype=torch.float32).reshape(2, 5, 16, 16, 16)
    crops = model._local(x, torch.Generator().manual_seed(0))
    assert crops.shape == (2, 5, 8, 8, 8)
    for crop, scan in zip(crops, x):  # each crop is a contiguous block of its own scan
        start = [int(i) for i in torch.nonzero(scan[0] == crop[0, 0, 0, 0])[0]]
        assert torch.equal(crop, scan[:, start[0]:start[0] + 8, start[1]:start[1] + 8, start[2]:start[2] + 8])


def test_dino_pretraining_initialises_the_vit_fusion_model_with_its_registers(tmp_path):
    run = RunConfig(seed=2, encoder="vit", encoder_width=8, vit_heads=2, vit_depth=1, vit_patch_size=4,
                    vit_registers=3, batch_size=4, augment="none")
    out = federated_pretraining({"a": _scans(4, 1), "b": _scans(6, 2)}, run, rounds=2, out=tmp_path / "vit.pt")
    assert out["objective"].startswith("DINO") and out["vit_registers"] == 3
    assert isinstance(pretraining_model(run, 5), DinoViT3d)
    model = build_model("vit", 5, 7, width=8, heads=2, depth=1, patch_size=4, registers=3, seed=2)
    load_pretrained_encoder(model, str(tmp_path / "vit.pt"))
    saved = torch.load(tmp_path / "vit.pt", weights_only=True)["encoder"]
    assert "registers.weight" in saved
    assert all(torch.equal(model.encoder.state_dict()[k], saved[k]) for k in saved)
    logit, _ = model(_scans(2, 5), torch.zeros(2, 7))
    assert torch.isfinite(logit).all()
    with pytest.raises(ValueError, match="does not fit"):  # a fusion ViT without the registers
        load_pretrained_encoder(build_model("vit", 5, 7, width=8, heads=2, depth=1, patch_size=4),
                                str(tmp_path / "vit.pt"))


def test_simulate_takes_the_encoder_file_as_an_absolute_path_and_refuses_a_missing_one(tmp_path, monkeypatch):
    from hccfed_cli import _with_encoder_file

    (tmp_path / "encoder.pt").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert _with_encoder_file(RunConfig(pretrained_encoder="encoder.pt")).pretrained_encoder == str(
        tmp_path.resolve() / "encoder.pt")
    assert _with_encoder_file(RunConfig()).pretrained_encoder == ""
    with pytest.raises(ValueError, match="no such file"):
        _with_encoder_file(RunConfig(pretrained_encoder="other.pt"))
