"""Identity format: save, load, validation (host-free)."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from sefi_core.names import validate_class_word
from sefi_core.sefi.identity import FAMILIES, FORMAT_VERSION, Identity, IdentityError, load_identity, save_identity


def make_identity(stages=5, seed=0, family="sd1", **kw):
    g = torch.Generator().manual_seed(seed)
    width = sum(FAMILIES[family])
    return Identity(k_tokens=torch.randn(stages, width, generator=g) * 0.03,
                    v_tokens=torch.randn(stages, width, generator=g) * 0.03, trigger=kw.pop("trigger", "sks"),
                    family=family, **kw)


@pytest.mark.parametrize("stages", [1, 5, 10])
def test_roundtrip_keeps_tokens_and_metadata(tmp_path, stages):
    ident = make_identity(stages, class_word="cat", base_model="abc123", training={"steps": 3, "lr": 0.005})
    path = save_identity(ident, tmp_path / "anna.safetensors")
    back = load_identity(path)
    assert torch.equal(back.k_tokens, ident.k_tokens) and torch.equal(back.v_tokens, ident.v_tokens)
    assert (back.trigger, back.class_word, back.base_model) == ("sks", "cat", "abc123")
    assert back.training == {"steps": 3, "lr": 0.005}
    assert back.boundaries == ident.boundaries and back.stage_count == stages
    assert os.path.getsize(path) < 70_000  # ~30 KB for 5 stages, as promised
    assert os.listdir(tmp_path) == ["anna.safetensors"]  # no temp file left behind


def test_existing_file_is_not_overwritten_silently(tmp_path):
    path = save_identity(make_identity(seed=1), tmp_path / "a.safetensors")
    with pytest.raises(IdentityError, match="already exists.*overwrite"):
        save_identity(make_identity(seed=2), path)
    assert torch.equal(load_identity(path).k_tokens, make_identity(seed=1).k_tokens)
    save_identity(make_identity(seed=2), path, overwrite=True)
    assert torch.equal(load_identity(path).k_tokens, make_identity(seed=2).k_tokens)


def test_truncated_file_names_file(tmp_path):
    path = save_identity(make_identity(), tmp_path / "cut.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(IdentityError, match="cut.safetensors.*truncated"):
        load_identity(path)


def test_foreign_safetensors_is_rejected(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"w": torch.zeros(2, 2)}, str(path))
    with pytest.raises(IdentityError, match="lora.safetensors.*not a SeFi identity"):
        load_identity(path)


def _write_raw(path, k, v, **meta):
    """An identity file as written by hand; version 1, the SD1.x format from before SDXL, unless `meta` says."""
    base = {"sefi.format": "sefi-identity", "sefi.format_version": "1", "sefi.trigger": "sks",
            "sefi.class_word": "person", "sefi.stage_count": str(k.shape[0]),
            "sefi.stage_boundaries": json.dumps([1000, 800, 600, 400, 200, 0][: k.shape[0] + 1] if k.shape[0] == 5 else [1000, 0])}
    base.update(meta)
    save_file({"sefi.k_tokens": k, "sefi.v_tokens": v}, str(path), metadata=base)


@pytest.mark.parametrize("k, v, meta, message", [
    (torch.zeros(5, 512), torch.zeros(5, 512), {}, r"\(stages, 768\)"),
    (torch.zeros(5, 768), torch.zeros(4, 768), {}, "shapes"),
    (torch.full((5, 768), float("nan")), torch.zeros(5, 768), {}, "NaN"),
    (torch.zeros(5, 768), torch.zeros(5, 768), {"sefi.format_version": "99"}, "Update the node pack"),
    (torch.zeros(5, 768), torch.zeros(5, 768), {"sefi.trigger": " "}, "trigger word is empty"),
    (torch.zeros(5, 768), torch.zeros(5, 768), {"sefi.stage_boundaries": "[1000, 0]"}, "boundaries"),
    (torch.zeros(5, 768), torch.zeros(5, 768), {"sefi.stage_count": "x"}, "stage_count"),
    (torch.zeros(5, 768), torch.zeros(5, 768), {"sefi.stage_boundaries": "5"},
     r"metadata 'sefi.stage_boundaries' is '5'; it must be a list of 6 timesteps from 1000 down to 0\. The file is damaged"),
    (torch.zeros(5, 768), torch.zeros(5, 768), {"sefi.stage_boundaries": "[1000, 800, 600, 400, 200, null]"},
     r"metadata 'sefi.stage_boundaries' is '\[1000, 800, 600, 400, 200, null\]'; it must be a list of 6 timesteps"),
    (torch.zeros(5, 768), torch.zeros(5, 768), {"sefi.stage_boundaries": "[1000, 800"}, "'sefi.stage_boundaries'"),
    (torch.zeros(5, 768), torch.zeros(5, 768), {"sefi.format_version": "0"},
     r"metadata 'sefi.format_version' is '0'; it must be a format version \(a whole number from 1\)"),
    (torch.zeros(5, 768), torch.zeros(5, 768), {"sefi.training": "[1, 2]"},
     r"metadata 'sefi.training' is '\[1, 2\]'; it must be an object of training settings"),
    (torch.zeros(5, 768), torch.zeros(5, 768), {"sefi.training": "{oops"}, "metadata 'sefi.training'"),
    (torch.zeros(5, 768), torch.zeros(5, 768), {"sefi.trigger": "!!!"},
     r"metadata 'sefi.trigger' is '!!!'; it must be the trigger word.*has no letter or digit"),
    (torch.zeros(5, 768), torch.zeros(5, 768), {"sefi.trigger": "Person"}, "is the class word itself"),
    (torch.zeros(5, 768), torch.zeros(5, 768), {"sefi.class_word": "(dog)"}, "metadata 'sefi.class_word'"),
    (torch.full((5, 768), 1e30), torch.zeros(5, 768), {},
     r"size \(L2 norm\) of up to .*the limit\. The training that made it diverged: retrain it with a lower learning rate"),
    (torch.full((5, 768), 1e300, dtype=torch.float64), torch.zeros(5, 768, dtype=torch.float64), {},
     "too large for float32"),
])
def test_malformed_files_are_rejected_with_the_file_name(tmp_path, k, v, meta, message):
    path = tmp_path / "bad.safetensors"
    _write_raw(path, k, v, **meta)
    with pytest.raises(IdentityError, match=message) as err:
        load_identity(path)
    assert "bad.safetensors" in str(err.value)


def test_integer_tokens_are_rejected(tmp_path):
    path = tmp_path / "int.safetensors"
    _write_raw(path, torch.zeros(5, 768, dtype=torch.int32), torch.zeros(5, 768, dtype=torch.int32))
    with pytest.raises(IdentityError, match="floating point"):
        load_identity(path)


@pytest.mark.parametrize("word, expected", [("person", "person"), ("golden retriever", "golden retriever"),
                                            ("  teddy   bear ", "teddy bear")])
def test_class_words_of_a_few_words(word, expected, tmp_path):
    assert validate_class_word(word) == expected
    path = save_identity(make_identity(class_word=word), tmp_path / "x.safetensors")
    assert load_identity(path).class_word == expected


def test_sdxl_identity_records_its_family_and_widths(tmp_path):
    ident = make_identity(family="sdxl", class_word="cat")
    path = save_identity(ident, tmp_path / "xl.safetensors")
    back = load_identity(path)
    assert (back.family, back.widths, back.k_tokens.shape) == ("sdxl", (768, 1280), (5, 2048))
    assert torch.equal(back.k_tokens, ident.k_tokens) and torch.equal(back.v_tokens, ident.v_tokens)
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert (meta["sefi.format_version"], meta["sefi.family"], json.loads(meta["sefi.token_widths"])) == \
        (str(FORMAT_VERSION), "sdxl", [768, 1280])
    assert FORMAT_VERSION == 2


def test_sd1_identities_stay_format_version_1(tmp_path):
    """A pack from before SDXL reads version 1 only: SD1.x files stay readable by it."""
    from safetensors import safe_open
    path = save_identity(make_identity(), tmp_path / "sd1.safetensors")
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert (meta["sefi.format_version"], meta["sefi.family"]) == ("1", "sd1")
    assert load_identity(path).family == "sd1"


def test_old_sd1_file_without_family_loads_as_sd1(tmp_path):
    path = tmp_path / "old.safetensors"
    _write_raw(path, torch.zeros(5, 768), torch.zeros(5, 768))
    assert load_identity(path).family == "sd1"


@pytest.mark.parametrize("k, meta, message", [
    (torch.zeros(5, 2048), {}, "'sefi.family' is missing"),
    (torch.zeros(5, 2048), {"sefi.family": "flux"}, "'sefi.family' is 'flux'"),
    (torch.zeros(5, 2048), {"sefi.family": "sdxl", "sefi.token_widths": "[1280, 768]"}, "token_widths"),
    (torch.zeros(5, 768), {"sefi.family": "sdxl"}, r"\(stages, 2048\).*SDXL word embeddings: 768 \+ 1280"),
    (torch.zeros(5, 2048), {"sefi.family": "sd1"}, r"\(stages, 768\)"),
])
def test_malformed_version_2_files_are_rejected(tmp_path, k, meta, message):
    path = tmp_path / "bad2.safetensors"
    _write_raw(path, k, k.clone(), **{"sefi.format_version": "2", **meta})
    with pytest.raises(IdentityError, match=message) as err:
        load_identity(path)
    assert "bad2.safetensors" in str(err.value)
