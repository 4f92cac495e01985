"""SeFi Train Identity against the real host: trains, saves, loads, applies; cancels cleanly; leaves the
host model as it was."""
import numpy as np
import pytest
import torch
from PIL import Image

from sefi_core.sefi.identity import load_identity
from sefi_testkit import probe
from sefi_testkit.probe import train_graph


def trainer_module(host):
    """nodes/sefi/training.py: SeFi's trainer; the training session both systems share is nodes/training.py."""
    return host.module("nodes.sefi.training")


def fixed_pair_loss(host, trainer, samples, k_tokens, v_tokens):
    """Denoising loss of (K, V) tokens on fixed (t, noise) pairs, stage by stage."""
    g = torch.Generator().manual_seed(123)
    total = 0.0
    with torch.no_grad():
        for t in (50, 250, 450, 650, 850):
            stage = 4 - t // 200
            latent, mask = samples[0]
            noise = torch.randn(latent.shape, generator=g)
            k_ctx, v_ctx = trainer.encode_kv(0, k_tokens[stage], v_tokens[stage])
            eps, _ = trainer.denoise(latent, noise, t, k_ctx, v_ctx, 0)
            total += float(((eps - noise) ** 2 * mask).sum() / (mask.sum() * 4))
    return total


def test_training_lowers_the_loss_saves_and_the_identity_applies(host):
    result = host.run(train_graph("trained_a", steps=30))
    assert result.success, result.error
    path = host.identity_dir / "trained_a.safetensors"
    identity = load_identity(path)
    assert identity.trigger == "sks" and identity.stage_count == 5 and identity.training["steps"] == 30
    assert len(result.outputs["4"]["images"]) == 1  # the loss curve
    assert [v for v, _ in host.progress][-1] == 30

    model, clip, vae = host.load_checkpoint("tiny.safetensors")
    training, shared = trainer_module(host), host.module("nodes.training")
    trainer = training.HostTrainer(model, clip, "sks", "person", "all")
    with shared.training_session(trainer):
        image = host.nodes.LoadImage().load_image("astronaut.png")[0]
        samples = trainer.training_samples(image, vae, 64, 1, torch.Generator().manual_seed(0))
        trainer.find_loss_layers(samples[0][0])
        cls = probe.embedding(clip, "person").expand(5, 768)
        before = fixed_pair_loss(host, trainer, samples, cls, cls)
        after = fixed_pair_loss(host, trainer, samples, identity.k_tokens, identity.v_tokens)
    assert after < before

    graph = probe.txt2img_graph("a photo of sks laughing", "blurry", identity="trained_a.safetensors")
    applied = host.run(graph)
    assert applied.success, applied.error
    assert torch.isfinite(probe.saved_latent(host, applied)).all()


def test_host_model_is_unchanged_by_training(host):
    model, clip, vae = host.load_checkpoint("tiny.safetensors")
    flags = [p.requires_grad for p in model.model.parameters()] + [p.requires_grad for p in clip.cond_stage_model.parameters()]
    pos, neg = probe.encode(host, clip, "a photo of a person"), probe.encode(host, clip, "blurry")
    before = probe.sample(host, model, pos, neg, steps=2)
    image = host.nodes.LoadImage().load_image("chelsea.png")[0]
    probe.train_node(host, model=model, clip=clip, vae=vae, image=image, name="cat_b", trigger="sks", class_word="cat",
                     steps=3, learning_rate=0.005, attention_weight=0.003, seed=0, resolution=64, kv_pairs="1",
                     attention_loss="trigger only (#1)", overwrite=True)
    after_flags = [p.requires_grad for p in model.model.parameters()] + [p.requires_grad for p in clip.cond_stage_model.parameters()]
    assert after_flags == flags
    assert all(p.grad is None for p in model.model.parameters())
    assert all(p.grad is None for p in clip.cond_stage_model.parameters())
    assert torch.equal(probe.encode(host, clip, "a photo of a person")[0][0], pos[0][0])
    assert torch.equal(probe.sample(host, model, pos, neg, steps=2), before)
    assert load_identity(host.identity_dir / "cat_b.safetensors").stage_count == 1


def test_cancel_leaves_no_file_and_the_next_prompt_runs(host):
    host.interrupt_at_tick(2)
    result = host.run(train_graph("cancelled", steps=200))
    assert result.interrupted and not result.success
    assert not list(host.identity_dir.glob("cancelled*")) and not list(host.identity_dir.glob(".sefi-*"))
    assert host.run(probe.txt2img_graph("a photo of a person", "blurry")).success


