"""Self-supervised pretraining: the masked autoencoder's objective, the federated average, the encoder file."""

from collections import OrderedDict

import pytest
import torch

from hccfed.client.pretraining import pretrain_local
from hccfed.client.training import TrainSettings
from hccfed.common.models.fusion import build_model
from hccfed.common.models.pretrain import MaskedAutoencoder3d, load_pretrained_encoder
from hccfed.common.run_config import RunConfig
from hccfed.simulation.pretraining import federated_pretraining, weighted_average


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
    with pytest.raises(ValueError, match="cnn encoder"):
        federated_pretraining({"a": _scans(2)}, RunConfig(encoder="vit"), 1, tmp_path / "x.pt")


def test_simulate_takes_the_encoder_file_as_an_absolute_path_and_refuses_a_missing_one(tmp_path, monkeypatch):
    from hccfed_cli import _with_encoder_file

    (tmp_path / "encoder.pt").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert _with_encoder_file(RunConfig(pretrained_encoder="encoder.pt")).pretrained_encoder == str(
        tmp_path.resolve() / "encoder.pt")
    assert _with_encoder_file(RunConfig()).pretrained_encoder == ""
    with pytest.raises(ValueError, match="no such file"):
        _with_encoder_file(RunConfig(pretrained_encoder="other.pt"))
