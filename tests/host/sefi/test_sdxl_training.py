"""SeFi Train Identity on SDXL through the real host (tiny_sdxl): what it trains at by default, where its attention
loss is taken, and the node's features as on SD1.x: several photos, a subject mask, previews, the saved family, and
continuing a run to exactly where one long run ends. One K/V pair and 128 px keep the bigG encodes few on the CPU;
the stages themselves are tested on SDXL in test_training_matches_apply."""
import torch

from sefi_core.sefi.identity import load_identity
from sefi_testkit import probe

CHECKPOINT = "tiny_sdxl.safetensors"


def sdxl_train_graph(name, steps, **extra):
    graph = probe.train_graph(name, steps=steps, overwrite=True, resolution=128, kv_pairs="1", **extra)
    graph["1"]["inputs"]["ckpt_name"] = CHECKPOINT
    return graph


def test_resolution_0_trains_at_each_familys_own_size(host):
    new_run = host.module("nodes.sefi.train_identity").new_run
    args = ("sks", "person", 10, 0.005, 0.003, 0, 0, "5", "all tokens (#3, paper)")
    assert (new_run(*args, "sd1").settings.resolution, new_run(*args, "sdxl").settings.resolution) == (512, 1024)
    assert new_run(*args[:6], 768, *args[7:], "sdxl").settings.resolution == 768  # other sizes as asked
    resolution = host.node("SefiTrainIdentity").INPUT_TYPES()["required"]["resolution"][1]
    assert resolution["default"] == 0 and "1024 for SDXL" in resolution["tooltip"]


def test_the_attention_loss_is_taken_at_sdxls_highest_resolution_attention(host):
    """At half the latent: on tiny_sdxl the 4 layers of input_blocks.4-5 (SDXL's second level), not the 20 at a quarter."""
    model, clip, vae = host.load_checkpoint(host.checkpoint("tiny_sdxl"))
    trainer = host.module("nodes.sefi.training").HostTrainer(model, clip, "sks", "person", "all")
    with host.module("nodes.training").training_session(trainer, grad=False):
        image = host.nodes.LoadImage().load_image("astronaut.png")[0]
        latent, _ = trainer.training_samples(image, vae, 128, 1, torch.Generator().manual_seed(0))[0]
        trainer.find_loss_layers(latent)
        names = {module: name for name, module in trainer.model.model.diffusion_model.named_modules()}
        chosen = sorted(names[m] for m in trainer.loss_layers)
        assert trainer.family == "sdxl" and trainer.token_widths == (768, 1280)
        assert trainer.adm(0, latent).shape == (1, 2816)
    assert chosen == [f"input_blocks.{b}.1.transformer_blocks.{i}.attn2" for b in (4, 5) for i in (0, 1)]


def test_photos_mask_and_previews_train_an_sdxl_identity_that_continues_like_one_long_run(host):
    photo = host.nodes.LoadImage().load_image("astronaut.png")[0]
    mask = torch.zeros(1, 512, 512)
    mask[0, 40:300, 120:380] = 1  # over the face
    photos = torch.cat([photo, photo.flip(2)])  # two photos of one subject, one mask for both

    model, clip, vae = host.load_checkpoint(host.checkpoint("tiny_sdxl"))

    def run(name, steps, **extra):
        inputs = dict(model=model, clip=clip, vae=vae, image=photos, subject_mask=mask, name=name, trigger="sks",
                      class_word="person", steps=steps, learning_rate=0.005, attention_weight=0.003, seed=0,
                      resolution=128, kv_pairs="1", attention_loss="all tokens (#3, paper)", overwrite=True,
                      gradient_checkpointing="auto", keep_training_state=True, preview_every=2)
        inputs.update(extra)
        return probe.train_node(host, **inputs)

    host.previews.clear()
    first = run("sdxl_first", 2)
    shown = [step for step, _ in host.previews]
    assert shown[0] == 2 and all(kind == "JPEG" and picture.size == (128, 128)
                                 for _, (kind, picture, _) in host.previews[:1])
    assert first.result[2].shape[2] == 128  # the previews output: one 128 px preview (and its step below)
    identity = load_identity(host.identity_dir / "sdxl_first.safetensors")
    assert (identity.family, identity.k_tokens.shape, identity.training["resolution"]) == ("sdxl", (1, 2048), 128)
    assert (host.identity_dir / "sdxl_first.safetensors").stat().st_size < 40_000

    continued = run("sdxl_continued", 1, continue_from="sdxl_first.safetensors", preview_every=0)
    run("sdxl_whole", 3, preview_every=0)
    rest, long_run = (load_identity(host.identity_dir / f"{n}.safetensors") for n in ("sdxl_continued", "sdxl_whole"))
    assert continued.result[0].family == "sdxl"
    assert torch.equal(rest.k_tokens, long_run.k_tokens) and torch.equal(rest.v_tokens, long_run.v_tokens)


def test_an_sd1_identity_cannot_be_continued_on_sdxl(host):
    assert host.run(probe.train_graph("sd1_to_continue", steps=1, overwrite=True, kv_pairs="1",
                                      keep_training_state=True)).success
    result = host.run(sdxl_train_graph("sdxl_from_sd1", 1, continue_from="sd1_to_continue.safetensors"))
    assert not result.success
    assert ("SeFi Train Identity: identity 'sks' was trained on SD1.x, but the model is SDXL"
            in result.error["exception_message"])
    assert not (host.identity_dir / "sdxl_from_sd1.safetensors").exists()