@pytest.mark.parametrize("extra, message", [
    ({"name": "../escape"}, "path separator"),
    ({"trigger": "two words"}, "has spaces"),
])
def test_bad_inputs_fail_before_any_work(host, extra, message):
    result = host.run(train_graph(**{"name": "x", "steps": 500, **extra}))
    assert not result.success
    assert message in result.error["exception_message"]
    assert host.progress == []  # no training step ran


def test_existing_identity_is_not_overwritten(host):
    path = host.identity_dir / "keep_me.safetensors"
    assert host.run(train_graph("keep_me", steps=2)).success
    before = path.read_bytes()
    result = host.run(train_graph("keep_me", steps=2, seed=7))
    assert not result.success and "overwrite" in result.error["exception_message"]
    assert path.read_bytes() == before
    assert host.run(train_graph("keep_me", steps=2, seed=7, overwrite=True)).success
    seven = load_identity(path)
    assert not torch.equal(seven.v_tokens, load_identity_bytes(before, host.identity_dir).v_tokens)
    assert host.run(train_graph("keep_me", steps=2, seed=7, overwrite=True)).success  # fresh run, no cache
    again = load_identity(path)  # deterministic for a seed on CPU
    assert torch.equal(again.k_tokens, seven.k_tokens) and torch.equal(again.v_tokens, seven.v_tokens)


def load_identity_bytes(data, folder):
    copy = folder / "copy_of_before.safetensors"
    copy.write_bytes(data)
    return load_identity(copy)


def test_zero_steps_is_rejected_by_validation(host):
    result = host.run(train_graph("zero", steps=0))
    assert not result.success and result.node_errors


def execute_training(host, model, clip, vae, name, image=None, **extra):
    image = image if image is not None else host.nodes.LoadImage().load_image("astronaut.png")[0]
    inputs = dict(model=model, clip=clip, vae=vae, image=image, name=name, trigger="sks", class_word="person", steps=3,
                  learning_rate=0.005, attention_weight=0.003, seed=0, resolution=64, kv_pairs="5",
                  attention_loss="all tokens (#3, paper)", overwrite=True, gradient_checkpointing="auto",
                  keep_training_state=False)
    inputs.update(extra)
    return probe.train_node(host, **inputs)


@pytest.mark.parametrize("preset", ["tiny", "tiny_sdxl"])
def test_gradient_checkpointing_recomputes_blocks_and_gives_the_same_gradients(host, preset):
    model, clip, vae = host.load_checkpoint(host.checkpoint(preset))
    training, shared = trainer_module(host), host.module("nodes.training")
    train, mapper_module = host.module("sefi_core.sefi.train"), host.module("sefi_core.sefi.mapper")
    trainer = training.HostTrainer(model, clip, "sks", "person", "all")
    # The last ResBlock: it comes after cross-attention, so its activations depend on the tokens.
    res_block = [m for m in model.model.diffusion_model.modules() if isinstance(m, shared.GradientCheckpointing.BLOCKS[0])][-1]
    calls = []
    handle = res_block.in_layers[2].register_forward_hook(lambda *args: calls.append(1))  # a conv inside the block
    gradients = []
    try:
        with shared.training_session(trainer):
            image = host.nodes.LoadImage().load_image("astronaut.png")[0]
            latent, mask = trainer.training_samples(image, vae, 64, 1, torch.Generator().manual_seed(0))[0]
            trainer.find_loss_layers(latent)
            batch = train.Batch(latent, mask, 400, 0, torch.randn(latent.shape, generator=torch.Generator().manual_seed(1)))
            for enabled in (False, True):
                trainer.checkpointing.enabled = enabled
                torch.manual_seed(3)
                mapper = mapper_module.TokenMapper(probe.embedding(clip, "person"), 5, widths=trainer.token_widths)
                torch.nn.init.normal_(mapper.out.weight, std=1.0)
                calls.clear()
                l_kv, l_attn = train.loss_terms(mapper, batch, trainer.encode_kv, trainer.denoise, train.even_boundaries(5))
                (l_kv + 0.003 * l_attn).backward()
                gradients.append(torch.cat([p.grad.flatten() for p in mapper.parameters()]))
                assert len(calls) == (2 if enabled else 1)  # forward, and with checkpointing its recompute in backward
    finally:
        handle.remove()
    assert "forward" not in res_block.__dict__  # the checkpointing forward is gone after the call
    torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-5, atol=1e-9)


ALLOCATION_FAILURES = {  # what the host can raise when the GPU is full: torch's OOM, and aimdo's under dynamic VRAM
    "torch-oom": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "aimdo-vbar": lambda: MemoryError("VBAR allocation failed"),
}


