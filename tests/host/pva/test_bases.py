"""The bases PVA serves (nodes/pva/checks.py, sefi_core/pva/bases.py) through the real host: SD1.5 inpainting and SD2
inpainting (the PVA authors' base), each detected from the host's own model config and CLIP; an encoder or identity
made for one is refused on the other, naming both; a CLIP of another base, a non-inpainting model where training needs
inpainting, and other architectures (SDXL) are refused by name."""
import pytest
import torch

from sefi_testkit.checkpoint import unet_config
from sefi_testkit.pva import CHECKPOINTS, ENCODERS, PHOTO_SIZE, photo, recognizer_and_encoder, write_pva_identity

OTHER = {"sd15": "sd2", "sd2": "sd15"}
TITLES = {"sd15": ("SD1.5", 768), "sd2": ("SD2", 1024)}


def fine_tune(host, model, clip, vae, encoder, recognizer=None):
    """PVA Fine-tune Identity as the host calls it; every refusal here comes before any training."""
    recognizer = recognizer or recognizer_and_encoder(host)[0]
    with torch.inference_mode():
        return host.node("PVAFineTuneIdentity").execute(
            image=[photo(host)], model=[model], clip=[clip], vae=[vae], face_recognizer=[recognizer],
            pva_encoder=[encoder], name=["refused"], trigger=["sks"], steps=[1], timesteps_per_step=[2],
            projection_learning_rate=[2e-5], word_learning_rate=[1e-3], seed=[0], resolution=[PHOTO_SIZE],
            overwrite=[True])


def apply(host, model, clip, identity):
    with torch.inference_mode():
        return host.node("PVAApply").execute(model=model, clip=clip, pva_identity=identity, strength=1.0,
                                             start_percent=0.0, end_percent=1.0, on_negative=True).result


def host_model(host, config_class: str, **unet):
    """A MODEL of the host's own config class, built from a tiny UNet config (random weights, never saved)."""
    import comfy.model_patcher
    import comfy.supported_models

    config = getattr(comfy.supported_models, config_class)({**unet_config("tiny"), **unet})
    return comfy.model_patcher.ModelPatcher(config.get_model({}), load_device="cpu", offload_device="cpu")


@pytest.mark.parametrize("base", ["sd15", "sd2"])
def test_each_tiny_checkpoint_is_detected_by_the_host_as_its_base(host, base):
    """The test kit's checkpoints are what the host makes of the real ones: SD2 inpainting is the host's SD20 config
    with 9 input channels, epsilon prediction (the host reads v-prediction only from 4-channel SD2 UNets) and the
    OpenCLIP ViT-H text encoder; PVA names each by its base."""
    model, clip, _ = host.load_checkpoint(host.checkpoint(CHECKPOINTS[base].removesuffix(".safetensors")))
    config = model.model.model_config
    import comfy.model_base
    assert type(config).__name__ == {"sd15": "SD15", "sd2": "SD20"}[base]
    assert model.model.model_type == comfy.model_base.ModelType.EPS and model.model.concat_keys
    assert clip.cond_stage_model.clip_name == {"sd15": "l", "sd2": "h"}[base]
    checks = host.module("nodes.pva.checks")
    assert checks.model_base(model).name == f"{base}-inpainting"
    assert checks.check_inpainting_model(model, clip, "test").context_dim == TITLES[base][1]
    assert host.module("nodes.clip_tokens").token_embedding_table(clip).shape[1] == TITLES[base][1]


@pytest.mark.parametrize("base", ["sd15", "sd2"])
def test_an_encoder_made_for_one_base_is_refused_on_the_other_naming_both(host_clean, pva_files, base):
    host = host_clean
    model, clip, vae = host.load_checkpoint(CHECKPOINTS[OTHER[base]])
    recognizer, encoder = recognizer_and_encoder(host, ENCODERS[base])
    (family, width), (other, other_width) = TITLES[base], TITLES[OTHER[base]]
    with pytest.raises(ValueError, match=rf"The PVA encoder {ENCODERS[base]} was made for {family} inpainting "
                                         rf"\({width}-d\); this MODEL is {other} \({other_width}-d\)\. Use an encoder "
                                         rf"trained for {other} inpainting \(or load .* to use it\)"):
        fine_tune(host, model, clip, vae, encoder, recognizer)
    result = host.run({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINTS[OTHER[base]]}},
        "2": {"class_type": "PVALoadFaceRecognizer", "inputs": {"recognizer_file": "r18.safetensors"}},
        "3": {"class_type": "PVALoadEncoder", "inputs": {"encoder_file": ENCODERS[base]}},
        "5": {"class_type": "PVATrainEncoder", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "face_recognizer": ["2", 0], "pva_encoder": ["3", 0],
            "dataset_folder": "pva_dataset", "name": "refused", "stage": "1: encoder, visual attention, word",
            "steps": 1, "batch_size": 1, "accumulation": 1, "timesteps_per_sample": 2, "encoder_learning_rate": 1e-3,
            "projection_learning_rate": 1e-3, "word_learning_rate": 1e-3, "recognizer_learning_rate": 1e-3, "seed": 0,
            "resolution": PHOTO_SIZE, "face_region": "aligned face box", "custom_box": "0.125, 0.137, 0.859, 0.871",
            "save_every": 1, "resume": False}}})
    assert not result.success and f"was made for {family} inpainting ({width}-d); this MODEL is {other}" in \
        result.error["exception_message"]
    assert not host.progress and not list(host.pva_identity_dir.glob("refused*"))
    assert not (host.pva_encoder_dir / "refused.safetensors").exists()


