"""PVA's loaders and PVA Fine-tune Identity through the real host, on tiny SD1.5- and SD2-inpainting checkpoints with
random weights: the graph runs and its identity inpaints through ComfyUI's own nodes; what the fine-tune computes is
what PVA Apply and the host's sampler compute, on either base; gradients reach only the visual projections and the word; the host's model
is left as it was; files that are not plain weights, and models that do not fit, are refused by name.

A random recognizer (iresnet r18) and a random one-layer encoder stand in for trained ones (sefi_testkit/pva.py)."""
import pytest
import torch

from sefi_testkit import probe
from sefi_testkit.pva import CHECKPOINTS, ENCODERS, PHOTO_SIZE, fine_tune_graph, photo, recognizer_and_encoder

BASES = pytest.mark.parametrize("base", ["sd15", "sd2"])  # SD1.5 inpainting, and SD2's: the PVA authors' base

ATOL = 1e-4  # eps values of size ~1; batch composition (2 timesteps vs CFG's 2 rows) moves CPU kernels by ~1e-6


@BASES
def test_fine_tune_then_apply_inpaints_through_comfyuis_own_nodes(host_clean, pva_files, base):
    host = host_clean
    graph = fine_tune_graph(photos=("pva_photo0.png", "pva_photo1.png"), ckpt=CHECKPOINTS[base],
                            encoder=ENCODERS[base])
    graph.update({
        "6": {"class_type": "PVAApply", "inputs": {"model": ["1", 0], "clip": ["1", 1], "pva_identity": ["5", 0],
                                                   "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0,
                                                   "on_negative": True}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "photo of a sks person", "clip": ["6", 1]}},
        "8": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["6", 1]}},
        "9": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": PHOTO_SIZE, "height": PHOTO_SIZE}},
        "10": {"class_type": "InpaintModelConditioning", "inputs": {
            "positive": ["7", 0], "negative": ["8", 0], "vae": ["1", 2], "pixels": ["4", 0], "mask": ["9", 0],
            "noise_mask": True}},
        "11": {"class_type": "KSampler", "inputs": {
            "model": ["6", 0], "seed": 0, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["10", 0], "negative": ["10", 1], "latent_image": ["10", 2], "denoise": 1.0}},
        "12": {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": "pva_tuned"}},
    })
    result = host.run(graph)
    assert result.success, result.error
    assert torch.isfinite(probe.saved_latent(host, result, "12")).all()
    # One identity, one result: the saved file, loaded and applied, inpaints exactly what the fine-tune's output did.
    graph["5"] = {"class_type": "PVALoadIdentity", "inputs": {"pva_identity_file": "fine_tuned.safetensors"}}
    loaded = host.run(graph)
    assert loaded.success, loaded.error
    assert torch.equal(probe.saved_latent(host, loaded, "12"), probe.saved_latent(host, result, "12"))
    saved = host.module("sefi_core.pva.identity").load_pva_identity(str(host.pva_identity_dir /
                                                                               "fine_tuned.safetensors"))
    model, clip, _ = host.load_checkpoint(CHECKPOINTS[base])
    layers = host.module("nodes.pva.patch").cross_attention_layers(model)
    width = {"sd15": 768, "sd2": 1024}[base]
    assert set(saved.projections) == set(layers) and saved.visual_tokens.shape == (10, width)
    assert saved.base.name == f"{base}-inpainting" and saved.word.shape == (width,)
    assert saved.trigger == "sks" and saved.recognizer == "iresnet r18 (r18.pth)" and saved.settings["photos"] == 2
    assert saved.settings["steps"] == 2 and saved.base_model
    moved = [not torch.equal(saved.projections[n].to_k, layers[n].to_k.weight.float().half().float()) for n in layers]
    assert all(moved), "every layer's visual projections are trained"
    assert not torch.allclose(saved.word, probe.embedding(clip, "sks")), "the word is trained"
    assert len(host.progress) >= 2  # the progress bar moved with the steps


