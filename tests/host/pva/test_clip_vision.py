"""The host's CLIP_VISION as PVA's feature source (PVA Face Features from CLIP Vision), through the real host with its
own ClipVisionModel of a tiny ViT layout (random weights, 24-d image embeddings): an encoder trained on it reads its
width and is saved so; the features are exactly the host's image embeddings of the photos (and of their mirrors); the
fine-tune's visual tokens are the encoder's of exactly those; stage 2 and encoders of another width are refused by
name before any work; in fp16/bf16, as on a GPU, the features still come as fp32."""
import pytest
import torch

from sefi_testkit import checkpoint
from sefi_testkit.pva import PHOTO_SIZE, photo
from sefi_testkit.pva import encoder_train_graph as train_graph

WIDTH = checkpoint.TINY_CLIP_VISION["projection_dim"]


@pytest.fixture(scope="module")
def clip_vision(host, tmp_path_factory):
    return checkpoint.clip_vision(tmp_path_factory.mktemp("clip_vision"))


def features_node(host, clip_vision):
    with torch.inference_mode():
        return host.node("PVAClipVisionFeatures").execute(clip_vision=clip_vision).result[0]


def host_embeds(clip_vision, photos: torch.Tensor) -> torch.Tensor:
    """The independent computation: the host's CLIPVisionEncode output of (B, H, W, 3) photos."""
    with torch.no_grad():
        return clip_vision.encode_image(photos, crop=True)["image_embeds"].float()


def train_inputs(host, source, name, **extra):
    model, clip, vae = host.load_checkpoint("tiny_inpaint.safetensors")
    inputs = {k: v for k, v in train_graph(name, steps=1)["5"]["inputs"].items() if not isinstance(v, list)}
    return {**inputs, "model": model, "clip": clip, "vae": vae, "face_recognizer": source, **extra}


def fine_tune_inputs(host, source, encoder, name):
    """PVA Fine-tune Identity's inputs (lists: it takes its inputs as lists), one quick step."""
    model, clip, vae = host.load_checkpoint("tiny_inpaint.safetensors")
    return dict(model=[model], clip=[clip], vae=[vae], face_recognizer=[source], pva_encoder=[encoder], name=[name],
                trigger=["sks"], steps=[1], timesteps_per_step=[2], projection_learning_rate=[2e-5],
                word_learning_rate=[1e-3], seed=[0], resolution=[PHOTO_SIZE], overwrite=[True])


def test_an_encoder_trained_on_clip_vision_reads_its_embeddings_and_a_fine_tune_uses_exactly_them(
        host_clean, dataset, clip_vision):
    host = host_clean
    source = features_node(host, clip_vision)
    trainer = host.module("nodes.pva.train_encoder")
    with torch.inference_mode():
        encoder = trainer.PVATrainEncoder.execute(**train_inputs(host, source, "on_clip")).result[0]
    saved = host.module("sefi_core.pva.model_files").load_encoder(str(host.pva_encoder_dir /
                                                                             "on_clip.safetensors"))
    assert saved.network.queries.shape == (10, WIDTH) and saved.hash == encoder.hash
    assert saved.recognizer == source.name and source.name.startswith("CLIP vision")

    fine_tune = host.module("nodes.pva.fine_tune")
    inputs = fine_tune_inputs(host, source, saved, "clip_person")
    photos = [photo(host), photo(host, "pva_photo1.png")]
    with torch.inference_mode():
        identity = fine_tune.PVAFineTuneIdentity.execute(image=photos, **inputs).result[0]
    squares = torch.cat([photos[0], torch.nn.functional.interpolate(  # photo 1 is 80 px: the fine-tune's square of it
        photos[1].movedim(-1, 1), size=(PHOTO_SIZE, PHOTO_SIZE), mode="bicubic", antialias=True).movedim(1, -1)])
    with torch.no_grad():
        expected = saved.network(host_embeds(clip_vision, squares.clamp(0, 1))[None])[0]
    assert identity.recognizer == source.name
    assert torch.allclose(identity.visual_tokens, expected, atol=1e-4), (identity.visual_tokens - expected).abs().max()


