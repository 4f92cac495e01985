"""The base PVA's files record (sefi_core/pva/bases.py): SD1.5 inpainting (768-d) or SD2 inpainting (1024-d), written
by encoders and identities and read back; files from before the record are SD1.5 and load unchanged; a record that
does not fit the tensors' width, or names no base this pack knows, is refused as damaged, naming both."""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sefi_core.pva.attention import VisualProjections
from sefi_core.pva.bases import BASE_KEY, SD2_INPAINTING, SD15_INPAINTING
from sefi_core.pva.encoder import IdentityEncoder
from sefi_core.pva.identity import PVAIdentity, PVAIdentityError, load_pva_identity, save_pva_identity
from sefi_core.pva.model_files import PVAModelFileError, load_encoder, save_encoder

BASES = {"sd15": SD15_INPAINTING, "sd2": SD2_INPAINTING}
LAYER = "input_blocks.1.1.transformer_blocks.0.attn2"


def identity_of(base, width=None):
    width = width or base.context_dim
    g = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=g) * 0.05
    return PVAIdentity(make(10, width), {LAYER: VisualProjections(make(320, 320), make(320, width), make(320, width))},
                       make(width), "sks", base=base)


def rewrite(path, out, drop=(), **metadata):
    """The file at `path` written again to `out` with its metadata changed (keys in `drop` removed)."""
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(out), metadata={**{k: v for k, v in meta.items() if k not in drop}, **metadata})
    return str(out)


@pytest.mark.parametrize("name", ["sd15", "sd2"])
def test_identities_and_encoders_record_their_base_and_read_it_back(tmp_path, name):
    base = BASES[name]
    path = save_pva_identity(identity_of(base), str(tmp_path / "anna.safetensors"))
    with safe_open(path, "pt") as f:
        assert f.metadata()[BASE_KEY] == f"{name}-inpainting"
    loaded = load_pva_identity(path)
    assert loaded.base == base and loaded.visual_tokens.shape == (10, base.context_dim)
    encoder = IdentityEncoder(base.context_dim, layers=1, heads=8)
    path = save_encoder(encoder, str(tmp_path / "encoder.safetensors"), "iresnet r50", base=base)
    with safe_open(path, "pt") as f:
        assert f.metadata()[BASE_KEY] == f"{name}-inpainting" and f.metadata()["pva.context_dim"] == str(base.context_dim)
    assert load_encoder(path).base == base


def test_files_from_before_the_record_load_unchanged_as_sd15(tmp_path):
    identity = identity_of(SD15_INPAINTING)
    old = rewrite(save_pva_identity(identity, str(tmp_path / "new.safetensors")), tmp_path / "old.safetensors",
                  drop=(BASE_KEY,))
    loaded = load_pva_identity(old)
    assert loaded.base == SD15_INPAINTING and torch.equal(loaded.visual_tokens, identity.visual_tokens)
    encoder = save_encoder(IdentityEncoder(768, layers=1, heads=8), str(tmp_path / "enc.safetensors"), "iresnet r50")
    assert load_encoder(rewrite(encoder, tmp_path / "old_enc.safetensors", drop=(BASE_KEY,))).base == SD15_INPAINTING


@pytest.mark.parametrize("record, width, message", [
    ("sd2-inpainting", 768, "records base sd2-inpainting, whose context is 1024-d, but its tensors are 768-d"),
    ("sd15-inpainting", 1024, "records base sd15-inpainting, whose context is 768-d, but its tensors are 1024-d"),
    (None, 1024, r"records no base \(so sd15-inpainting\), whose context is 768-d, but its tensors are 1024-d"),
    ("sdxl", 768, "metadata pva.base is 'sdxl'; this pack knows sd15-inpainting, sd2-inpainting"),
])
def test_a_record_that_does_not_fit_the_tensors_is_refused_as_damaged(tmp_path, record, width, message):
    base = SD15_INPAINTING if width == 768 else SD2_INPAINTING
    identity = save_pva_identity(identity_of(base), str(tmp_path / "identity.safetensors"))
    encoder = save_encoder(IdentityEncoder(width, layers=1, heads=8), str(tmp_path / "enc.safetensors"), "iresnet r50",
                           base=base)
    change = {BASE_KEY: record} if record else {}
    drop = () if record else (BASE_KEY,)
    with pytest.raises(PVAIdentityError, match=f"bad.safetensors is damaged .*{message}"):
        load_pva_identity(rewrite(identity, tmp_path / "bad.safetensors", drop, **change))
    with pytest.raises(PVAModelFileError, match=f"bad_enc.safetensors is damaged .*{message}"):
        load_encoder(rewrite(encoder, tmp_path / "bad_enc.safetensors", drop, **change))


def test_a_base_that_does_not_fit_the_tensors_is_refused_when_made_and_saved(tmp_path):
    with pytest.raises(PVAIdentityError, match=r"A PVA identity for SD2 inpainting \(1024-d\) needs 1024-d visual "
                                               r"tokens; these are 768-d"):
        identity_of(SD2_INPAINTING, width=768)
    with pytest.raises(ValueError, match=r"An encoder for SD2 inpainting \(1024-d\) makes 1024-d visual tokens; this "
                                         r"one makes 768-d ones"):
        save_encoder(IdentityEncoder(768, layers=1, heads=8), str(tmp_path / "enc.safetensors"), "iresnet r50",
                     base=SD2_INPAINTING)
    assert not (tmp_path / "enc.safetensors").exists()
