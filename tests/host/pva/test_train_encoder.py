"""PVA Train Encoder through the real host, on a tiny SD1.5-inpainting checkpoint with random weights (and SD2's, the
PVA authors' base) and a small folder of people: it saves an encoder (with the visual attention and the word it trained) that PVA Fine-tune Identity
starts from; a run resumed from its last save ends bit for bit where one long run ends; stage 2 tunes a copy of the
face recognizer and saves it for fine-tunes; a cancel keeps the last save; the host's model and the loaded recognizer
are left as they were; gradients in fp16/bf16 point where fp32's do; bad inputs are refused by name before any work."""
import numpy as np
import pytest
import torch
from PIL import Image

from sefi_testkit import probe
from sefi_testkit.pva import PHOTO_SIZE, fine_tune_graph
from sefi_testkit.pva import encoder_train_graph as train_graph


def load(host, name):
    return host.module("sefi_core.pva.model_files").load_encoder(str(host.pva_encoder_dir / name))


def state(host, name):
    return host.module("sefi_core.train_state").load_train_state(
        str(host.train_state_dir / f"pva_encoder-{name}"), "Delete it.")


def same_encoders(a, b) -> bool:
    tensors = lambda e: [*e.network.state_dict().values(), e.word, *(t for p in e.projections.values()
                                                                     for t in p.tensors())]
    return all(torch.equal(x, y) for x, y in zip(tensors(a), tensors(b)))


def test_an_encoder_resumed_from_its_last_save_ends_exactly_where_one_long_run_ends(host_clean, dataset):
    host = host_clean
    assert host.run(train_graph("long", steps=4)).success
    assert host.run(train_graph("halves", steps=2)).success
    assert state(host, "halves.safetensors").steps_done == 2
    result = host.run(train_graph("halves", steps=4))
    assert result.success, result.error
    long, halves = load(host, "long.safetensors"), load(host, "halves.safetensors")
    assert same_encoders(long, halves) and halves.settings["steps"] == 4
    assert state(host, "halves.safetensors").losses == state(host, "long.safetensors").losses
    assert long.settings["people"] == 3 and long.settings["photos"] == 9 and long.recognizer == "iresnet r18 (r18.safetensors)"
    assert any("resuming halves.safetensors at step 2 of 4" in text for _, text in host.server.progress_texts())
    # what it trained beside the encoder: every layer's projections and the word
    model, clip, _ = host.load_checkpoint("tiny_inpaint.safetensors")
    layers = host.module("nodes.pva.patch").cross_attention_layers(model)
    assert set(long.projections) == set(layers)
    assert all(not torch.allclose(long.projections[n].to_k, layers[n].to_k.weight.float(), atol=1e-3) for n in layers)
    assert not torch.allclose(long.word, probe.embedding(clip, "sks"))
    already = host.run(train_graph("long", steps=4))
    assert not already.success and "already trained for 4 steps" in already.error["exception_message"]


def test_a_fine_tune_starts_from_what_the_encoder_trained(host_clean, dataset):
    host = host_clean
    assert host.run(train_graph("for_fine_tune", steps=2)).success
    graph = fine_tune_graph(steps=1, name="from_trained", recognizer="r18.safetensors")
    graph["3"]["inputs"]["encoder_file"] = "for_fine_tune.safetensors"
    result = host.run(graph)
    assert result.success, result.error
    encoder = load(host, "for_fine_tune.safetensors")
    identity = host.module("sefi_core.pva.identity").load_pva_identity(
        str(host.pva_identity_dir / "from_trained.safetensors"))
    assert identity.encoder == encoder.hash
    for name, projections in encoder.projections.items():  # one step at lr 2e-5 from the encoder's (fp16 storage)
        assert torch.allclose(identity.projections[name].to_k, projections.to_k, atol=1e-4)
    assert torch.allclose(identity.word, encoder.word, atol=2e-3)  # one step at lr 1e-3


