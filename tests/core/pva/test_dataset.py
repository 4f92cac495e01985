"""The folder PVA's encoder trains on (sefi_core/pva/dataset.py), host-free: who is in it, what a draw holds, the
face region where a photo has no mask, and refusals that say what to change."""
import collections

import numpy as np
import pytest
import torch
from PIL import Image

from sefi_core.pva.dataset import (ALIGNED_FACE_BOX, DatasetError, FaceDataset, MaskBank, box_mask, parse_box,
                                   read_caption, read_mask, read_photo)


def write_photo(path, value, size=(40, 30)):
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


@pytest.fixture
def dataset_dir(tmp_path):
    for person, count in (("ann", 3), ("bob", 7), ("cid", 1)):
        (tmp_path / person).mkdir()
        for k in range(count):
            write_photo(tmp_path / person / f"{k}.png", 10 * k + 1)
    mask = np.zeros((30, 40), np.uint8)
    mask[5:20, 10:30] = 255
    Image.fromarray(mask).save(tmp_path / "ann" / "0.mask.png")
    (tmp_path / "notes.txt").write_text("not a person")
    return tmp_path


def test_people_are_sub_folders_with_two_photos_or_more_and_masks_sit_beside_their_photos(dataset_dir):
    dataset = FaceDataset(str(dataset_dir))
    assert dataset.names == ["ann", "bob"] and dataset.too_few == ["cid"] and dataset.photo_count == 10
    ann = {p.path.rsplit("/", 1)[1]: p.mask for p in dataset.people[0]}
    assert set(ann) == {"0.png", "1.png", "2.png"} and ann["0.png"].endswith("0.mask.png") and ann["1.png"] is None
    assert dataset.digest() == FaceDataset(str(dataset_dir)).digest()
    write_photo(dataset_dir / "bob" / "7.png", 0)
    assert dataset.digest() != FaceDataset(str(dataset_dir)).digest()


def test_a_draw_is_one_persons_target_and_one_to_five_of_their_other_photos(dataset_dir):
    dataset = FaceDataset(str(dataset_dir))
    g = torch.Generator().manual_seed(0)
    counts, flips = collections.Counter(), 0
    for _ in range(2000):
        drawn = dataset.draw(g)
        folder = drawn.target.path.rsplit("/", 2)[1]
        assert all(p.path.rsplit("/", 2)[1] == folder for p in drawn.references)
        assert drawn.target not in drawn.references and len(set(drawn.references)) == len(drawn.references)
        counts[(folder, len(drawn.references))] += 1
        flips += drawn.flip_last
    assert {n for f, n in counts if f == "ann"} == {1, 2} and {n for f, n in counts if f == "bob"} == {1, 2, 3, 4, 5}
    assert 0.17 < flips / 2000 < 0.23  # the authors' 20%
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert [dataset.draw(g1).target for _ in range(20)] == [dataset.draw(g2).target for _ in range(20)]