def oom_unless_checkpointing(monkeypatch, host, failure="torch-oom"):
    """Emulates a GPU without room for training without gradient checkpointing."""
    training = trainer_module(host)
    original = training.HostTrainer._apply

    def apply(self, *args):
        if torch.is_grad_enabled() and not self.checkpointing.enabled:  # activations kept for backward do not fit
            raise ALLOCATION_FAILURES[failure]()
        return original(self, *args)

    monkeypatch.setattr(training.HostTrainer, "_apply", apply)


@pytest.mark.parametrize("failure, preset", [("torch-oom", "tiny"), ("aimdo-vbar", "tiny"), ("torch-oom", "tiny_sdxl")])
def test_out_of_memory_in_auto_retries_with_gradient_checkpointing(host, monkeypatch, caplog, failure, preset):
    model, clip, vae = host.load_checkpoint(host.checkpoint(preset))
    oom_unless_checkpointing(monkeypatch, host, failure)
    stages = "5" if preset == "tiny" else "1"  # SDXL: fewer bigG encodes
    execute_training(host, model, clip, vae, "oom_auto", gradient_checkpointing="auto", kv_pairs=stages, steps=2)
    assert load_identity(host.identity_dir / "oom_auto.safetensors").stage_count == int(stages)
    assert "starting again with gradient checkpointing" in caplog.text


OOM_MESSAGE = (r"ran out of GPU memory at 64 px with gradient checkpointing off\. Lower 'resolution' \(e\.g\. 256\) or set "
               r"'gradient_checkpointing' to 'on' \(or 'auto'\)\. Nothing was saved; the loaded model is unchanged\.")


@pytest.mark.parametrize("failure", list(ALLOCATION_FAILURES))
def test_out_of_memory_without_checkpointing_says_what_to_change_and_saves_nothing(host, monkeypatch, failure):
    model, clip, vae = host.load_checkpoint("tiny.safetensors")
    flags = [p.requires_grad for p in model.model.parameters()]
    oom_unless_checkpointing(monkeypatch, host, failure)
    with pytest.raises(RuntimeError, match=OOM_MESSAGE):
        execute_training(host, model, clip, vae, "oom_off", gradient_checkpointing="off")
    assert not list(host.identity_dir.glob("oom_off*")) and not list(host.identity_dir.glob(".sefi-*"))
    assert [p.requires_grad for p in model.model.parameters()] == flags
    assert all(p.grad is None for p in model.model.parameters())


def test_out_of_memory_while_loading_says_what_to_change(host, monkeypatch):
    model, clip, vae = host.load_checkpoint("tiny.safetensors")
    training = trainer_module(host)

    def load(self):
        raise MemoryError("VBAR allocation failed")

    monkeypatch.setattr(training.HostTrainer, "load", load)
    with pytest.raises(RuntimeError, match=OOM_MESSAGE):
        execute_training(host, model, clip, vae, "oom_load", gradient_checkpointing="off")
    assert not list(host.identity_dir.glob("oom_load*"))


def test_other_errors_are_not_taken_for_out_of_memory(host):
    training = host.module("nodes.training")
    assert not training.is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not training.is_out_of_memory(ValueError("out of range"))
    assert all(training.is_out_of_memory(make()) for make in ALLOCATION_FAILURES.values())


def test_training_clones_are_classic_and_every_tensor_is_on_the_training_device(host, monkeypatch):
    """Dynamic VRAM (v0.33 on NVIDIA) never engages on a CPU, so what can be proven here is the construction: the
    clones are asked for with disable_dynamic=True where the host has it, are classic patchers, and after loading
    every weight, loss weight, sample and reference the trainer uses sits on its device."""
    model, clip, vae = host.load_checkpoint("tiny.safetensors")
    training, shared = trainer_module(host), host.module("nodes.training")
    asked = []
    for patcher in (model, clip):
        real_clone = patcher.clone

        def clone(*args, _real=real_clone, **kwargs):
            asked.append(kwargs)
            return _real(*args, **kwargs)

        monkeypatch.setattr(patcher, "clone", clone)
    trainer = training.HostTrainer(model, clip, "sks", "person", "all")
    has_dynamic_vram = hasattr(host.comfy.model_patcher, "ModelPatcherDynamic")
    assert asked == ([{"disable_dynamic": True}] * 2 if has_dynamic_vram else [{}] * 2)
    assert type(trainer.model) is host.comfy.model_patcher.ModelPatcher
    assert type(trainer.clip.patcher) is host.comfy.model_patcher.ModelPatcher
    assert not has_dynamic_vram or not (trainer.model.is_dynamic() or trainer.clip.patcher.is_dynamic())
    assert trainer.model.model is model.model  # a classic patcher: the loaded weights are shared, nothing reloaded
    assert trainer.clip.cond_stage_model is trainer.clip.patcher.model
    with shared.training_session(trainer):
        image = host.nodes.LoadImage().load_image("astronaut.png")[0]
        samples = trainer.training_samples(image, vae, 64, 2, torch.Generator().manual_seed(0))
        trainer.find_loss_layers(samples[0][0])
        device = torch.device(trainer.device)
        tensors = [*trainer.model.model.parameters(), *trainer.clip.cond_stage_model.parameters(),
                   *(t for pair in samples for t in pair), trainer.reference(0),
                   *(w for pair in trainer._loss_weights.values() for w in pair)]
        assert trainer.loss_layers and {t.device for t in tensors} == {device}
        assert all(w.dtype == torch.float32 for pair in trainer._loss_weights.values() for w in pair)


