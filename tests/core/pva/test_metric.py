"""The paper's identity similarity against an independent computation of it (sefi_testkit.pva.paper_id_similarity:
pictures read at 256 px as PIL resizes them, the face at rows and columns 35:223 pooled to 112, a random iresnet's
features, torch's own cosine similarity); the region table against means and population deviations computed by hand
from random scores."""
import random
import statistics

import pytest
import torch
import torch.nn.functional as F

from sefi_core.pva import metric
from sefi_core.pva.face import IResNet, face_crop
from sefi_core.pva.metric import (Case, evaluate, face_square, identity_similarity, metric_input, square_input,
                                  summarize)
from sefi_testkit.pva import paper_id_similarity


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    return IResNet("r18").eval()


def pictures(count, size=256, seed=0):
    """Smooth random pictures (B, 3, size, size) in [0, 1]: blobs a recognizer tells apart, unlike pure noise."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(count, 3, 16, 16, generator=g), (size, size), mode="bilinear").clamp(0, 1)


def test_the_score_is_the_cosine_of_the_recognizers_features_of_the_papers_crop(network):
    images, references = pictures(3, 320, seed=1), pictures(2, 200, seed=2)
    ours = identity_similarity(network, metric_input(images), metric_input(references))
    assert torch.allclose(ours, paper_id_similarity(network, images, references), atol=1e-5)
    one = identity_similarity(network, metric_input(images), metric_input(references[:1]))
    assert torch.allclose(one, paper_id_similarity(network, images, references[:1]), atol=1e-5)
    assert not torch.allclose(one, ours, atol=1e-3)  # the second reference counts


def test_the_metrics_crop_is_three_columns_right_of_the_encoders(network):
    """The encoder reads columns 32:220, the metric 35:223: the same crop of a picture moved 3 columns left."""
    images = pictures(2, seed=3)
    assert torch.equal(metric_input(images), face_crop(torch.roll(images, -3, dims=-1)))
    assert not torch.allclose(metric_input(images), face_crop(images))


def test_pictures_are_scored_alike_in_any_batch_size(network, monkeypatch):
    monkeypatch.setattr(metric, "BATCH", 2)  # pictures per recognizer pass
    images, references = pictures(3, 128, seed=4), pictures(1, 128, seed=5)
    together = identity_similarity(network, metric_input(images), metric_input(references))
    alone = torch.cat([identity_similarity(network, metric_input(p[None]), metric_input(references)) for p in images])
    assert torch.allclose(together, alone, atol=1e-6)


def test_a_picture_scores_one_against_itself_and_less_against_its_mirror_or_another(network):
    face, other = pictures(2, seed=6)
    scores = identity_similarity(network, metric_input(torch.stack([face, face.flip(-1), other])),
                                 metric_input(face[None]))
    assert scores[0] == pytest.approx(1.0, abs=1e-6)
    assert scores[1] < 0.999 and scores[2] < 0.999


def test_a_face_square_is_read_as_the_aligned_crop():
    """A square exactly on the metric's crop of an aligned 256-px picture reads what the aligned read reads; so does
    the same picture pasted anywhere into a larger one, with the mask over its crop."""
    aligned = pictures(1, seed=7)[0]
    crop = torch.zeros(256, 256)
    crop[35:223, 35:223] = 1
    assert face_square(crop) == (35, 35, 188)
    assert torch.equal(square_input(aligned, face_square(crop)), metric_input(aligned[None])[0])
    scene, mask = torch.rand(3, 400, 600), torch.zeros(400, 600)
    scene[:, 100:356, 300:556], mask[135:323, 335:523] = aligned, 1
    assert torch.equal(square_input(scene, face_square(mask)), metric_input(aligned[None])[0])


def test_a_face_square_is_the_boxs_longer_side_centred_on_it_inside_the_picture():
    mask = torch.zeros(100, 120)
    mask[20:60, 30:50] = 1  # 40 tall, 20 wide: a 40-square around columns 30:50
    assert face_square(mask) == (20, 20, 40)
    mask = torch.zeros(100, 120)
    mask[40:50, 20:60] = 1  # 10 tall, 40 wide: a 40-square around rows 40:50
    assert face_square(mask) == (25, 20, 40)
    mask = torch.zeros(100, 120)
    mask[0:10, 100:120] = 0.9  # at the corner: shifted inside
    assert face_square(mask) == (0, 100, 20)
    mask = torch.zeros(50, 120)
    mask[10:20, 0:120] = 1  # wider than the picture is tall: the shorter side
    assert face_square(mask) == (0, 35, 50)
    with pytest.raises(ValueError, match="covers nothing"):
        face_square(torch.full((8, 8), 0.5))


def test_the_region_table_is_each_regions_mean_and_population_deviation_and_the_mean_of_them():
    rng = random.Random(0)
    scores = {region: [rng.uniform(-0.2, 1.0) for _ in range(rng.randint(1, 9))]
              for region in ("lowerface", "eyebrow", "wholeface", "random")}
    report = summarize(scores)
    assert list(report.regions) == list(scores)
    for region, values in scores.items():
        assert report.regions[region].mean == pytest.approx(statistics.fmean(values), abs=1e-12)
        assert report.regions[region].std == pytest.approx(statistics.pstdev(values), abs=1e-12)
        assert report.regions[region].count == len(values)
    means = [statistics.fmean(v) for v in scores.values()]
    assert report.mean_of_means == pytest.approx(sum(means) / 4, abs=1e-12)
    assert report.lines()[-1] == f"mean of region means: {sum(means) / 4:.3f}"
    for bad in ({}, {"eyebrow": []}, {"eyebrow": [0.5, float("nan")]}):
        with pytest.raises(ValueError):
            summarize(bad)


def test_evaluate_repaints_each_case_and_scores_it_against_its_own_photo(network):
    photos, references = pictures(2, seed=8), pictures(2, seed=9)
    cases = [Case(region, photo, torch.ones(256, 256), references)
             for region in ("lowerface", "wholeface") for photo in photos]
    repaint = lambda case: case.photo if case.region == "lowerface" else case.photo.flip(-1)
    report = evaluate(repaint, cases, network)
    assert report.regions["lowerface"].mean == pytest.approx(1.0, abs=1e-6)
    assert report.regions["lowerface"].std == pytest.approx(0.0, abs=1e-6)
    mirrored = [float(paper_id_similarity(network, p.flip(-1)[None], p[None])[0]) for p in photos]
    assert report.regions["wholeface"].mean == pytest.approx(statistics.fmean(mirrored), abs=1e-5)
    assert report.regions["wholeface"].std == pytest.approx(statistics.pstdev(mirrored), abs=1e-5)
    assert report.mean_of_means == pytest.approx((1 + statistics.fmean(mirrored)) / 2, abs=1e-5)
