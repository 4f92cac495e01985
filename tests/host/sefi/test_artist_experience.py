"""What an artist sees on the canvas: previews on the nodes, the loss while training, values the frontend keeps,
and the errors a newcomer meets first."""
import math

import pytest

from sefi_testkit import probe
from sefi_testkit.probe import train_graph


def frontend_float(value: float, options: dict) -> float:
    """What the frontend (1.27) stores for a FLOAT widget value: rounded to the decimals of the input's step, unless
    the input gives its own 'round' (useFloatWidget and onFloatValueChange in the frontend's bundle)."""
    precision = max(0, -math.floor(math.log10(options.get("step", 0.5))))
    increment = options.get("round") or 10 ** -precision
    return min(max(round(round(value / increment) * increment, precision), options.get("min", 0)), options.get("max", 2048))


@pytest.mark.parametrize("name, values", [
    ("learning_rate", [0.005, 0.00002, 0.0005, 0.00001, 0.1, 0.0025]),
    ("attention_weight", [0.003, 0.0005, 0.01, 0.05, 0.00025, 0.0]),
])
def test_the_frontend_keeps_every_training_value_as_typed(host, name, values):
    options = host.node("SefiTrainIdentity").INPUT_TYPES()["required"][name][1]
    assert [frontend_float(v, options) for v in values] == values


def test_training_shows_its_loss_curve_and_smoothed_loss_on_the_node(host):
    result = host.run(train_graph("shown_on_node", steps=30))
    assert result.success, result.error
    assert result.outputs["3"]["images"], "no loss curve preview on the Train node"
    texts = [text for node, text in host.server.progress_texts() if node == "3"]
    assert texts and texts[-1].startswith("step 30/30: loss ") and texts[-1].endswith("(smoothed)")
    assert len(texts) == 2  # read back at steps 25 and 30, not every step


def test_the_attention_preview_shows_its_maps_on_the_node(host):
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "astronaut.png"}},
        "3": {"class_type": "SefiAttentionMapPreview", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "prompt": "a photo of a person", "words": "photo, person",
            "at_percent": 0.5, "layers": "all layers", "seed": 0, "image": ["2", 0], "vae": ["1", 2]}},
    }
    result = host.run(graph)
    assert result.success, result.error
    assert result.outputs["3"]["images"]


def validation_details(result) -> str:
    """What the host's validator says about a refused prompt, as the frontend lists it (nothing has run)."""
    assert not result.success and not result.messages, "the prompt ran; the host's validator should have refused it"
    return "\n".join(f"{e['details']}" for node in result.node_errors.values() for e in node["errors"])


def test_load_identity_without_the_file_says_to_train_one_first(host):
    result = host.run(probe.txt2img_graph("a photo of sks", "blurry", identity="not_trained_yet.safetensors"))
    details = validation_details(result)
    assert "No identity file 'not_trained_yet.safetensors' in models/sefi_identities" in details
    assert ("Train one first with SeFi Train Identity (the workflow 1_train_and_generate does it from one photo), then "
            "press R in ComfyUI to refresh this list") in details
    assert "not in [" not in details  # the host's own 'Value not in list' says nothing of what to do


@pytest.mark.parametrize("name, stale", [("kv_pairs", "7"), ("attention_loss", "0.003"),
                                         ("gradient_checkpointing", "yes")])
def test_a_stale_training_choice_in_an_old_workflow_names_the_choices(host, name, stale):
    graph = train_graph("stale_choice", steps=2)
    graph["3"]["inputs"][name] = stale
    details = validation_details(host.run(graph))
    assert f"{name} {stale!r} is not one of" in details and "pick one of those on the node" in details


def test_a_stale_preview_layer_choice_names_the_choices(host):
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "4": {"class_type": "SefiAttentionMapPreview", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "prompt": "a photo of a person", "words": "", "at_percent": 0.5,
            "layers": "32x32", "seed": 0, "latent": ["3", 0]}},
    }
    details = validation_details(host.run(graph))
    assert "layers '32x32' is not one of [" in details and "all layers" in details


def test_inpainting_with_an_empty_mask_is_an_error(host):
    _, clip, _ = host.load_checkpoint("tiny.safetensors")
    from sefi_core.sefi.identity import save_identity
    save_identity(probe.word_identity(clip, ["cat"] * 5, ["cat"] * 5), host.identity_dir / "inpaint_id.safetensors",
                  overwrite=True)
    graph = probe.txt2img_graph("a photo of sks smiling", "blurry", identity="inpaint_id.safetensors")
    graph["9"] = {"class_type": "LoadImage", "inputs": {"image": "astronaut.png"}}  # no alpha: an empty mask
    graph["10"] = {"class_type": "VAEEncodeForInpaint", "inputs": {"pixels": ["9", 0], "vae": ["1", 2], "mask": ["9", 1],
                                                                   "grow_mask_by": 6}}
    graph["7"]["inputs"]["latent_image"] = ["10", 0]
    result = host.run(graph)
    assert not result.success
    assert ("The latent's inpainting mask is empty, so nothing would be repainted and the photo would come back "
            "unchanged. Paint over the face (right-click Load Image > Open in MaskEditor)") in result.error["exception_message"]