def test_a_partly_loaded_model_is_refused_before_training(host):
    """Low-VRAM loading leaves weights off the device, to be cast per call: training must not start on that."""
    model, clip, vae = host.load_checkpoint("tiny.safetensors")
    training = trainer_module(host)
    trainer = training.HostTrainer(model, clip, "sks", "person", "all")
    with pytest.raises(RuntimeError, match=r"ComfyUI kept part of the model on meta instead of cpu \(low-VRAM loading\)"):
        layer = trainer.model.model.diffusion_model.out[2]
        saved = layer.weight
        try:
            layer.weight = torch.nn.Parameter(torch.empty(saved.shape, device="meta"), requires_grad=False)
            host.module("nodes.training").check_resident(trainer.model, "cpu")
        finally:
            layer.weight = saved


def test_training_gives_back_what_it_loaded(host):
    model, clip, vae = host.load_checkpoint("tiny.safetensors")
    mm = host.model_management
    execute_training(host, model, clip, vae, "released", gradient_checkpointing="on")
    loaded = [m.model for m in mm.current_loaded_models if m.model is not None]
    assert all(not patcher.is_clone(model) or patcher is model for patcher in loaded), "a training clone of the UNet is still loaded"
    assert all(not patcher.is_clone(clip.patcher) or patcher is clip.patcher for patcher in loaded), "a training CLIP is still loaded"
    layers = clip.cond_stage_model.clip_l.transformer.text_model.encoder.layers
    assert all(getattr(layer.forward, "__func__", None) is type(layer).forward for layer in layers)
    assert not any("forward" in m.__dict__ for m in model.model.diffusion_model.modules())


@pytest.mark.parametrize("extra, message", [
    ({"trigger": "person"}, "The trigger word 'person' is the class word itself: every 'person' in a prompt would "
                            "become this identity. Use a rare word such as 'sks' as the trigger."),
    ({"trigger": "!!!"}, "The trigger word '!!!' has no letter or digit, so prompts cannot name it reliably. Use a rare "
                         "word such as 'sks' or 'ohwx'."),
    ({"class_word": "(dog)"}, "The class word '(dog)' contains prompt syntax '()'. Use plain words, e.g. 'golden retriever'."),
])
def test_bad_words_are_refused_with_their_fix(host, extra, message):
    result = host.run(train_graph(**{"name": "words", "steps": 500, **extra}))
    assert not result.success and message in result.error["exception_message"]
    assert host.progress == []


def test_a_class_word_of_several_words_trains(host):
    result = host.run(train_graph("retriever", steps=2, image="chelsea.png", class_word="golden retriever"))
    assert result.success, result.error
    assert load_identity(host.identity_dir / "retriever.safetensors").class_word == "golden retriever"


def test_images_that_cannot_be_learned_from_are_errors_about_the_image(host, caplog):
    model, clip, vae = host.load_checkpoint("tiny.safetensors")
    broken = torch.rand(1, 96, 96, 3)
    broken[0, 10, 10, 1] = float("nan")
    with pytest.raises(ValueError, match="The image has NaN or infinite pixel values, so there is nothing to learn from. "
                                         "Check the node that made it"):
        execute_training(host, model, clip, vae, "nan_image", image=broken)
    with pytest.raises(ValueError, match="The image is 200x48 pixels; SeFi Train Identity needs at least 64 on the short "
                                         "side \\(512 or more is best\\). Use a larger photo of the subject."):
        execute_training(host, model, clip, vae, "tiny_image", image=torch.rand(1, 48, 200, 3))
    assert not list(host.identity_dir.glob("nan_image*")) and not list(host.identity_dir.glob("tiny_image*"))
    execute_training(host, model, clip, vae, "thin_image", image=torch.rand(1, 64, 320, 3), steps=1)
    assert "the image is 320x64; training uses its centre square" in caplog.text