def test_folders_that_cannot_be_trained_on_are_refused_with_what_to_do(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        FaceDataset(str(tmp_path / "missing"))
    (tmp_path / "solo").mkdir()
    for k in range(3):
        write_photo(tmp_path / "solo" / f"{k}.jpg", k)
    with pytest.raises(DatasetError, match="1 person folder.*one sub-folder per person"):
        FaceDataset(str(tmp_path))


def test_photos_and_masks_are_read_as_centre_squares_and_boxes_are_fractions(dataset_dir):
    photo = read_photo(str(dataset_dir / "bob" / "2.png"), 16)
    assert photo.shape == (3, 16, 16) and torch.allclose(photo, torch.full_like(photo, 21 / 255))
    mask = read_mask(str(dataset_dir / "ann" / "0.mask.png"), 30)  # the centre 30x30 of a 40x30 mask: columns 5-35
    expected = torch.zeros(30, 30)
    expected[5:20, 5:25] = 1
    assert torch.equal(mask, expected)
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(dataset_dir / "black.png")
    with pytest.raises(DatasetError, match="nothing to inpaint"):
        read_mask(str(dataset_dir / "black.png"), 30)
    assert torch.equal(box_mask((0.25, 0.5, 0.75, 1.0), 8)[4:, 2:6], torch.ones(4, 4))
    assert box_mask((0.25, 0.5, 0.75, 1.0), 8).sum() == 16
    assert parse_box("0.125, 0.137, 0.859, 0.871") == pytest.approx(ALIGNED_FACE_BOX, abs=1e-3)
    for bad in ("0.5, 0.5, 0.4, 0.9", "1, 2", "a, b, c, d", "0, 0, 1.5, 1"):
        with pytest.raises(DatasetError, match="left, top, right, bottom"):
            parse_box(bad)


def test_captions_sit_beside_their_photos_and_are_read_as_one_line(dataset_dir):
    before = FaceDataset(str(dataset_dir)).digest()
    (dataset_dir / "bob" / "2.txt").write_text("She has long\nblond hair  and is smiling.\n", encoding="utf-8")
    dataset = FaceDataset(str(dataset_dir))
    bob = {p.path.rsplit("/", 1)[1]: p.caption for p in dataset.people[1]}
    assert bob["2.png"].endswith("2.txt") and bob["1.png"] is None and len(bob) == 7  # a caption is not a photo
    assert read_caption(bob["2.png"]) == "She has long blond hair and is smiling."
    assert dataset.digest() != before  # a continued run can tell that captions came
    (dataset_dir / "bob" / "3.txt").write_text("  \n")
    (dataset_dir / "bob" / "4.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DatasetError, match="3.txt is empty. Write what the photo shows"):
        read_caption(str(dataset_dir / "bob" / "3.txt"))
    with pytest.raises(DatasetError, match="4.txt could not be read as a UTF-8 caption"):
        read_caption(str(dataset_dir / "bob" / "4.txt"))


def test_random_masks_are_drawn_from_the_runs_generator_as_centre_squares(tmp_path):
    for k in range(3):  # mask k: white in column band k of a 60x40 image
        image = np.zeros((40, 60), np.uint8)
        image[:, 10 + 10 * k:20 + 10 * k] = 255
        Image.fromarray(image).save(tmp_path / f"{k}.png")
    (tmp_path / "readme.txt").write_text("not a mask")
    bank = MaskBank(str(tmp_path))
    assert [p.rsplit("/", 1)[1] for p in bank.paths] == ["0.png", "1.png", "2.png"]
    draws = [bank.draw(torch.Generator().manual_seed(seed), 20) for seed in range(12)]
    expected = {}
    for k in range(3):  # the centre 40x40 square (columns 10-50) at half size: band k at columns 5k to 5k+5
        mask = torch.zeros(20, 20)
        mask[:, 5 * k:5 * k + 5] = 1
        expected[k] = mask
    picks = [int(torch.randint(3, (1,), generator=torch.Generator().manual_seed(seed))) for seed in range(12)]
    assert all(torch.equal(d, expected[k]) for d, k in zip(draws, picks)) and len(set(picks)) == 3
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="has no .png masks"):
        MaskBank(str(tmp_path / "empty"))
    with pytest.raises(DatasetError, match="does not exist. Give a folder of mask images"):
        MaskBank(str(tmp_path / "missing"))


def test_a_face_mask_that_does_not_fit_its_photo_is_refused_when_the_folder_is_read(dataset_dir):
    """A 16x64 mask beside a 40x30 photo would be fitted into a mask over everything: refused, naming both sizes."""
    Image.fromarray(np.full((64, 16), 255, np.uint8)).save(dataset_dir / "bob" / "2.mask.png")
    with pytest.raises(DatasetError, match=r"The face mask .*bob.2\.mask\.png is 16x64 pixels, its photo 40x30"):
        FaceDataset(str(dataset_dir))


def test_a_decompression_bomb_is_refused_naming_the_photo(dataset_dir, monkeypatch):
    """PIL refuses to decode an image of too many pixels (a decompression bomb) with its own error; the dataset names
    the photo instead, when the folder is read and when a photo is read later."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the 40x30 photos are 'bombs' now (over twice the limit)
    with pytest.raises(DatasetError, match=r"ann.0\.png could not be read as an image \(Image size \(1200 pixels\)"):
        FaceDataset(str(dataset_dir))
    with pytest.raises(DatasetError, match=r"bob.1\.png could not be read as an image"):
        read_photo(str(dataset_dir / "bob" / "1.png"), 16)
