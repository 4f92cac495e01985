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
                         (broken, "nan.safetensors: NaN or infinite numbers in the learned word"),
                         (tmp_path / "none.safetensors", "none.safetensors does not exist")]:
        with pytest.raises(PVAIdentityError, match=message):
            load_pva_identity(str(bad))


def test_shapes_that_do_not_fit_are_refused():
    good = an_identity()
    with pytest.raises(PVAIdentityError, match=r"learned word has shape \(512,\)"):
        PVAIdentity(good.visual_tokens, good.projections, torch.zeros(512))
    wrong = {"layer": VisualProjections(torch.zeros(320, 320), torch.zeros(320, 1024), torch.zeros(320, 1024))}
    with pytest.raises(PVAIdentityError, match="must share their first size and take 768-d tokens"):
        PVAIdentity(good.visual_tokens, wrong, good.word)


@pytest.mark.parametrize("part, value, message", [
    ("tokens", 1e30, r"A size \(norm\) of up to .* in the visual tokens; the limit is 1000"),
    ("word", 1e3, r"A size \(norm\) of up to .* in the learned word; the limit is 100"),
    ("to_k", 1e4, r"visual projection to_k of layer middle_block.1.transformer_blocks.0.attn2 has weights up to 1e\+04; the limit is 100"),
])
def test_finite_numbers_far_beyond_what_training_makes_are_refused(tmp_path, part, value, message):
    """Finite but enormous numbers would make an all-NaN image: refused as SeFi refuses its tokens, also in a file."""
    good = an_identity()
    tokens, word, projections = good.visual_tokens.clone(), good.word.clone(), dict(good.projections)
    if part == "tokens":
        tokens[3, 0] = value
    elif part == "word":
        word[0] = value
    else:
        name = "middle_block.1.transformer_blocks.0.attn2"
        p = projections[name]
        projections[name] = VisualProjections(p.to_q, p.to_k.clone().fill_(value), p.to_v)
    with pytest.raises(PVAIdentityError, match=message):
        PVAIdentity(tokens, projections, word)
    path = save_pva_identity(good, str(tmp_path / "good.safetensors"))
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = {"tokens": "pva.visual_tokens", "word": "pva.word",
           "to_k": "pva.layers.middle_block.1.transformer_blocks.0.attn2.to_k"}[part]
    tensors[key] = tensors[key].float() * 0 + value if part == "to_k" else {"tokens": tokens, "word": word}[part]
    save_file(tensors, str(tmp_path / "huge.safetensors"), metadata=metadata)
    with pytest.raises(PVAIdentityError, match="huge.safetensors: .*" + message):
        load_pva_identity(str(tmp_path / "huge.safetensors"))


def test_what_a_node_returns_is_what_its_file_gives_back(tmp_path):
    """as_stored: the projections rounded as the file stores them, so that an identity fine-tuned in the graph and
    the same identity loaded from its file give one result."""
    from sefi_core.pva.identity import as_stored
    identity = an_identity()
    returned = PVAIdentity(identity.visual_tokens, as_stored(identity.projections), identity.word, "sks")
    loaded = load_pva_identity(save_pva_identity(returned, str(tmp_path / "once.safetensors")))
    for name, p in returned.projections.items():
        assert all(torch.equal(a, b) for a, b in zip(loaded.projections[name].tensors(), p.tensors()))
    assert not all(torch.equal(a, b) for a, b in zip(identity.projections[name].tensors(), p.tensors()))  # it rounds