def test_the_features_computed_before_training_are_the_hosts_embeddings_of_each_photo_and_its_mirror(
        host_clean, dataset, clip_vision):
    host = host_clean
    trainer, reader = host.module("nodes.pva.train_encoder"), host.module("sefi_core.pva.dataset")
    table = trainer.frozen_source_features(trainer.FaceDataset(str(dataset)), features_node(host, clip_vision), None,
                                           batch=4)
    assert len(table) == 9
    path = str(dataset / "cat" / "2.png")
    photo_ = reader.read_photo(path, 256).movedim(0, -1)[None]
    plain, mirrored = table[path]
    # within the rounding of another batch composition (the table encodes photos in batches)
    assert torch.allclose(plain, host_embeds(clip_vision, photo_)[0], atol=1e-5)
    assert torch.allclose(mirrored, host_embeds(clip_vision, photo_.flip(2))[0], atol=1e-5)
    assert not torch.allclose(plain, mirrored)  # the mirror is another photo to the network: the test can tell
    assert not plain.requires_grad and not plain.is_inference()


def test_stage_two_and_an_encoder_of_another_width_are_refused_by_name_before_any_work(
        host_clean, dataset, pva_files, clip_vision, monkeypatch):
    host = host_clean
    source = features_node(host, clip_vision)
    trainer = host.module("nodes.pva.train_encoder")
    with torch.inference_mode():
        arcface_encoder = host.node("PVALoadEncoder").execute(encoder_file="random.safetensors").result[0]
    with torch.inference_mode(), pytest.raises(ValueError, match="Stage 2 tunes the face recognizer; CLIP vision"):
        trainer.PVATrainEncoder.execute(**train_inputs(host, source, "clip_stage_two", pva_encoder=arcface_encoder,
                                                       stage="2: also the face recognizer"))
    def read_every_photo(*args, **kwargs):
        raise AssertionError("the whole dataset is read before the refusal")
    with monkeypatch.context() as patch, torch.inference_mode(), pytest.raises(
            ValueError, match=f"reads 512-d face features; CLIP vision.* gives {WIDTH}-d ones"):
        patch.setattr(trainer, "frozen_source_features", read_every_photo)
        trainer.PVATrainEncoder.execute(**train_inputs(host, source, "clip_wrong_width", pva_encoder=arcface_encoder))
    fine_tune = host.module("nodes.pva.fine_tune")
    inputs = fine_tune_inputs(host, source, arcface_encoder, "clip_wrong")
    with torch.inference_mode(), pytest.raises(ValueError, match=f"gives {WIDTH}-d ones"):
        fine_tune.PVAFineTuneIdentity.execute(image=[photo(host)], **inputs)
    with torch.inference_mode(), pytest.raises(ValueError, match="needs a CLIP_VISION"):
        host.node("PVAClipVisionFeatures").execute(clip_vision=object())
    written = {p.name for p in (*host.pva_encoder_dir.iterdir(), *host.pva_identity_dir.iterdir())}
    assert not written & {"clip_stage_two.safetensors", "clip_wrong_width.safetensors", "clip_wrong.safetensors"}


@pytest.mark.parametrize("setup_name", ["FP16_SDPA", "BF16_SDPA"])
def test_a_half_precision_clip_vision_gives_fp32_features_close_to_fp32s(
        host_clean, pva_files, tmp_path, setup_name):
    """As on a GPU, where the host runs CLIP vision in fp16/bf16: the encoder gets fp32 features of the same photos."""
    from sefi_testkit import gpu_emulation as gpu
    photos = torch.cat([photo(host_clean), photo(host_clean).flip(2)]).movedim(-1, 1)
    reference = features_node(host_clean, checkpoint.clip_vision(tmp_path)).features(photos)
    with gpu.emulate(getattr(gpu, setup_name)) as setup:
        half_model = checkpoint.clip_vision(tmp_path)
        assert half_model.dtype == setup.compute  # the set-up reaches the host's CLIP vision
        with torch.no_grad():
            half = features_node(host_clean, half_model).features(photos)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert torch.nn.functional.cosine_similarity(half, reference).min() > 0.99


def test_a_run_resumed_with_a_source_of_another_width_is_refused_by_name(host_clean, dataset, clip_vision):
    host = host_clean
    assert host.run(train_graph("arcface_run", steps=1)).success
    trainer = host.module("nodes.pva.train_encoder")
    inputs = train_inputs(host, features_node(host, clip_vision), "arcface_run", steps=2)
    with torch.inference_mode(), pytest.raises(ValueError, match=f"arcface_run.safetensors was trained on 512-d face "
                                                                 f"features; CLIP vision.* gives {WIDTH}-d ones"):
        trainer.PVATrainEncoder.execute(**inputs)
    assert host.module("sefi_core.train_state").load_train_state(
        str(host.train_state_dir / "pva_encoder-arcface_run.safetensors"), "Delete it.").steps_done == 1
