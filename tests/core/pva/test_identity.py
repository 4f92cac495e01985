"""PVA identity files: round trip, small and validated, never unpickled."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from sefi_core.pva.attention import VisualProjections
from sefi_core.pva.identity import PVAIdentity, PVAIdentityError, load_pva_identity, save_pva_identity


def an_identity(layers=("input_blocks.1.1.transformer_blocks.0.attn2", "middle_block.1.transformer_blocks.0.attn2")):
    g = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=g) * 0.05
    projections = {name: VisualProjections(make(320, 320), make(320, 768), make(320, 768)) for name in layers}
    return PVAIdentity(make(10, 768), projections, make(768), "sks", base_model="0123456789abcdef",
                       recognizer="iresnet r50", encoder="feedbeef", settings={"steps": 40, "lr": 2e-5})


def test_a_pva_identity_round_trips_with_its_projections_in_fp16(tmp_path):
    identity = an_identity()
    path = save_pva_identity(identity, str(tmp_path / "anna.safetensors"))
    loaded = load_pva_identity(path)
    assert torch.equal(loaded.visual_tokens, identity.visual_tokens) and torch.equal(loaded.word, identity.word)
    assert loaded.projections.keys() == identity.projections.keys()
    for name, p in identity.projections.items():
        for ours, theirs in zip(loaded.projections[name].tensors(), p.tensors()):
            assert torch.equal(ours, theirs.half().float())
    assert (loaded.trigger, loaded.base_model, loaded.recognizer, loaded.encoder, loaded.settings) == \
        ("sks", "0123456789abcdef", "iresnet r50", "feedbeef", {"steps": 40, "lr": 2e-5})
    assert {t.dtype for k, t in load_file(path).items() if k.startswith("pva.layers.")} == {torch.float16}
    with pytest.raises(PVAIdentityError, match="already exists"):
        save_pva_identity(identity, path)


def test_bad_pva_identity_files_are_refused_with_what_to_do(tmp_path):
    path = save_pva_identity(an_identity(), str(tmp_path / "good.safetensors"))
    tensors = load_file(path)
    foreign = tmp_path / "lora.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    damaged = tmp_path / "damaged.safetensors"
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    save_file({k: v for k, v in tensors.items() if not k.endswith("middle_block.1.transformer_blocks.0.attn2.to_v")},
              str(damaged), metadata=metadata)
    newer = tmp_path / "newer.safetensors"
    save_file(tensors, str(newer), metadata={**metadata, "sefi.format_version": "9"})
    broken = tmp_path / "nan.safetensors"
    save_file({**tensors, "pva.word": torch.full((768,), float("nan"))}, str(broken), metadata=metadata)
    for bad, message in [(foreign, "lora.safetensors is a .safetensors file but not a PVA identity"),
                         (damaged, "damaged.safetensors is damaged"),
                         (newer, "newer.safetensors has format version 9; this pack reads up to 1"),
                         (broken, "nan.safetensors: The PVA identity holds NaN"),
                         (tmp_path / "none.safetensors", "none.safetensors does not exist")]:
        with pytest.raises(PVAIdentityError, match=message):
            load_pva_identity(str(bad))


def test_shapes_that_do_not_fit_are_refused():
    good = an_identity()
    with pytest.raises(PVAIdentityError, match=r"learned word has shape \(512,\)"):
        PVAIdentity(good.visual_tokens, good.projections, torch.zeros(512))
    wrong = {"layer": VisualProjections(torch.zeros(320, 320), torch.zeros(320, 1024), torch.zeros(320, 1024))}
    with pytest.raises(PVAIdentityError, match="do not fit 768-d tokens"):
        PVAIdentity(good.visual_tokens, wrong, good.word)