@BASES
def test_the_fine_tune_computes_what_apply_and_the_hosts_sampler_compute(host_clean, pva_files, base):
    """For a fine-tuned identity, the eps the fine-tune's denoise predicts (its word in "photo of a sks person", its
    inpainting channels, its patched UNet) equals the positive row's eps through PVA Apply's MODEL and CLIP,
    CLIPTextEncode, InpaintModelConditioning with the same face mask and one call of the host's sampler at the same
    sigma and noise, at three noise levels; on SD2, with its CLIP's penultimate layer and 1024-d word, as on SD1.5."""
    host = host_clean
    fine_tune = host.module("nodes.pva.fine_tune")
    recognizer, encoder = recognizer_and_encoder(host, ENCODERS[base])
    model, clip, vae = host.load_checkpoint(CHECKPOINTS[base])
    pixels = photo(host)
    with torch.inference_mode():
        identity = fine_tune.PVAFineTuneIdentity.execute(
            image=[pixels], model=[model], clip=[clip], vae=[vae], face_recognizer=[recognizer], pva_encoder=[encoder],
            name=["exact"], trigger=["sks"], steps=[2], timesteps_per_step=[2], projection_learning_rate=[0.001],
            word_learning_rate=[0.01], seed=[0], resolution=[PHOTO_SIZE], overwrite=[True]).result[0]
        patched_model, patched_clip = host.node("PVAApply").execute(
            model=model, clip=clip, pva_identity=identity, strength=1.0, start_percent=0.0, end_percent=1.0,
            on_negative=True).result
        mask = fine_tune.face_box_mask(PHOTO_SIZE)[None]
        positive, negative = (probe.encode(host, patched_clip, text) for text in ("photo of a sks person", ""))
        positive, negative, latent = host.nodes.InpaintModelConditioning().encode(positive, negative, pixels, vae,
                                                                                  mask, noise_mask=False)
    timesteps = (100, 500, 900)
    noise = torch.randn((1, 4, PHOTO_SIZE // 8, PHOTO_SIZE // 8), generator=torch.Generator().manual_seed(5))
    applied = [probe.sampler_eps(patched_model, positive, negative, latent["samples"], noise, t)[1] for t in timesteps]

    squares = fine_tune.square_photos([pixels[0]], None, PHOTO_SIZE)
    training = host.module("nodes.training")
    tuner = host.module("nodes.pva.training").PVAFineTuner(model, clip, "sks", identity.visual_tokens, "test")
    with training.training_session(tuner, grad=False):
        for name, projections in identity.projections.items():  # the fine-tuned identity's weights
            for mine, theirs in zip(tuner.identity.projections[name].tensors(), projections.tensors()):
                mine.copy_(theirs)
        sample = tuner.samples(squares, vae)[0]
        trained = tuner.denoise(sample.latent.expand(3, -1, -1, -1), noise.expand(3, -1, -1, -1),
                                torch.tensor(timesteps), sample.concat.expand(3, -1, -1, -1), identity.word)
    for k, t in enumerate(timesteps):
        torch.testing.assert_close(trained[k:k + 1].cpu(), applied[k].cpu(), rtol=0, atol=ATOL,
                                   msg=lambda m: f"t={t}: {m}")
    # The check can fail: without the identity's word (the trigger's plain embedding) the predictions part.
    with training.training_session(tuner, grad=False):
        plain_word = tuner.denoise(sample.latent, noise, torch.tensor(timesteps[1:2]), sample.concat,
                                   tuner.initial_word.to(tuner.device))
    assert (plain_word - applied[1]).abs().max() > 10 * ATOL


def test_gradients_reach_only_the_visual_projections_and_the_word_and_the_host_model_is_left_as_it_was(
        host_clean, pva_files):
    host = host_clean
    fine_tune, training = host.module("nodes.pva.fine_tune"), host.module("nodes.training")
    pva_train = host.module("sefi_core.pva.train")
    recognizer, encoder = recognizer_and_encoder(host)
    model, clip, vae = host.load_checkpoint("tiny_inpaint.safetensors")
    import comfy.model_management
    comfy.model_management.unload_all_models()  # an earlier test's patched MODEL may still be loaded, its patches set
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    flags = [p.requires_grad for p in model.model.parameters()]
    patches = dict(model.object_patches)
    squares = fine_tune.square_photos([photo(host)[0]], None, PHOTO_SIZE)
    tokens = fine_tune.visual_tokens(recognizer, encoder, squares)
    tuner = host.module("nodes.pva.training").PVAFineTuner(model, clip, "sks", tokens, "test")
    with training.training_session(tuner):
        sample = tuner.samples(squares, vae)[0]
        loss = pva_train.denoising_loss(sample, tuner.identity, tuner.denoise, 2, torch.Generator().manual_seed(0))
        loss.backward()
        trained = tuner.identity.projection_tensors() + [tuner.identity.word_offset]
        assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in trained)
        frozen_params = list(tuner.model.model.parameters()) + list(tuner.clip.cond_stage_model.parameters())
        assert all(p.grad is None and not p.requires_grad for p in frozen_params)
    assert all(p.grad is None for net in (recognizer.network, encoder.network) for p in net.parameters())
    after = model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in model.model.parameters()] == flags and dict(model.object_patches) == patches
    layers = host.module("nodes.pva.patch").cross_attention_layers(model)
    # (the host restores an object patch by setting the original bound method back on the module)
    assert all(getattr(layer.forward, "__func__", None) is type(layer).forward for layer in layers.values()), \
        "no PVA forward left on the host's layers"


