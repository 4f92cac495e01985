"""PVA Identity Similarity through the real host: each picture's score is the paper's identity similarity written out
independently (sefi_testkit.pva.paper_id_similarity) with the recognizer PVA Load Face Recognizer loaded; a photo scores
1 against itself and less mirrored or of someone else; a face mask reads a face anywhere in a larger picture as the
aligned crop; it measures what a generation made; the numbers are shown on the node; what does not fit is refused by
name."""
import numpy as np
import pytest
import torch
from PIL import Image

from sefi_testkit.prompts import txt2img
from sefi_testkit.pva import paper_id_similarity, photo, recognizer_and_encoder

NODE_ID = "9"


def write_pictures(host):
    """pva_mirror.png (pva_photo0 mirrored), pva_other.png (someone else, the cat), pva_aligned.png (an aligned
    256-px face), pva_scene.png (that face pasted into a 400x500 scene, transparent over its crop: LoadImage's MASK)."""
    source = Image.open(host.input_dir / "pva_photo0.png")
    source.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(host.input_dir / "pva_mirror.png")
    Image.open(host.input_dir / "chelsea.png").convert("RGB").crop((150, 0, 450, 300)).resize(source.size).save(
        host.input_dir / "pva_other.png")
    aligned = Image.open(host.input_dir / "astronaut.png").convert("RGB").crop((100, 0, 400, 300)).resize((256, 256))
    aligned.save(host.input_dir / "pva_aligned.png")
    scene = np.random.default_rng(0).integers(0, 256, (400, 500, 4), dtype=np.uint8)
    scene[..., 3] = 255
    scene[60:316, 150:406, :3] = np.array(aligned)
    scene[60 + 35:60 + 223, 150 + 35:150 + 223, 3] = 0  # the face's crop: the mask
    Image.fromarray(scene).save(host.input_dir / "pva_scene.png")


@pytest.fixture(scope="module")
def pictures(host, pva_files):
    write_pictures(host)


def graph(images, reference="pva_photo0.png", mask_from=None):
    """LoadImage per picture (one batch by ImageBatch, which resizes to the first), PVA Load Face Recognizer, the node;
    mask_from: the picture whose LoadImage MASK is the face_mask."""
    nodes = {"1": {"class_type": "PVALoadFaceRecognizer", "inputs": {"recognizer_file": "r18.pth"}},
             "2": {"class_type": "LoadImage", "inputs": {"image": reference}},
             "5": {"class_type": "LoadImage", "inputs": {"image": mask_from or images[0]}}}
    batch = ["30", 0]
    for k, name in enumerate(images):
        nodes[f"3{k}"] = {"class_type": "LoadImage", "inputs": {"image": name}}
        if k:
            nodes[f"4{k}"] = {"class_type": "ImageBatch", "inputs": {"image1": batch, "image2": [f"3{k}", 0]}}
            batch = [f"4{k}", 0]
    inputs = {"image": batch, "reference": ["2", 0], "face_recognizer": ["1", 0]}
    if mask_from:
        inputs["face_mask"] = ["5", 1]
    nodes[NODE_ID] = {"class_type": "PVAIdentitySimilarity", "inputs": inputs}
    return nodes


def scene_and_mask(host):
    """pva_scene.png as LoadImage gives it: the picture (1, H, W, 3) and its MASK (1, H, W), 1 where transparent."""
    rgba = torch.from_numpy(np.array(Image.open(host.input_dir / "pva_scene.png")).astype(np.float32) / 255)[None]
    return rgba[..., :3], 1 - rgba[..., 3]


def measure(host, image, reference, recognizer, **extra):
    """The node's outputs (similarities, mean), called as the executor calls it (inputs as lists)."""
    with torch.inference_mode():
        out = host.node("PVAIdentitySimilarity").execute(image=[image], reference=[reference],
                                                         face_recognizer=[recognizer], **extra)
    return out.result