def test_stage_two_tunes_a_copy_of_the_recognizer_and_leaves_the_hosts_model_as_it_was(host_clean, dataset):
    host = host_clean
    assert host.run(train_graph("stage_one", steps=1)).success
    with torch.inference_mode():
        recognizer = host.node("PVALoadFaceRecognizer").execute(recognizer_file="r18.safetensors").result[0]
        start = host.node("PVALoadEncoder").execute(encoder_file="stage_one.safetensors").result[0]
    model, clip, vae = host.load_checkpoint("tiny_inpaint.safetensors")
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    recognizer_before = {k: v.clone() for k, v in recognizer.network.state_dict().items()}
    inputs = {k: v for k, v in train_graph("stage_two", steps=1)["5"]["inputs"].items() if not isinstance(v, list)}
    inputs.update(stage="2: also the face recognizer", model=model, clip=clip, vae=vae, face_recognizer=recognizer,
                  pva_encoder=start)
    with torch.inference_mode():
        encoder = host.node("PVATrainEncoder").execute(**inputs).result[0]
    assert all(torch.equal(v, before[k]) for k, v in model.model.state_dict().items())
    assert all(torch.equal(v, recognizer_before[k]) for k, v in recognizer.network.state_dict().items())
    assert encoder.recognizer == "iresnet r18 (stage_two_recognizer.safetensors)"
    with torch.inference_mode():
        tuned = host.node("PVALoadFaceRecognizer").execute(recognizer_file="stage_two_recognizer.safetensors").result[0]
    changed = {k for k, v in tuned.network.state_dict().items() if not torch.equal(v, recognizer_before[k])}
    trained = {k for k, p in recognizer.network.named_parameters() if p.requires_grad}
    assert changed == trained  # the weights it trains; batch-norm statistics stay the pretrained ones
    assert load(host, "stage_two.safetensors").recognizer == encoder.recognizer


def test_a_cancelled_training_keeps_its_last_save_and_resumes_from_it(host_clean, dataset):
    host = host_clean
    host.interrupt_at_tick(3)
    result = host.run(train_graph("cancelled", steps=50))
    assert result.interrupted and not result.success
    kept = state(host, "cancelled.safetensors").steps_done
    assert 1 <= kept < 50 and load(host, "cancelled.safetensors").settings["steps"] == kept
    assert not list(host.pva_encoder_dir.glob(".sefi-*")) and not list(host.train_state_dir.glob(".sefi-*"))
    assert host.run(train_graph("cancelled", steps=kept + 1)).success
    assert state(host, "cancelled.safetensors").steps_done == kept + 1


@pytest.mark.parametrize("extra, message", [
    ({"stage": "2: also the face recognizer"}, "Stage 2 goes on from a stage-1 encoder"),
    ({"dataset_folder": "no_such_folder"}, "does not exist"),
    ({"dataset_folder": "pva_dataset/cat"}, "person folder"),
    ({"face_region": "custom box", "custom_box": "0.9, 0.1, 0.2, 0.8"}, "left < right"),
    ({"name": "../escape"}, "path separator"),
])
def test_bad_inputs_are_refused_by_name_before_any_work(host_clean, dataset, extra, message):
    result = host_clean.run(train_graph(**{"name": "refused", "steps": 500, **extra}))
    assert not result.success and message in result.error["exception_message"]
    assert not host_clean.progress and not (host_clean.pva_encoder_dir / "refused.safetensors").exists()


def test_an_existing_encoder_is_not_replaced_by_a_new_run(host_clean, dataset):
    host = host_clean
    assert host.run(train_graph("existing", steps=1)).success
    result = host.run(train_graph("existing", steps=3, resume=False))
    assert not result.success and "already exists; switch 'resume' on" in result.error["exception_message"]
    assert state(host, "existing.safetensors").steps_done == 1