def test_loaders_read_plain_weights_only_and_name_what_is_wrong(host_clean, pva_files):
    host = host_clean
    load_recognizer, load_encoder = host.node("PVALoadFaceRecognizer"), host.node("PVALoadEncoder")
    recognizer, _ = pva_files
    with torch.inference_mode():
        loaded = load_recognizer.execute(recognizer_file="r18.pth").result[0]
        with pytest.raises(ValueError, match=r"code\.pth could not be read as plain weights.*refused"):
            load_recognizer.execute(recognizer_file="code.pth")
        with pytest.raises(ValueError, match=r"other\.pth is not an ArcFace iresnet state dict"):
            load_recognizer.execute(recognizer_file="other.pth")
    assert loaded.network.depth == "r18"
    assert all(torch.equal(a, b) for a, b in zip(loaded.network.state_dict().values(), recognizer.state_dict().values()))
    assert "No face recognizer 'ghost.pth' in models/face_recognizers" in \
        load_recognizer.validate_inputs(recognizer_file="ghost.pth")
    (host.pva_encoder_dir / "identity.safetensors").write_bytes((host.pva_identity_dir / "fine_tuned.safetensors")
                                                                 .read_bytes()
                                                                 if (host.pva_identity_dir / "fine_tuned.safetensors")
                                                                 .exists() else b"junk")
    with torch.inference_mode(), pytest.raises(ValueError, match=r"identity\.safetensors is (a \.safetensors file but )?not"):
        load_encoder.execute(encoder_file="identity.safetensors")


def test_models_and_inputs_that_do_not_fit_are_refused_by_name(host_clean, pva_files):
    host = host_clean
    plain = host.run(fine_tune_graph(ckpt="tiny.safetensors"))
    assert not plain.success and "PVA Fine-tune Identity works on an inpainting model" in plain.error["exception_message"]
    fine_tune = host.module("nodes.pva.fine_tune")
    recognizer, encoder = recognizer_and_encoder(host)
    model, clip, vae = host.load_checkpoint("tiny_inpaint.safetensors")
    inputs = dict(model=[model], clip=[clip], vae=[vae], face_recognizer=[recognizer], pva_encoder=[encoder],
                  name=["many"], trigger=["sks"], steps=[1], timesteps_per_step=[2], projection_learning_rate=[2e-5],
                  word_learning_rate=[1e-3], seed=[0], resolution=[PHOTO_SIZE], overwrite=[True])
    with torch.inference_mode(), pytest.raises(ValueError, match="takes 1-5 photos of the person.*it got 6"):
        fine_tune.PVAFineTuneIdentity.execute(image=[photo(host)] * 6, **inputs)
    with torch.inference_mode(), pytest.raises(ValueError, match="'seed' received a list of 2 values, but PVA "
                                                                 "Fine-tune Identity"):
        fine_tune.PVAFineTuneIdentity.execute(image=[photo(host)], **{**inputs, "seed": [0, 1]})
    assert not (host.pva_identity_dir / "many.safetensors").exists()