@pytest.mark.parametrize("base", ["sd15", "sd2"])
def test_an_identity_made_for_one_base_is_refused_on_the_other_naming_both(host, pva_files, base):
    identity = write_pva_identity(host, f"{base}_identity.safetensors", ckpt=CHECKPOINTS[base])
    loaded = host.module("sefi_core.pva.identity").load_pva_identity(
        str(host.pva_identity_dir / f"{base}_identity.safetensors"))
    assert loaded.base == identity.base and loaded.base.name == f"{base}-inpainting"
    model, clip, _ = host.load_checkpoint(CHECKPOINTS[OTHER[base]])
    (family, width), (other, other_width) = TITLES[base], TITLES[OTHER[base]]
    with pytest.raises(ValueError, match=rf"The PVA identity {base}_identity.safetensors was made for {family} "
                                         rf"inpainting \({width}-d\); this MODEL is {other} \({other_width}-d\)"):
        apply(host, model, clip, loaded)
    model, clip, _ = host.load_checkpoint(CHECKPOINTS[base])
    patched_model, patched_clip = apply(host, model, clip, loaded)  # on its own base it applies
    assert patched_model is not model and patched_clip is not clip


def test_a_clip_of_another_base_is_refused_naming_both_text_encoders(host, pva_files):
    sd2_model, sd2_clip, vae = host.load_checkpoint(CHECKPOINTS["sd2"])
    sd15_model, sd15_clip, _ = host.load_checkpoint(CHECKPOINTS["sd15"])
    _, encoder = recognizer_and_encoder(host, ENCODERS["sd2"])
    with pytest.raises(ValueError, match=r"PVA Fine-tune Identity: the MODEL is SD2, whose text encoder is OpenCLIP "
                                         r"ViT-H \(SD2\); this CLIP is CLIP-L \(SD1\.x\)\. Connect the CLIP of the "
                                         r"Load Checkpoint that gives the MODEL"):
        fine_tune(host, sd2_model, sd15_clip, vae, encoder)
    identity = write_pva_identity(host, "sd15_for_clip.safetensors", ckpt=CHECKPOINTS["sd15"])
    with pytest.raises(ValueError, match=r"PVA Apply: the MODEL is SD1\.5, whose text encoder is CLIP-L \(SD1\.x\); "
                                         r"this CLIP is OpenCLIP ViT-H \(SD2\)"):
        apply(host, sd15_model, sd2_clip, identity)


def test_sd2_without_inpainting_is_refused_where_training_needs_inpainting(host, pva_files):
    """SD2's base and 768-v models have 4 input channels: the trainings refuse them naming SD2 inpainting's file."""
    _, clip, vae = host.load_checkpoint(CHECKPOINTS["sd2"])
    _, encoder = recognizer_and_encoder(host, ENCODERS["sd2"])
    plain = host_model(host, "SD20", context_dim=1024, use_linear_in_transformer=True, num_heads=-1,
                       num_head_channels=64)
    assert not plain.model.concat_keys
    with pytest.raises(ValueError, match=r"PVA Fine-tune Identity works on an inpainting model: this MODEL \(SD2\) "
                                         r"has 4 input channels\. Load the SD2 inpainting checkpoint "
                                         r"\(512-inpainting-ema \(stable-diffusion-2-inpainting\)\)"):
        fine_tune(host, plain, clip, vae, encoder)


def test_other_architectures_are_refused_by_name(host, pva_files):
    """SDXL (2048-d context) and SD2.1 unCLIP (an SD2 UNet conditioned on an image embedding) are not PVA's bases."""
    _, clip, vae = host.load_checkpoint(CHECKPOINTS["sd2"])
    _, encoder = recognizer_and_encoder(host, ENCODERS["sd2"])
    identity = write_pva_identity(host, "sd2_for_others.safetensors", ckpt=CHECKPOINTS["sd2"])
    sd2_unet = dict(context_dim=1024, use_linear_in_transformer=True, num_heads=-1, num_head_channels=64)
    others = {"SDXL": host_model(host, "SDXL", **{**sd2_unet, "context_dim": 2048, "adm_in_channels": 2816}),
              "SD21UnclipH": host_model(host, "SD21UnclipH", **{**sd2_unet, "adm_in_channels": 2048})}
    for name, model in others.items():
        width = model.model.model_config.unet_config["context_dim"]
        message = (rf"works on SD1\.5 or SD2 inpainting models .* This model is {name} with a {width}-d text "
                   r"context\. Load sd-v1-5-inpainting or 512-inpainting-ema")
        with pytest.raises(ValueError, match="PVA Fine-tune Identity " + message):
            fine_tune(host, model, clip, vae, encoder)
        with pytest.raises(ValueError, match="PVA Apply " + message):
            apply(host, model, clip, identity)