def test_tokens_that_blow_up_stop_training_and_nothing_is_saved(host):
    result = host.run(train_graph("blown", steps=200, learning_rate=0.1))
    assert not result.success
    message = result.error["exception_message"]
    assert "The identity's tokens grew to a size of" in message
    assert "Lower the learning rate (now 0.1), e.g. to 0.02; nothing was saved." in message
    assert not list(host.identity_dir.glob("blown*"))


def test_requeueing_after_the_file_was_deleted_trains_again(host):
    host.reset()
    path = host.identity_dir / "requeued.safetensors"
    assert host.run(train_graph("requeued", steps=2), fresh=False).success and path.exists()
    assert host.run(train_graph("requeued", steps=2), fresh=False).success
    assert host.progress == []  # unchanged inputs, file still there: the cached result
    path.unlink()
    result = host.run(train_graph("requeued", steps=2), fresh=False)
    assert result.success, result.error
    assert path.exists() and [v for v, _ in host.progress][-1] == 2


def off_centre_subject(host):
    """astronaut.png (512x512) widened to 512x1024 with the photo on the right, and a mask over its face: the centre
    square would hold half the face."""
    photo = host.nodes.LoadImage().load_image("astronaut.png")[0]
    wide = torch.cat([torch.full_like(photo, 0.5), photo], dim=2)  # (1, 512, 1024, 3)
    mask = torch.zeros(1, 512, 1024)
    mask[0, 60:230, 512 + 150:512 + 330] = 1
    return wide, mask


def test_a_subject_mask_crops_around_the_subject_and_the_loss_weights_it(host):
    model, clip, vae = host.load_checkpoint("tiny.safetensors")
    wide, mask = off_centre_subject(host)
    training, shared = trainer_module(host), host.module("nodes.training")
    trainer = training.HostTrainer(model, clip, "sks", "person", "all")
    with shared.training_session(trainer):
        with_mask = trainer.training_samples(wide, vae, 256, 4, torch.Generator().manual_seed(0), mask)
        without = trainer.training_samples(wide, vae, 256, 4, torch.Generator().manual_seed(0))
    for (latent_m, weights_m), (latent_c, weights_c) in zip(with_mask, without):
        assert not torch.allclose(latent_m, latent_c)  # another square: around the face, not the centre
        assert float(weights_m.max()) > 0.5 and float(weights_m.min()) == 0.0 and float(weights_m.max()) <= 1
    # The face covers about 60% of its square: the loss is taken on about that share of where the photo is.
    share = sum(float(w.sum()) for _, w in with_mask) / sum(float(w.sum()) for _, w in without)
    assert 0.4 < share < 0.8, share
    execute_training(host, model, clip, vae, "masked", image=wide, subject_mask=mask, steps=2)
    assert load_identity(host.identity_dir / "masked.safetensors").stage_count == 5


@pytest.mark.parametrize("make_mask, message", [
    (lambda: torch.ones(1, 512, 512), r"The subject mask\(s\) \(1: 512x512\) do not fit the photo\(s\) \(1: 1024x512\)\. "
                                      r"Paint the mask on this photo"),
    (lambda: torch.zeros(1, 512, 1024), "The subject mask is empty: paint over the subject"),
])
def test_a_subject_mask_that_does_not_fit_the_photo_is_refused_before_any_work(host, make_mask, message):
    model, clip, vae = host.load_checkpoint("tiny.safetensors")
    wide, _ = off_centre_subject(host)
    host.progress.clear()
    with pytest.raises(ValueError, match=message):
        execute_training(host, model, clip, vae, "bad_mask", image=wide, subject_mask=make_mask())
    assert host.progress == [] and not list(host.identity_dir.glob("bad_mask*"))


def test_previews_show_on_the_node_as_training_goes_and_leave_the_tokens_unchanged(host):
    graph = train_graph("previewed", steps=6, preview_every=3, overwrite=True)
    graph["5"] = {"class_type": "SaveImage", "inputs": {"images": ["3", 2], "filename_prefix": "previews"}}
    graph["6"] = {"class_type": "SaveImage", "inputs": {"images": ["3", 1], "filename_prefix": "curve"}}
    with_previews = host.run(graph)
    assert with_previews.success, with_previews.error
    shown = list(host.previews)
    tokens_with = load_identity(host.identity_dir / "previewed.safetensors")
    assert host.run(train_graph("previewed", steps=6, preview_every=0, overwrite=True)).success
    tokens_without = load_identity(host.identity_dir / "previewed.safetensors")
    assert torch.equal(tokens_with.k_tokens, tokens_without.k_tokens)  # previews change nothing that is trained
    assert torch.equal(tokens_with.v_tokens, tokens_without.v_tokens)
    assert [step for step, _ in shown] == [3, 6, 6] and host.previews == []
    assert all(kind == "JPEG" and picture.size == (64, 64) for _, (kind, picture, _) in shown[:2])  # 64 px training
    # then the loss curve, so that the node ends on it (frontends keep the last progress preview over the outputs)
    curve = np.asarray(Image.open(host.saved_images(with_previews, "6")[0]).convert("RGB"))  # the loss_curve output
    kind, picture, _ = shown[2][1]
    assert kind == "PNG" and np.array_equal(np.asarray(picture.convert("RGB")), curve)
    strip = Image.open(host.saved_images(with_previews, "5")[0])
    assert strip.width == 2 * 64 and strip.height > 64  # both previews side by side, their steps below