def test_pva_speaks_as_pva(host_clean, pva_files):
    """The checks PVA shares with SeFi name the PVA node that speaks, and describe what PVA does without a mask."""
    host = host_clean
    recognizer, encoder = recognizer_and_encoder(host)
    model, clip, vae = host.load_checkpoint("tiny_inpaint.safetensors")
    inputs = dict(model=[model], clip=[clip], vae=[vae], face_recognizer=[recognizer], pva_encoder=[encoder],
                  name=["words"], trigger=["sks"], steps=[1], timesteps_per_step=[2], projection_learning_rate=[2e-5],
                  word_learning_rate=[1e-3], seed=[0], resolution=[PHOTO_SIZE], overwrite=[True])
    execute = host.node("PVAFineTuneIdentity").execute
    refusals = {"small": dict(image=[photo(host)[:, :40]]),
                "empty mask": dict(image=[photo(host)], face_mask=[torch.zeros(1, PHOTO_SIZE, PHOTO_SIZE)]),
                "mask of another size": dict(image=[photo(host)], face_mask=[torch.ones(1, 16, PHOTO_SIZE)])}
    messages = {}
    for name, given in refusals.items():
        with torch.inference_mode(), pytest.raises(ValueError) as refused:
            execute(**given, **inputs)
        messages[name] = str(refused.value)
    assert "PVA Fine-tune Identity needs at least 64 on the short side" in messages["small"]
    assert "The face mask is empty" in messages["empty mask"] and "aligned face box" in messages["empty mask"]
    assert "The face mask(s) (1: 64x16) do not fit the photo(s) (1: 64x64)" in messages["mask of another size"]
    assert not any("SeFi" in message for message in messages.values()), messages
    assert not (host.pva_identity_dir / "words.safetensors").exists()