@pytest.mark.parametrize("setup_name", ["FP16_SDPA", "BF16_SDPA"])
def test_encoder_gradients_in_half_precision_point_where_fp32s_do(host_clean, dataset, setup_name):
    """The encoder's tokens reach the fp16/bf16 UNet through the patch's cast and come back in fp32."""
    from sefi_testkit import gpu_emulation as gpu

    def gradients(setup):
        training, core = host_clean.module("nodes.training"), host_clean.module("sefi_core.pva.train")
        dataset_module = host_clean.module("sefi_core.pva.dataset")
        scaler_of = host_clean.module("sefi_core.training").loss_scaler
        with torch.inference_mode():
            recognizer = host_clean.node("PVALoadFaceRecognizer").execute(recognizer_file="r18.safetensors").result[0]
        torch.manual_seed(0)
        encoder = host_clean.module("sefi_core.pva.encoder").IdentityEncoder(768, layers=1, heads=8, dropout=0)
        with gpu.emulate(setup):
            model, clip, vae = host_clean.load_checkpoint("tiny_inpaint.safetensors")
            tuner = host_clean.module("nodes.pva.training").PVAFineTuner(model, clip, "sks", torch.zeros(10, 768),
                                                                          "test")
            with training.training_session(tuner):
                photo = dataset_module.read_photo(str(dataset / "cat" / "0.png"), PHOTO_SIZE)
                sample = tuner.samples([(photo, torch.ones(PHOTO_SIZE, PHOTO_SIZE))], vae)[0]
                refs = torch.stack([dataset_module.read_photo(str(dataset / "cat" / f"{k}.png"), 256)
                                    for k in (1, 2)])
                trainables = core.EncoderTrainables(encoder, recognizer.network, tuner.identity, 1)
                tokens = trainables.tokens(core.EncoderSample(sample, refs.to(tuner.device)))
                noise = torch.randn((2, 4, PHOTO_SIZE // 8, PHOTO_SIZE // 8),
                                    generator=torch.Generator().manual_seed(3)).to(tuner.device)
                eps = tuner.denoise(sample.latent.expand(2, -1, -1, -1), noise, torch.tensor([300, 700]),
                                    sample.concat.expand(2, -1, -1, -1), tuner.identity.word(), tokens)
                loss = torch.nn.functional.mse_loss(eps.float(), noise.float())
                scaler = scaler_of(tuner.device, tuner.dtype)
                grads = torch.autograd.grad(scaler.scale(loss), list(encoder.parameters()))
                return torch.cat([g.flatten() for g in grads]).double() / scaler.get_scale(), tuner.dtype

    reference, _ = gradients(gpu.CPU_FP32)
    half, dtype = gradients(getattr(gpu, setup_name))
    assert dtype == getattr(gpu, setup_name).compute and torch.isfinite(half).all() and half.norm() > 0
    cosine = float(torch.nn.functional.cosine_similarity(reference, half, dim=0))
    assert cosine >= 0.99, f"{setup_name}: the encoder's gradient differs from fp32's (cosine {cosine:.4f})"
    assert abs(float(half.norm() / reference.norm()) - 1) <= 0.05



def test_captioned_photos_are_prompted_with_their_caption_half_the_time(host_clean, dataset, monkeypatch):
    """The paper's prompts: "photo of a sks person" alone, or with the target photo's caption after it (a long
    caption too: the host's CLIP takes prompts beyond 77 tokens in chunks)."""
    import shutil
    host = host_clean
    captioned = host.input_dir / "pva_dataset_captioned"
    shutil.rmtree(captioned, ignore_errors=True)
    shutil.copytree(dataset, captioned)
    captions = {}
    for photo in sorted(captioned.glob("*/[0-9].png")):
        text = f"{photo.parent.name} photo {photo.stem} " + "and a long story " * 30  # over 77 tokens
        photo.with_suffix(".txt").write_text(text)
        captions[f"photo of a sks person. {' '.join(text.split())}"] = photo
    tuner_class = host.module("nodes.pva.training").PVAFineTuner
    prompts, denoise = [], tuner_class.denoise

    def recording(self, *args, prompt=None, **kwargs):
        prompts.append(prompt)
        return denoise(self, *args, prompt=prompt, **kwargs)
    monkeypatch.setattr(tuner_class, "denoise", recording)
    graph = train_graph("captioned", steps=6, dataset_folder="pva_dataset_captioned")
    result = host.run(graph)
    assert result.success, result.error
    assert len(prompts) == 6 and None in prompts and set(prompts) - {None} <= set(captions)
    assert any(p and "long story" in p for p in prompts)  # a caption drawn, whole


def test_with_a_random_masks_folder_each_samples_face_region_is_joined_with_one_of_its_masks(host_clean, dataset,
                                                                                              monkeypatch):
    host = host_clean
    folder = host.input_dir / "pva_random_masks"
    folder.mkdir(exist_ok=True)
    bank = {}
    for k in range(2):  # two masks: a band across the top, a band down the right edge
        image = Image.new("L", (PHOTO_SIZE, PHOTO_SIZE))
        image.paste(255, (0, 0, PHOTO_SIZE, 8) if k == 0 else (PHOTO_SIZE - 8, 0, PHOTO_SIZE, PHOTO_SIZE))
        image.save(folder / f"{k}.png")
        bank[k] = torch.from_numpy(np.asarray(image) > 127).float()
    dataset_module = host.module("sefi_core.pva.dataset")
    box = dataset_module.box_mask(dataset_module.ALIGNED_FACE_BOX, PHOTO_SIZE)
    own = dataset_module.read_mask(str(dataset / "cat" / "0.mask.png"), PHOTO_SIZE)  # the one photo with a face mask
    tuner_class = host.module("nodes.pva.training").PVAFineTuner
    masks, samples = [], tuner_class.samples

    def recording(self, squares, vae):
        masks.extend(mask for _, mask in squares)
        return samples(self, squares, vae)
    monkeypatch.setattr(tuner_class, "samples", recording)
    assert host.run(train_graph("random_masks", steps=4, random_masks_folder="pva_random_masks")).success
    assert len(masks) == 4
    joined = [torch.maximum(region, random) for region in (box, own) for random in bank.values()]
    assert all(any(torch.equal(mask, j) for j in joined) for mask in masks)
    assert len({tuple(mask.flatten().tolist()) for mask in masks}) > 1  # not one mask throughout
    missing = host.run(train_graph("no_masks", random_masks_folder="nowhere"))
    assert not missing.success and "random masks folder" in missing.error["exception_message"]
    assert not (host.pva_encoder_dir / "no_masks.safetensors").exists()


def test_a_run_never_writes_over_the_recognizer_it_reads_nor_a_tuned_one_an_earlier_run_left(host_clean, dataset):
    host = host_clean
    assert host.run(train_graph("for_stage_two", steps=1)).success
    source = host.face_recognizer_dir / "victim_recognizer.safetensors"  # what stage 2 of 'victim' would save
    source.write_bytes((host.face_recognizer_dir / "r18.safetensors").read_bytes())
    before = source.read_bytes()
    graph = train_graph("victim", steps=2, stage="2: also the face recognizer", encoder="for_stage_two.safetensors",
                        resume=False)
    graph["2"]["inputs"]["recognizer_file"] = "victim_recognizer.safetensors"
    result = host.run(graph)
    assert not result.success and "and that is the recognizer it reads" in result.error["exception_message"]
    assert source.read_bytes() == before and not (host.pva_encoder_dir / "victim.safetensors").exists()
    left = host.face_recognizer_dir / "earlier_recognizer.safetensors"  # an earlier stage-2 run's, its encoder gone
    left.write_bytes(before)
    result = host.run(train_graph("earlier", steps=2, stage="2: also the face recognizer",
                                  encoder="for_stage_two.safetensors", resume=False))
    assert not result.success and "already holds earlier_recognizer.safetensors" in result.error["exception_message"]
    assert left.read_bytes() == before and not host.progress


def test_a_face_mask_that_does_not_fit_its_photo_is_refused_before_any_work(host_clean, dataset):
    import shutil
    host = host_clean
    misfit = host.input_dir / "pva_dataset_misfit"
    shutil.rmtree(misfit, ignore_errors=True)
    shutil.copytree(dataset, misfit)
    Image.new("L", (16, PHOTO_SIZE), 255).save(misfit / "both" / "1.mask.png")  # beside a 64x64 photo
    result = host.run(train_graph("misfit", steps=2, dataset_folder="pva_dataset_misfit"))
    assert not result.success
    assert "1.mask.png is 16x64 pixels, its photo 64x64" in result.error["exception_message"]
    assert not host.progress and not (host.pva_encoder_dir / "misfit.safetensors").exists()
    assert not (host.train_state_dir / "pva_encoder-misfit.safetensors").exists()


def test_resuming_with_an_encoder_of_another_shape_is_refused_naming_the_state_and_the_fix(host_clean, dataset):
    host = host_clean
    assert host.run(train_graph("shaped", steps=1, encoder="random.safetensors")).success
    model_files, encoder = host.module("sefi_core.pva.model_files"), host.module("sefi_core.pva.encoder")
    model_files.save_encoder(encoder.IdentityEncoder(768, layers=1, heads=8, tokens=4),
                             str(host.pva_encoder_dir / "four_tokens.safetensors"), "iresnet r18")
    result = host.run(train_graph("shaped", steps=2, encoder="four_tokens.safetensors"))
    assert not result.success
    message = result.error["exception_message"]
    assert "pva_encoder-shaped.safetensors was trained with another encoder than the one given now" in message
    assert "encoder.queries is (10, 512) there and (4, 512) here" in message and "Connect the encoder" in message
    assert state(host, "shaped.safetensors").steps_done == 1


def test_pvas_trainings_set_the_hosts_training_flag_for_the_run_only(host_clean, dataset):
    """Encoder training and the fine-tune both run with the host's `in_training` on (where the host has it) and
    restore it after, also when cancelled."""
    host, seen = host_clean, []
    mm = host.model_management
    flag = lambda: getattr(mm, "in_training", None)
    has_flag = hasattr(mm, "in_training")
    host.tick_watchers.append(lambda value, total: seen.append(flag()))
    try:
        assert host.run(train_graph("flag_encoder", steps=2)).success
        encoder_ticks = len(seen)
        assert host.run(fine_tune_graph(steps=2, name="flag_fine_tune", recognizer="r18.safetensors")).success
        assert flag() is (False if has_flag else None)
        host.interrupt_at_tick(2)
        assert host.run(train_graph("flag_cancelled", steps=50)).interrupted
    finally:
        host.tick_watchers.clear()
    assert 0 < encoder_ticks < len(seen) and all(f is (True if has_flag else None) for f in seen), seen
    assert flag() is (False if has_flag else None)


def test_the_authors_celebahq_idi_is_trained_on_as_downloaded(host_clean, pva_files, monkeypatch):
    """CelebAHQ-IDI in its authors' published layout (the folder above celebahq/ given): the node trains on its train
    identities, each sample's mask one of the target's face regions (mirrored with it) joined with one of the random
    masks, the prompt followed by the target's CelebA-Dialog caption where drawn; a download without its region file
    is refused before any work."""
    import shutil
    from sefi_testkit.celebahq_idi import NO_LANDMARKS, RESOLUTION, write_celebahq_idi
    host = host_clean
    root = host.input_dir / "pva_celebahq_idi"
    shutil.rmtree(root, ignore_errors=True)
    idi = write_celebahq_idi(root / "celebahq", size=PHOTO_SIZE)
    tuner_class = host.module("nodes.pva.training").PVAFineTuner
    masks, prompts, samples, denoise = [], [], tuner_class.samples, tuner_class.denoise

    def recording_samples(self, squares, vae):
        masks.extend(mask for _, mask in squares)
        return samples(self, squares, vae)

    def recording_denoise(self, *args, prompt=None, **kwargs):
        prompts.append(prompt)
        return denoise(self, *args, prompt=prompt, **kwargs)
    monkeypatch.setattr(tuner_class, "samples", recording_samples)
    monkeypatch.setattr(tuner_class, "denoise", recording_denoise)
    result = host.run(train_graph("celebahq_idi", steps=4, dataset_folder="pva_celebahq_idi"))
    assert result.success, result.error
    settings = load(host, "celebahq_idi.safetensors").settings
    assert (settings["dataset"], settings["people"], settings["photos"]) == ("celebahq", 3, len(idi.images("train")))

    def region(image, name):  # the box as the authors paint it: (top, left, bottom, right) at 1024 px, scaled
        if image == NO_LANDMARKS:  # empty boxes: the aligned face box instead
            dataset_module = host.module("sefi_core.pva.dataset")
            return dataset_module.box_mask(dataset_module.ALIGNED_FACE_BOX, PHOTO_SIZE)
        top, left, bottom, right = (int(v) * PHOTO_SIZE // RESOLUTION for v in idi.boxes[name][image].tolist())
        mask = torch.zeros(PHOTO_SIZE, PHOTO_SIZE)
        mask[top:bottom, left:right] = 1
        return mask
    randoms = [torch.from_numpy(np.asarray(Image.open(path)) > 127).float() for path in idi.masks]
    boxes = [box for image in idi.images("train") for name in ("lowerface", "eyebrow", "wholeface")
             for box in (region(image, name), region(image, name).flip(-1))]
    allowed = [torch.maximum(box, random) for box in boxes for random in randoms]
    assert len(masks) == 4 and all(any(torch.equal(mask, a) for a in allowed) for mask in masks)
    captions = {f"photo of a sks person. {text}" for text in idi.captions.values()}
    assert len(prompts) == 4 and set(prompts) - {None} <= captions and set(prompts) & captions
    (root / "celebahq" / "annotation" / "region_bbox.pth").unlink()
    broken = host.run(train_graph("celebahq_idi_broken", steps=2, dataset_folder="pva_celebahq_idi"))
    assert not broken.success and "region_bbox.pth is missing" in broken.error["exception_message"]
    assert not host.progress and not (host.pva_encoder_dir / "celebahq_idi_broken.safetensors").exists()


def test_on_sd2_inpainting_an_encoder_trains_and_records_its_base_and_a_fine_tune_starts_from_it(host_clean, dataset):
    """The PVA authors' base: a new encoder makes 1024-d tokens, trains every layer's projections (which take 1024-d
    tokens) and a 1024-d word in OpenCLIP ViT-H's table, and its file says SD2 inpainting; the identity fine-tuned
    from it does too."""
    host = host_clean
    ckpt = host.checkpoint("tiny_sd2_inpaint")
    result = host.run(train_graph("sd2", steps=1, ckpt=ckpt))
    assert result.success, result.error
    encoder = load(host, "sd2.safetensors")
    model, clip, _ = host.load_checkpoint(ckpt)
    layers = host.module("nodes.pva.patch").cross_attention_layers(model)
    assert encoder.base.name == "sd2-inpainting" and encoder.network.project.out_features == 1024
    assert set(encoder.projections) == set(layers) and encoder.word.shape == (1024,)
    assert all(encoder.projections[n].to_k.shape == layers[n].to_k.weight.shape == (320, 1024) for n in layers)
    assert not torch.allclose(encoder.word, probe.embedding(clip, "sks"))  # trained, from the trigger's ViT-H row
    graph = fine_tune_graph(steps=1, name="sd2_from_trained", recognizer="r18.safetensors", ckpt=ckpt,
                            encoder="sd2.safetensors")
    result = host.run(graph)
    assert result.success, result.error
    identity = host.module("sefi_core.pva.identity").load_pva_identity(
        str(host.pva_identity_dir / "sd2_from_trained.safetensors"))
    assert identity.base == encoder.base and identity.encoder == encoder.hash