def test_previews_sample_through_applys_path_with_the_same_seed(host):
    """A preview at a step equals what Apply + KSampler make from the same tokens, prompt and seed."""
    model, clip, vae = host.load_checkpoint("tiny.safetensors")
    training, shared = trainer_module(host), host.module("nodes.training")
    preview_module = host.module("nodes.sefi.preview")
    g = torch.Generator().manual_seed(5)
    k, v = torch.randn(5, 768, generator=g) * 0.02, torch.randn(5, 768, generator=g) * 0.02
    trainer = training.HostTrainer(model, clip, "sks", "person", "all")
    with shared.training_session(trainer):
        preview = preview_module.TrainingPreview(trainer, vae, "a portrait photo of sks", "sks", "person", 64, 7)
        first, again = preview(10, k, v), preview(20, k, v)
    assert np.array_equal(first, again)  # the same seed each time: previews compare
    from sefi_core.sefi.identity import Identity, save_identity
    save_identity(Identity(k, v, "sks"), host.identity_dir / "preview_tokens.safetensors", overwrite=True)
    graph = probe.txt2img_graph("a portrait photo of sks", preview_module.PREVIEW_NEGATIVE,
                                identity="preview_tokens.safetensors")
    graph["7"]["inputs"].update(seed=7, steps=preview_module.PREVIEW_STEPS, cfg=preview_module.PREVIEW_CFG,
                                sampler_name="euler", scheduler="normal")
    result = host.run(graph)
    assert result.success, result.error
    latent = probe.saved_latent(host, result)
    with torch.inference_mode():
        decoded = (vae.decode(latent)[0].clamp(0, 1).float().numpy() * 255).round().astype(np.uint8)
    assert np.abs(decoded.astype(int) - first.astype(int)).max() <= 1


def test_a_preview_prompt_without_the_trigger_is_refused_before_any_work(host):
    result = host.run(train_graph("no_trigger", steps=50, preview_every=10, preview_prompt="a portrait photo"))
    assert not result.success and host.progress == []
    assert ("preview_prompt 'a portrait photo' does not contain the trigger word 'sks', so the previews would not show "
            "the identity.") in result.error["exception_message"]


# -- several photos ---------------------------------------------------------------------------------------------------

def two_photos(host):
    """Two photos of different sizes (512x512 and 451x300), as the host passes a list of IMAGEs."""
    return [host.nodes.LoadImage().load_image(name)[0] for name in ("astronaut.png", "chelsea.png")]


def test_photos_of_different_sizes_train_one_identity_each_photo_in_turn(host, monkeypatch):
    model, clip, vae = host.load_checkpoint("tiny.safetensors")
    training = trainer_module(host)
    photos, used = two_photos(host), []
    real_augment = training.augment
    monkeypatch.setattr(training, "augment", lambda square, g, subject=None: (used.append(square), real_augment(
        square, g, subject))[1])
    execute_training(host, model, clip, vae, "two_photos", image=photos, steps=6)
    squares = [training.center_square(training.as_rgb(p[0]), 64) for p in photos]
    assert len(used) == training.AUGMENTED_VIEWS  # the views, encoded once up front
    assert all(torch.equal(square, squares[k % 2]) for k, square in enumerate(used))  # each photo in turn
    assert load_identity(host.identity_dir / "two_photos.safetensors").training["steps"] == 6
    assert training.view_count(2) == training.AUGMENTED_VIEWS and training.view_count(40) == 40


