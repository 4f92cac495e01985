"""PVA's face recognizer (iresnet, InsightFace's layout) and identity encoder, host-free."""
import pytest
import torch

from sefi_core.pva.encoder import IdentityEncoder
from sefi_core.pva.face import IResNet, depth_of, face_crop


def test_iresnet50_has_arcface_torchs_parameter_names_and_shapes():
    """So that InsightFace's published ms1mv3_arcface_r50 state dict loads by name (strict)."""
    state = IResNet("r50").state_dict()
    expected = {"conv1.weight": (64, 3, 3, 3), "prelu.weight": (64,), "layer1.0.bn1.running_var": (64,),
                "layer1.0.downsample.0.weight": (64, 64, 1, 1), "layer1.0.downsample.1.weight": (64,),
                "layer3.13.conv2.weight": (256, 256, 3, 3), "layer4.2.prelu.weight": (512,),
                "bn2.num_batches_tracked": (), "fc.weight": (512, 512 * 7 * 7), "features.running_mean": (512,)}
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert "layer3.14.conv1.weight" not in state and "layer1.1.downsample.0.weight" not in state
    blocks = {k.split(".")[0] + "." + k.split(".")[1] for k in state if k.startswith("layer")}
    assert len(blocks) == 3 + 4 + 14 + 3
    assert depth_of(state) == "r50" and depth_of(IResNet("r100").state_dict()) == "r100"
    with pytest.raises(ValueError, match="none of the iresnets"):
        depth_of({k: v for k, v in state.items() if not k.startswith("layer4.2.")})


def test_iresnet_gives_one_512_d_feature_per_face():
    net = IResNet("r18").eval()
    with torch.no_grad():
        features = net(torch.rand(2, 3, 112, 112) * 2 - 1)
    assert features.shape == (2, 512) and torch.isfinite(features).all()


def test_face_crop_keeps_the_authors_face_region():
    """Rows 35:223 and columns 32:220 of the 256 px photo, nothing outside: a photo white exactly there comes out
    all +1, its complement all -1."""
    inside = torch.zeros(1, 3, 256, 256)
    inside[:, :, 35:223, 32:220] = 1
    assert face_crop(inside).shape == (1, 3, 112, 112)
    assert torch.equal(face_crop(inside), torch.ones(1, 3, 112, 112))
    assert torch.equal(face_crop(1 - inside), -torch.ones(1, 3, 112, 112))
    shifted = torch.zeros(1, 3, 256, 256)
    shifted[:, :, 36:224, 32:220] = 1  # one row off: the top row of the crop is no longer white
    assert not torch.equal(face_crop(shifted), torch.ones(1, 3, 112, 112))


def test_the_encoder_maps_references_to_ten_visual_tokens_whatever_their_order():
    torch.manual_seed(0)
    encoder = IdentityEncoder(context_dim=768).eval()
    features = torch.randn(2, 4, 512)
    with torch.no_grad():
        tokens = encoder(features)
        shuffled = encoder(features[:, [2, 0, 3, 1]])
        other = encoder(torch.randn(2, 4, 512))
    assert tokens.shape == (2, 10, 768)
    torch.testing.assert_close(shuffled, tokens, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(other, tokens, atol=1e-3)
    assert torch.equal(encoder.position, torch.zeros(10, 768))


def test_every_encoder_weight_learns_from_the_tokens():
    encoder = IdentityEncoder(context_dim=64, heads=8).train()
    encoder(torch.randn(1, 3, 512)).pow(2).mean().backward()
    assert all(p.grad is not None and float(p.grad.abs().max()) > 0 for p in encoder.parameters())