def fine_tune_gradients(host, setup, t=400):
    """Unscaled gradients of the projections and the word for one fixed photo, noise and timestep pair, computed as
    the fine-tune does (its loss, its loss scaler), with `setup`'s dtypes and attention (sefi_testkit.gpu_emulation)."""
    from sefi_testkit import gpu_emulation as gpu

    fine_tune, training = host.module("nodes.pva.fine_tune"), host.module("nodes.training")
    loss_scaler = host.module("sefi_core.training").loss_scaler
    recognizer, encoder = recognizer_and_encoder(host)
    with gpu.emulate(setup):
        model, clip, vae = host.load_checkpoint("tiny_inpaint.safetensors")
        squares = fine_tune.square_photos([photo(host)[0]], None, PHOTO_SIZE)
        tuner = host.module("nodes.pva.training").PVAFineTuner(
            model, clip, "sks", fine_tune.visual_tokens(recognizer, encoder, squares), "test")
        with training.training_session(tuner):
            dtype = tuner.dtype
            sample = tuner.samples(squares, vae)[0]
            noise = torch.randn((2, 4, PHOTO_SIZE // 8, PHOTO_SIZE // 8), generator=torch.Generator().manual_seed(3))
            eps = tuner.denoise(sample.latent.expand(2, -1, -1, -1), noise.to(tuner.device),
                                torch.tensor([t, 1000 - t]), sample.concat.expand(2, -1, -1, -1),
                                tuner.identity.word())
            loss = torch.nn.functional.mse_loss(eps.float(), noise.to(eps.device).float())
            scaler = loss_scaler(tuner.device, dtype)
            params = tuner.identity.projection_tensors() + [tuner.identity.word_offset]
            grads = torch.autograd.grad(scaler.scale(loss), params)
            flat = torch.cat([g.flatten() for g in grads]).double() / scaler.get_scale()
    return flat, float(loss.detach()), dtype, scaler.is_enabled()


@pytest.mark.parametrize("setup_name", ["FP16_SDPA", "BF16_SDPA", "FP16_SPLIT"])
def test_the_fine_tune_in_half_precision_gives_fp32s_gradients(host_clean, pva_files, setup_name):
    """As artists run it on NVIDIA GPUs: the inpainting UNet in fp16/bf16 computed in that dtype, the visual
    projections cast to it in every patched layer, loss scaling in fp16; the gradients point where fp32's do."""
    from sefi_testkit import gpu_emulation as gpu

    setup = getattr(gpu, setup_name)
    reference, loss_32, dtype_32, _ = fine_tune_gradients(host_clean, gpu.CPU_FP32)
    half, loss_h, dtype_h, scaled = fine_tune_gradients(host_clean, setup)
    assert dtype_32 == torch.float32 and dtype_h == setup.compute and scaled == (setup.compute == torch.float16)
    assert torch.isfinite(half).all() and half.norm() > 0
    cosine = float(torch.nn.functional.cosine_similarity(reference, half, dim=0))
    assert cosine >= 0.99, f"{setup}: the gradient's direction differs from fp32's (cosine {cosine:.4f})"
    assert abs(float(half.norm() / reference.norm()) - 1) <= 0.05
    assert loss_h == pytest.approx(loss_32, rel=0.02)


def test_recognizers_that_would_give_nan_features_are_refused_before_the_fine_tune(host_clean, pva_files, tmp_path):
    """A damaged recognizer (finite weights, NaN or infinite features) is refused at load where that can be seen (a
    negative batch-norm variance), else before the fine-tune, naming the recognizer: never 'lower the learning
    rates'. A file cut short is called damaged, not a pickle holding code; a .pth whose state_dict is a list says so."""
    from safetensors.torch import save_file
    host = host_clean
    recognizer, _ = pva_files
    state = {k: v.clone() for k, v in recognizer.state_dict().items()}
    negative = {**state, "bn2.running_var": -state["bn2.running_var"].abs() - 1}
    save_file(negative, str(host.face_recognizer_dir / "negative.safetensors"))
    big = torch.full_like(state["features.bias"], 3e38)  # finite weights: y = 3e38 (z + 1) overflows for z > 0.14
    huge = {**state, "features.weight": big, "features.bias": big.clone()}
    save_file(huge, str(host.face_recognizer_dir / "huge.safetensors"))
    (host.face_recognizer_dir / "cut.pth").write_bytes((host.face_recognizer_dir / "r18.pth").read_bytes()[:4000])
    torch.save({"state_dict": [torch.zeros(1)]}, host.face_recognizer_dir / "listed.pth")
    load = host.node("PVALoadFaceRecognizer").execute
    with torch.inference_mode():
        for file, message in [("negative.safetensors", "negative.safetensors holds negative batch-norm variances"),
                              ("cut.pth", "cut.pth could not be read .*it is damaged or was not downloaded whole"),
                              ("listed.pth", "listed.pth holds a list where a recognizer's state dict")]:
            with pytest.raises(ValueError, match=message):
                load(recognizer_file=file)
        infinite = load(recognizer_file="huge.safetensors").result[0]
        _, encoder = recognizer_and_encoder(host)
        model, clip, vae = host.load_checkpoint("tiny_inpaint.safetensors")
        with pytest.raises(ValueError, match=r"iresnet r18 \(huge.safetensors\)('s features| gives NaN or infinite "
                                             r"features).*the recognizer .*is damaged") as refused:
            host.node("PVAFineTuneIdentity").execute(
                image=[photo(host)], model=[model], clip=[clip], vae=[vae], face_recognizer=[infinite],
                pva_encoder=[encoder], name=["nan_features"], trigger=["sks"], steps=[1], timesteps_per_step=[2],
                projection_learning_rate=[2e-5], word_learning_rate=[1e-3], seed=[0], resolution=[PHOTO_SIZE],
                overwrite=[True])
    assert "learning rate" not in str(refused.value) and not host.progress
    assert not (host.pva_identity_dir / "nan_features.safetensors").exists()