def test_each_score_is_the_papers_identity_similarity_and_shown_on_the_node(host_clean, pictures):
    host = host_clean
    recognizer, _ = recognizer_and_encoder(host)
    images = torch.cat([photo(host, name) for name in ("pva_photo0.png", "pva_mirror.png", "pva_other.png")])
    references = torch.cat([photo(host), photo(host, "pva_photo1.png")[:, 8:72, 8:72]])
    scores, mean = measure(host, images, references, recognizer)
    expected = paper_id_similarity(recognizer.network, images.movedim(-1, 1), references.movedim(-1, 1))
    assert torch.allclose(torch.tensor(scores), expected, atol=1e-5) and mean == pytest.approx(sum(scores) / 3)
    alone, _ = measure(host, images, references[:1], recognizer)
    assert alone[0] == pytest.approx(1.0, abs=1e-5)  # the same photo
    assert alone[1] < 0.999 and alone[2] < 0.999  # mirrored, someone else

    result = host.run(graph(["pva_photo0.png", "pva_mirror.png", "pva_other.png"]))
    assert result.success, result.error
    text = result.outputs[NODE_ID]["text"][0]
    assert text.splitlines()[:3] == [f"{k}: {s:.3f}" for k, s in enumerate(alone, 1)]
    assert text.splitlines()[3].startswith(f"mean {sum(alone) / 3:.3f} ± ")
    assert "3 pictures (1 reference photo, iresnet r18 (r18.pth))" in text
    assert (NODE_ID, text) in host.server.progress_texts()


def test_a_face_mask_reads_a_face_anywhere_in_a_picture_as_the_aligned_crop(host_clean, pictures):
    host = host_clean
    recognizer, _ = recognizer_and_encoder(host)
    reference = photo(host)
    aligned, _ = measure(host, photo(host, "pva_aligned.png"), reference, recognizer)
    scene, mask = scene_and_mask(host)
    masked, _ = measure(host, scene, reference, recognizer, face_mask=[mask])
    unmasked, _ = measure(host, scene, reference, recognizer)
    assert masked[0] == pytest.approx(aligned[0], abs=1e-5)
    assert unmasked[0] != pytest.approx(aligned[0], abs=1e-3)
    result = host.run(graph(["pva_scene.png"], mask_from="pva_scene.png"))
    assert result.success, result.error
    assert result.outputs[NODE_ID]["text"][0].startswith(f"1: {masked[0]:.3f}\n")


def test_it_measures_what_a_generation_made(host_clean, pictures):
    prompt = txt2img(size=64)
    prompt["8"] = {"class_type": "PVALoadFaceRecognizer", "inputs": {"recognizer_file": "r18.safetensors"}}
    prompt["10"] = {"class_type": "LoadImage", "inputs": {"image": "pva_photo0.png"}}
    prompt[NODE_ID] = {"class_type": "PVAIdentitySimilarity",
                       "inputs": {"image": ["6", 0], "reference": ["10", 0], "face_recognizer": ["8", 0]}}
    result = host_clean.run(prompt)
    assert result.success, result.error
    lines = result.outputs[NODE_ID]["text"][0].splitlines()
    assert len(lines) == 2 and lines[0].startswith("1: ") and lines[1].startswith("mean ") and "1 picture (" in lines[1]


def test_what_does_not_fit_is_refused_by_name(host_clean, pictures):
    host = host_clean
    result = host.run(graph(["pva_photo1.png"], mask_from="pva_scene.png"))
    assert not result.success
    assert ("PVA Identity Similarity: the face_mask (1: 500x400) does not fit the image (1: 80x80)"
            in result.error["exception_message"])
    recognizer, _ = recognizer_and_encoder(host)
    empty = torch.zeros(0, 64, 64, 3)
    with pytest.raises(ValueError, match="PVA Identity Similarity: 'image' holds no pictures"):
        measure(host, empty, photo(host), recognizer)
    with pytest.raises(ValueError, match="PVA Identity Similarity: 'reference' holds no pictures"):
        measure(host, photo(host), empty, recognizer)
    with pytest.raises(ValueError, match="face_mask 1 of 1 is empty. Paint it over the whole face"):
        measure(host, photo(host), photo(host), recognizer, face_mask=[torch.zeros(1, 64, 64)])
    with pytest.raises(ValueError, match="picture 1 of 1 in 'image' has NaN"):
        measure(host, torch.full((1, 64, 64, 3), float("nan")), photo(host), recognizer)
    clip_vision = host.module("nodes.pva.face_features").ClipVisionFeatures(None, "CLIP vision (1,000 weights)")
    with pytest.raises(ValueError, match="measures with a face recognizer: connect PVA Load Face Recognizer"):
        measure(host, photo(host), photo(host), clip_vision)