def test_a_list_of_photos_in_a_graph_trains_once(host):
    """Rebatch Images turns a batch into a list (is_input_list): one training of both photos, not one per photo (a
    second training would fail on the existing name)."""
    graph = train_graph("from_list", steps=3)
    graph["5"] = {"class_type": "LoadImage", "inputs": {"image": "astronaut.png"}}
    graph["6"] = {"class_type": "ImageBatch", "inputs": {"image1": ["2", 0], "image2": ["5", 0]}}
    graph["7"] = {"class_type": "RebatchImages", "inputs": {"images": ["6", 0], "batch_size": 1}}
    graph["3"]["inputs"]["image"] = ["7", 0]
    result = host.run(graph)
    assert result.success, result.error
    assert load_identity(host.identity_dir / "from_list.safetensors").training["steps"] == 3


def test_a_folder_of_photos_of_different_sizes_trains_one_identity(host):
    """The host's own list of photos of any size (Load Image (from Folder), where the host has it)."""
    if "LoadImageDataSetFromFolder" not in host.nodes.NODE_CLASS_MAPPINGS:
        pytest.skip("this ComfyUI has no 'Load Image (from Folder)' node that gives a list (v0.3.64's resizes to a batch)")
    folder = host.input_dir / "subject_photos"
    folder.mkdir(exist_ok=True)
    for name in ("astronaut.png", "chelsea.png"):
        (folder / name).write_bytes((host.input_dir / name).read_bytes())
    graph = train_graph("from_folder", steps=3)
    graph["2"] = {"class_type": "LoadImageDataSetFromFolder", "inputs": {"folder": "subject_photos"}}
    result = host.run(graph)
    assert result.success, result.error
    assert load_identity(host.identity_dir / "from_folder.safetensors").training["steps"] == 3


def test_masks_for_several_photos_are_one_per_photo_or_one_for_photos_of_its_size(host):
    model, clip, vae = host.load_checkpoint("tiny.safetensors")
    photos = two_photos(host)
    masks = [torch.ones(1, 512, 512), torch.ones(1, 300, 451)]
    execute_training(host, model, clip, vae, "two_masked", image=photos, subject_mask=masks, steps=2)
    assert (host.identity_dir / "two_masked.safetensors").exists()
    with pytest.raises(ValueError, match=r"The subject mask\(s\) \(2: 512x512, 512x512\) do not fit the photo\(s\) "
                                         r"\(2: 512x512, 451x300\)"):
        execute_training(host, model, clip, vae, "one_mask", image=photos, subject_mask=[torch.ones(1, 512, 512)])
    with pytest.raises(ValueError, match=r"The subject mask is empty.*\(mask 2 of 2\)"):
        execute_training(host, model, clip, vae, "empty_second", image=photos,
                         subject_mask=[masks[0], torch.zeros(1, 300, 451)])
    assert not list(host.identity_dir.glob("one_mask*")) and not list(host.identity_dir.glob("empty_second*"))


def test_a_list_of_settings_is_refused_by_name(host):
    model, clip, vae = host.load_checkpoint("tiny.safetensors")
    inputs = {k: [v] for k, v in dict(model=model, clip=clip, vae=vae, name="two_seeds", trigger="sks",
                                      class_word="person", steps=2, learning_rate=0.005, attention_weight=0.003,
                                      resolution=64, kv_pairs="5", attention_loss="all tokens (#3, paper)",
                                      overwrite=True).items()}
    with pytest.raises(ValueError, match="'seed' received a list of 2 values, but SeFi Train Identity trains one "
                                         "identity per run"), torch.inference_mode():
        host.node("SefiTrainIdentity").execute(image=two_photos(host)[:1], seed=[0, 1], **inputs)


# -- continuing a saved identity --------------------------------------------------------------------------------------

def test_continuing_a_saved_identity_ends_exactly_where_one_long_run_ends(host):
    from sefi_core.train_state import load_train_state
    assert host.run(train_graph("long_run", steps=6, overwrite=True, keep_training_state=True)).success
    assert host.run(train_graph("first_half", steps=3, overwrite=True, keep_training_state=True)).success
    identity_file, state_file = host.identity_dir / "first_half.safetensors", host.train_state_dir / "first_half.safetensors"
    assert identity_file.stat().st_size < 40_000 < 100_000_000 < state_file.stat().st_size  # the identity stays small
    # The node's own learning rate, seed, trigger... are not used when continuing: the identity's are.
    graph = train_graph("second_half", steps=3, overwrite=True, keep_training_state=True, learning_rate=0.05, seed=9,
                        trigger="ohwx", continue_from="first_half.safetensors")
    continued = host.run(graph)
    assert continued.success, continued.error
    whole, rest = (load_identity(host.identity_dir / f"{n}.safetensors") for n in ("long_run", "second_half"))
    assert torch.equal(rest.k_tokens, whole.k_tokens) and torch.equal(rest.v_tokens, whole.v_tokens)
    assert rest.training == whole.training and rest.training["steps"] == 6 and rest.trigger == "sks"
    states = [load_train_state(str(host.train_state_dir / f"{n}.safetensors"), "Delete it.") for n in ("long_run", "second_half")]
    assert states[1].losses == states[0].losses and len(states[1].losses) == 6  # the loss curve spans all 6 steps
    assert [v for v, _ in host.progress][-1] == 6
    assert any("Continuing first_half.safetensors from step 3 to 6 with its settings: learning rate 0.005" in text
               for _, text in host.server.progress_texts())
    # Continuing an identity into itself goes on each time it is queued (the file it continues changed).
    again = train_graph("first_half", steps=3, overwrite=True, keep_training_state=True,
                        continue_from="first_half.safetensors")
    assert host.run(again).success and load_identity(identity_file).training["steps"] == 6
    assert host.run(again).success and load_identity(identity_file).training["steps"] == 9


