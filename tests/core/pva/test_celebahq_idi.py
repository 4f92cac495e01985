"""CelebAHQ-IDI in its authors' published layout (sefi_core/pva/celebahq_idi.py), host-free, on a tiny copy written
in that layout (sefi_testkit/celebahq_idi.py): which layout a folder is, the identity splits, draws as the authors'
training draws (targets, 1-5 references, mirroring, face regions joined with random masks, captions), determinism,
and every part of a broken download refused by name before any training."""
import collections
import json
import shutil

import pytest
import torch
from PIL import Image

from sefi_core.pva.celebahq_idi import REGIONS, CelebAHQIDI
from sefi_core.pva.dataset import (ALIGNED_FACE_BOX, BoxMask, DatasetError, FaceDataset, box_mask, open_dataset,
                                   read_caption, read_drawn_photo, read_mask, read_photo)
from sefi_testkit.celebahq_idi import NO_LANDMARKS, RESOLUTION, write_celebahq_idi


@pytest.fixture
def idi(tmp_path):
    return write_celebahq_idi(tmp_path / "celebahq")


def index(photo) -> int:
    return int(photo.path.rsplit("/", 1)[1].split(".")[0])


def pixel_region(written, image, region, size):
    """(size, size): the region's box as the authors paint it (top, left, bottom, right scaled from 1024 px, floored);
    the aligned face box where the landmarks were not found."""
    top, left, bottom, right = (int(v * size // RESOLUTION) for v in written.boxes[region][image].tolist())
    if bottom <= top or right <= left:
        return box_mask(ALIGNED_FACE_BOX, size)
    mask = torch.zeros(size, size)
    mask[top:bottom, left:right] = 1
    return mask


def test_the_layout_is_told_apart_from_a_folder_of_people_and_only_celebahq_idi_has_held_out_splits(idi, tmp_path):
    assert isinstance(open_dataset(str(idi.root)), CelebAHQIDI)
    above = open_dataset(str(tmp_path))  # the folder the download unpacks into, celebahq/ inside it
    assert isinstance(above, CelebAHQIDI) and above.root == str(idi.root)
    people = tmp_path / "people"
    for person in ("ann", "bob"):
        (people / person).mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (8, 8), (k, 0, 0)).save(people / person / f"{k}.png")
    assert isinstance(open_dataset(str(people)), FaceDataset)
    with pytest.raises(DatasetError, match="is a folder of people: it has no 'val' split, only 'train'"):
        open_dataset(str(people), "val")
    with pytest.raises(DatasetError, match="The split 'validation' is not one of train, val, test"):
        open_dataset(str(idi.root), "validation")
    with pytest.raises(DatasetError, match="does not exist"):
        open_dataset(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_each_split_holds_its_identities_and_their_images(idi, split):
    dataset = open_dataset(str(idi.root), split)
    assert dataset.names == sorted(idi.identities[split]) and not dataset.too_few and not dataset.absent
    assert sorted(index(p) for person in dataset.people for p in person) == idi.images(split)
    assert dataset.photo_count == len(idi.images(split))
    for name, person in zip(dataset.names, dataset.people):
        assert sorted(index(p) for p in person) == sorted(idi.identities[split][name])
        for photo in person:  # CelebA-Dialog's overall caption, none where it has no entry
            assert (read_caption(photo.caption) if photo.caption else None) == idi.captions.get(index(photo))
    listed = dataset.identities()
    assert [i.name for i in listed] == dataset.names
    for identity in listed:
        assert [index(p) for p in identity.references] == idi.references(identity.name)
        assert [index(p) for p in identity.inferences] == idi.inferences(identity.name)
        for photo in identity.inferences:  # inpainted in the whole-face region, as the authors evaluate
            assert torch.equal(read_mask(photo.mask, 32), pixel_region(idi, index(photo), "wholeface", 32))
            regions = dataset.region_masks(photo)
            assert set(regions) == set(REGIONS)
            assert all(torch.equal(read_mask(regions[r], 32), pixel_region(idi, index(photo), r, 32)) for r in REGIONS)


def test_draws_sample_as_the_authors_training_does(idi):
    dataset = open_dataset(str(idi.root))
    images = idi.images("train")
    identity_of = {i: name for name, indices in idi.identities["train"].items() for i in indices}
    g = torch.Generator().manual_seed(0)
    targets, counts, randoms = (collections.Counter() for _ in range(3))
    flips = mirrored_targets = mirrored_references = references = captioned = 0
    draws = 4000
    size = 32
    for _ in range(draws):
        drawn = dataset.draw(g)
        target = index(drawn.target)
        targets[target] += 1
        refs = [index(p) for p in drawn.references]
        assert target not in refs and len(set(refs)) == len(refs)
        assert all(identity_of[r] == identity_of[target] for r in refs)
        counts[len(refs)] += 1
        flips += drawn.flip_last
        mirrored_targets += drawn.target.mirrored
        mirrored_references += sum(p.mirrored for p in drawn.references)
        references += len(refs)
        captioned += drawn.target.caption is not None
        # the target's mask: one region's box (mirrored with the photo), joined with one of the random masks
        mask = read_mask(drawn.target.mask, size)
        assert drawn.target.mask.mirrored == drawn.target.mirrored
        random = next(k for k, path in enumerate(idi.masks) if str(path) == drawn.target.mask.random)
        band = torch.zeros(size, size)
        band[random * size // 4:(random + 1) * size // 4] = 1
        matches = [r for r in REGIONS if torch.equal(mask, torch.maximum(
            pixel_region(idi, target, r, size).flip(-1) if drawn.target.mirrored else pixel_region(idi, target, r, size),
            band))]
        assert matches, (target, drawn.target.mask)
        randoms[random] += 1
    assert set(targets) == set(images)  # every image of the split is a target, each about as often
    assert all(abs(n / draws - 1 / len(images)) < 0.02 for n in targets.values())
    assert set(counts) == {1, 2, 3, 4, 5} and all(abs(n / draws - 0.2) < 0.03 for n in counts.values())
    assert abs(flips / draws - 0.2) < 0.03  # a mirrored copy of the last reference, 20% of the time
    assert abs(mirrored_targets / draws - 0.5) < 0.03 and abs(mirrored_references / references - 0.5) < 0.03
    assert all(abs(n / draws - 1 / 3) < 0.03 for n in randoms.values()) and len(randoms) == 3
    assert abs(captioned / draws - (len(images) - 1) / len(images)) < 0.03  # one image has no caption


def test_each_of_the_three_regions_is_drawn_a_third_of_the_time_and_empty_boxes_fall_back_to_the_aligned_face(idi):
    dataset = open_dataset(str(idi.root))
    g = torch.Generator().manual_seed(1)
    picks, fallback = collections.Counter(), 0
    for _ in range(3000):
        drawn = dataset.draw(g)
        image = index(drawn.target)
        if image == NO_LANDMARKS:
            fallback += 1
            assert drawn.target.mask.box == ALIGNED_FACE_BOX
            continue
        boxes = {r: tuple(v / RESOLUTION for v in idi.boxes[r][image][[1, 0, 3, 2]].tolist()) for r in REGIONS}
        picks[next(r for r in REGIONS if boxes[r] == drawn.target.mask.box)] += 1
    assert fallback > 0 and set(picks) == set(REGIONS)
    assert all(abs(n / sum(picks.values()) - 1 / 3) < 0.03 for n in picks.values())


def test_mirrored_photos_are_read_mirrored(idi):
    dataset = open_dataset(str(idi.root))
    g = torch.Generator().manual_seed(2)
    drawn = next(d for d in (dataset.draw(g) for _ in range(50)) if d.target.mirrored)
    plain = read_photo(drawn.target.path, 16)
    assert torch.equal(read_drawn_photo(drawn.target, 16), plain.flip(-1))
    assert plain[:, :, :8].mean() < 0.3 < 0.7 < plain[:, :, 8:].mean()  # dark left half: the flip is seen
    box = BoxMask((0.0, 0.0, 0.25, 1.0), mirrored=True)
    assert torch.equal(read_mask(box, 8)[:, 6:], torch.ones(8, 2)) and read_mask(box, 8).sum() == 16


def test_draws_are_deterministic_from_the_generator(idi):
    dataset = open_dataset(str(idi.root))
    again = open_dataset(str(idi.root))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    first = [dataset.draw(g1) for _ in range(30)]
    assert first == [again.draw(g2) for _ in range(30)]
    assert torch.equal(g1.get_state(), g2.get_state())  # the same draws taken from the generator
    g3 = torch.Generator().manual_seed(6)
    assert first != [dataset.draw(g3) for _ in range(30)]
    before = dataset.digest()
    assert before == again.digest() != open_dataset(str(idi.root), "test").digest()
    Image.new("RGB", (64, 64)).save(idi.root / "image" / f"{idi.images('train')[0]}.jpg")  # another file size
    assert open_dataset(str(idi.root)).digest() != before


def test_optional_parts_may_be_absent_and_are_named(tmp_path):
    idi = write_celebahq_idi(tmp_path / "celebahq", captions=False, random_masks=False)
    dataset = open_dataset(str(idi.root))
    assert dataset.absent == ["captions", "random masks"]
    assert all(p.caption is None for person in dataset.people for p in person)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        drawn = dataset.draw(g)
        assert drawn.target.mask.random is None and drawn.target.caption is None
        assert read_mask(drawn.target.mask, 32).sum() > 0


def cut_short(path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


class CodeInAPickle:
    """Unpickling this would construct a test class: the region file is read weights-only and refuses it."""


@pytest.mark.parametrize("breakage, split, message", [
    (lambda r: (r / "annotation" / "idi-5.json").rename(r / "annotation" / "idi-1.json"), "train",
     r"annotation file annotation.idi-5\.json is missing in .*celebahq \(found: idi-1\.json\): it holds the identity "
     r"split\. Download CelebAHQ-IDI again"),
    (lambda r: shutil.rmtree(r / "annotation"), "train", r"annotation.idi-5\.json is missing"),
    (lambda r: cut_short(r / "annotation" / "idi-5.json"), "train",
     r"idi-5\.json could not be read \(.*\): it is damaged or cut short"),
    (lambda r: (r / "annotation" / "idi-5.json").write_text(json.dumps({"train_ids": [], "id2image": {}})), "val",
     r"idi-5\.json has no 'val_ids': it is not CelebAHQ-IDI's identity split"),
    (lambda r: (r / "annotation" / "idi-5.json").write_text(json.dumps({"test_ids": ["7"], "id2image": {}})), "test",
     r"lists identity '7' in its test split without its reference and inference images"),
    (lambda r: (r / "annotation" / "idi-5.json").write_text(json.dumps({"val_ids": [], "id2image": {}})), "val",
     r"lists no identity of two or more images in the 'val' split"),
    (lambda r: shutil.rmtree(r / "image"), "train", r"images folder image/ is missing in"),
    (lambda r: [(r / "image" / f"{i}.jpg").unlink() for i in (7, 3)], "train",
     r"2 of the 21 images the train split lists are missing in .*image: 3\.jpg, 7\.jpg\. The image download is "
     r"incomplete"),
    (lambda r: [(r / "image" / f"{i}.jpg").unlink() for i in range(0, 30, 2)], "train",
     r"8 of the 21 images the train split lists are missing in .*: 0\.jpg, 4\.jpg, 8\.jpg, 12\.jpg, 16\.jpg, \.\.\.\. "),
    (lambda r: (r / "annotation" / "region_bbox.pth").unlink(), "train",
     r"annotation file annotation.region_bbox\.pth is missing in .*: it holds the face regions"),
    (lambda r: cut_short(r / "annotation" / "region_bbox.pth"), "train",
     r"region_bbox\.pth could not be read as plain tensors \(.*\): it is damaged"),
    (lambda r: torch.save({"bboxes": CodeInAPickle()}, r / "annotation" / "region_bbox.pth"), "train",
     r"region_bbox\.pth could not be read as plain tensors"),
    (lambda r: torch.save({"bboxes": {"eyebrow": torch.zeros(40, 4)}}, r / "annotation" / "region_bbox.pth"), "train",
     r"has no \(images, 4\) table of 'lowerface' boxes"),
    (lambda r: torch.save({"bboxes": {k: torch.zeros(30, 4) for k in REGIONS}}, r / "annotation" / "region_bbox.pth"),
     "test", r"holds boxes for 30 images; the split names image 39"),
    (lambda r: cut_short(r / "annotation" / "dialog" / "captions_hq.json"), "train",
     r"captions file .*captions_hq\.json could not be read .* Or delete it to train without captions"),
    (lambda r: (r / "annotation" / "dialog" / "captions_hq.json").write_text("[]"), "train",
     r"captions file .* is not CelebA-Dialog's"),
    (lambda r: [p.unlink() for p in (r / "mask").iterdir()], "train",
     r"random masks folder .*mask has no \.png masks\. .* Or delete the folder"),
])
def test_a_broken_download_is_refused_naming_the_part(idi, breakage, split, message):
    breakage(idi.root)
    with pytest.raises(DatasetError, match=message):
        open_dataset(str(idi.root), split)