def test_an_identity_without_its_training_state_cannot_be_continued_and_says_why(host):
    from sefi_core.sefi.identity import Identity, save_identity
    assert host.run(train_graph("stateless", steps=2, overwrite=True)).success
    assert host.run(train_graph("stateful", steps=2, overwrite=True, keep_training_state=True)).success
    saved = load_identity(host.identity_dir / "stateful.safetensors")
    save_identity(Identity(saved.k_tokens, saved.v_tokens, "sks", base_model="0123456789abcdef",
                           training=saved.training), host.identity_dir / "other_model.safetensors")
    (host.train_state_dir / "other_model.safetensors").write_bytes(
        (host.train_state_dir / "stateful.safetensors").read_bytes())
    save_identity(Identity(saved.k_tokens * 0.5, saved.v_tokens, "sks", base_model=saved.base_model),
                  host.identity_dir / "stateful.safetensors", overwrite=True)  # replaced since its state was saved
    for source, message in [
            ("stateless.safetensors", "stateless.safetensors has no training state in models/sefi_training_state "
                                      "(it was trained with keep_training_state off"),
            ("stateful.safetensors", "The training state stateful.safetensors belongs to another training than the "
                                     "identity file stateful.safetensors now holds"),
            ("other_model.safetensors", "other_model.safetensors was trained on another model (fingerprint "
                                        "0123456789abcdef")]:
        host.progress.clear()
        result = host.run(train_graph("continued_bad", steps=2, continue_from=source))
        assert not result.success and message in result.error["exception_message"], result.error
        assert host.progress == [] and not (host.identity_dir / "continued_bad.safetensors").exists()
    missing = host.run(train_graph("continued_bad", steps=2, continue_from="ghost.safetensors"))
    assert not missing.success and "No identity file 'ghost.safetensors'" in str(missing.node_errors)


def test_training_state_is_kept_by_default_and_removed_with_the_identity_it_belonged_to(host):
    node = host.node("SefiTrainIdentity")
    optional = node.INPUT_TYPES()["optional"]
    assert optional["keep_training_state"][1]["default"] is True
    assert host.run(train_graph("kept", steps=2, overwrite=True, keep_training_state=True)).success
    assert (host.train_state_dir / "kept.safetensors").exists()
    assert host.run(train_graph("kept", steps=3, overwrite=True)).success  # replaced without a state
    assert not (host.train_state_dir / "kept.safetensors").exists()


def test_training_sets_the_hosts_training_flag_for_the_run_and_restores_it_however_the_run_ends(host):
    """Where the host has `in_training` (v0.33: its own trainer sets it; its fused INT8 inference path checks it),
    SeFi's training sets it for every step and restores it after a run that ends, is cancelled or fails; a host
    without the flag is left without it."""
    mm, seen = host.model_management, []
    has_flag = hasattr(mm, "in_training")

    def fail_at_tick_two(value, total):
        if len(seen) == 2:
            raise RuntimeError("a failure in the middle of training")

    host.tick_watchers.append(lambda value, total: seen.append(getattr(mm, "in_training", None)))
    try:
        assert host.run(train_graph("flagged", steps=3)).success
        host.interrupt_at_tick(2)
        assert host.run(train_graph("flag_cancelled", steps=50)).interrupted
        assert getattr(mm, "in_training", None) is (False if has_flag else None)
        host.tick_watchers.append(fail_at_tick_two)
        seen.clear()
        failed = host.run(train_graph("flag_failed", steps=50))
        assert not failed.success and "a failure in the middle of training" in failed.error["exception_message"]
    finally:
        host.tick_watchers.clear()
    assert seen and all(flag is (True if has_flag else None) for flag in seen), seen
    assert getattr(mm, "in_training", None) is (False if has_flag else None)
