"""Writes workflows/*.json (ComfyUI's saved-workflow format) from the descriptions below, laying out widgets in
the host's own input order. Run after changing a node's inputs:

    COMFYUI_PATH=/path/to/ComfyUI python tests/make_workflows.py
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CKPT = {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}
NEGATIVE = "blurry, lowres, deformed, watermark, text"
SAMPLER = {"seed": 42, "steps": 50, "cfg": 7.5, "sampler_name": "ddim", "scheduler": "ddim_uniform", "denoise": 1.0}
APPLY = {"trigger": "", "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}


def generate(Node, Note, first_id, x, y, model, clip, vae, text, negative_id, latent, prefix, title=None):
    """CLIP Text Encode -> KSampler -> VAE Decode -> Save Image, ids first_id..first_id+3."""
    i = first_id
    return [
        Node(i, "CLIPTextEncode", (x, y), {"text": text}, {"clip": clip}, size=(400, 120), title=title),
        Node(i + 1, "KSampler", (x + 430, y), SAMPLER, {"model": model, "positive": (i, 0), "negative": (negative_id, 0),
                                                         "latent_image": latent}, size=(320, 270)),
        Node(i + 2, "VAEDecode", (x + 780, y), {}, {"samples": (i + 1, 0), "vae": vae}, size=(200, 50)),
        Node(i + 3, "SaveImage", (x + 1010, y), {"filename_prefix": prefix}, {"images": (i + 2, 0)}, size=(320, 320)),
    ]


def workflows(Node, Note) -> dict[str, list]:
    ckpt = Node(1, "CheckpointLoaderSimple", (0, 200), CKPT, size=(330, 100))
    m, c, v = (1, 0), (1, 1), (1, 2)
    latent = lambda i, pos: Node(i, "EmptyLatentImage", pos, {"width": 512, "height": 512, "batch_size": 1}, size=(300, 110))
    negative = lambda i, pos, clip: Node(i, "CLIPTextEncode", pos, {"text": NEGATIVE}, {"clip": clip}, size=(400, 100),
                                         title="Negative prompt")
    load_identity = lambda i, pos, file: Node(i, "SefiLoadIdentity", pos, {"identity_file": file}, size=(300, 80))
    apply = lambda i, pos, model, clip, identity, trigger="": Node(
        i, "SefiApplyStageTokens", pos, {**APPLY, "trigger": trigger}, {"model": model, "clip": clip, "identity": identity},
        size=(320, 180))
    out = {}

    out["1_train_and_generate"] = [
        Note(100, (0, -230), "1. Train an identity from one photo\n\nLoad your SD1.x checkpoint and ONE photo of the "
             "person (or pet). SeFi Train Identity learns ten tokens (~30 KB) in about 1000 steps and saves them to "
             "models/sefi_identities/my_identity.safetensors. Settings are the paper's; use class_word 'dog', 'cat'... "
             "for non-faces. Cancel stops it and saves nothing. Change the name (or turn on overwrite) to train again."),
        Note(101, (760, -230), "2. Generate with it straight away\n\nSeFi Apply Stage Tokens patches a copy of the model "
             "and CLIP. Write the trigger 'sks' in the prompt with any scene, action or attribute. The loss curve "
             "appears in the preview."),
        ckpt,
        Node(2, "LoadImage", (0, 360), {"image": "example.png"}, size=(330, 330)),
        Node(3, "SefiTrainIdentity", (380, 200), {"name": "my_identity", "trigger": "sks", "class_word": "person"},
             {"model": m, "clip": c, "vae": v, "image": (2, 0)}, size=(340, 420)),
        Node(4, "PreviewImage", (380, 660), {}, {"images": (3, 1)}, size=(340, 220), title="Loss curve"),
        apply(5, (760, 200), m, c, (3, 0)),
        negative(7, (760, 560), (5, 1)),
        latent(8, (760, 700)),
        *generate(Node, Note, 20, 1120, 200, (5, 0), (5, 1), v, "a photo of sks as an old man playing guitar in Paris",
                  7, (8, 0), "sefi_train"),
    ]

    prompts = [("Scene", "a photo of sks standing in front of the Eiffel Tower at sunset"),
               ("Action", "a photo of sks playing the guitar on a stage"),
               ("Facial attributes", "a close-up photo of an old sks laughing, grey hair")]
    out["2_saved_identity_prompts"] = [
        Note(100, (0, -200), "Generate with a saved identity\n\nPick the identity file, then write prompts with its "
             "trigger. The three rows show a scene, an action and facial attributes (age, expression, hair) side by "
             "side, the paper's three kinds of prompt. Lower 'strength' (0.7-0.9) or raise 'start_percent' (0.1-0.3) "
             "if the prompt is not followed; raise strength for more likeness."),
        ckpt, load_identity(2, (0, 360), "my_identity.safetensors"),
        apply(3, (380, 330), m, c, (2, 0)),
        negative(4, (380, 560), (3, 1)), latent(5, (380, 700)),
        *[n for k, (title, text) in enumerate(prompts)
          for n in generate(Node, Note, 10 + 10 * k, 820, 200 + 380 * k, (3, 0), (3, 1), v, text, 4, (5, 0),
                            f"sefi_{title.split()[0].lower()}", title=title)],
    ]

    out["3_two_identities"] = [
        Note(100, (0, -200), "Two identities in one image\n\nTrain each person separately (paper Fig. 8), then chain "
             "two SeFi Apply Stage Tokens nodes with different triggers ('sks' and 'zwx') and name both in one prompt."),
        ckpt, load_identity(2, (0, 360), "my_identity.safetensors"), load_identity(3, (0, 480), "friend.safetensors"),
        apply(4, (380, 330), m, c, (2, 0), trigger="sks"),
        apply(5, (380, 570), (4, 0), (4, 1), (3, 0), trigger="zwx"),
        negative(6, (760, 640), (5, 1)), latent(7, (760, 780)),
        *generate(Node, Note, 10, 760, 200, (5, 0), (5, 1), v, "a photo of sks and zwx having coffee together in a cafe",
                  6, (7, 0), "sefi_two"),
    ]

    out["4_face_inpainting"] = [
        Note(100, (0, -260), "Personalized face inpainting (the PVA task)\n\nLoad a photo, right-click Load Image > "
             "Open in MaskEditor and paint over the face. ComfyUI's own VAE Encode (for Inpainting) keeps everything "
             "outside the mask; the prompt with the trigger repaints the face as that person. Works with an ordinary "
             "SD1.x checkpoint; with the SD1.5 inpainting checkpoint use InpaintModelConditioning instead."),
        ckpt, load_identity(2, (0, 360), "my_identity.safetensors"),
        apply(3, (380, 330), m, c, (2, 0)),
        Node(4, "LoadImage", (0, 480), {"image": "example.png"}, size=(330, 330), title="Photo (paint the face mask)"),
        Node(5, "VAEEncodeForInpaint", (380, 560), {"grow_mask_by": 6}, {"pixels": (4, 0), "vae": v, "mask": (4, 1)},
             size=(320, 100)),
        negative(6, (380, 710), (3, 1)),
        *generate(Node, Note, 10, 760, 200, (3, 0), (3, 1), v, "a photo of sks smiling", 6, (5, 0), "sefi_inpaint"),
    ]

    prompt = "a photo of sks enjoying a cup of latte"
    preview = lambda i, pos, model, clip, title: Node(
        i, "SefiAttentionMapPreview", pos, {"prompt": prompt, "words": "sks, cup, latte"},
        {"model": model, "clip": clip, "image": (22, 0), "vae": v}, size=(360, 300), title=title)
    out["5_attention_preview"] = [
        Note(100, (0, -230), "See where each word attends\n\nThe same prompt and image, analysed with and without the "
             "identity. A good identity attends to the face and leaves 'cup' and 'latte' their own regions (paper Fig. 1, "
             "Fig. 6); an overfit one covers the whole picture. Use it to tune strength and start/end percent."),
        ckpt, load_identity(2, (0, 360), "my_identity.safetensors"),
        apply(3, (380, 330), m, c, (2, 0)),
        negative(4, (380, 560), (3, 1)), latent(5, (380, 700)),
        *generate(Node, Note, 20, 760, 200, (3, 0), (3, 1), v, prompt, 4, (5, 0), "sefi_preview"),
        preview(30, (760, 600), (3, 0), (3, 1), "With the identity"),
        preview(31, (1160, 600), m, c, "Without (plain model and CLIP)"),
        Node(32, "PreviewImage", (760, 940), {}, {"images": (30, 0)}, size=(380, 300)),
        Node(33, "PreviewImage", (1160, 940), {}, {"images": (31, 0)}, size=(380, 300)),
    ]
    return out


def main() -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import conftest  # noqa: F401  (keeps the repo root off sys.path)
    from sefi_testkit.comfy_env import find_comfyui
    from sefi_testkit.host import Host
    from sefi_testkit.workflow_format import Node, Note, build

    comfy_path = find_comfyui()
    if comfy_path is None:
        sys.exit("Set COMFYUI_PATH to a ComfyUI checkout (see README).")
    host = Host(comfy_path, ROOT, tempfile.mkdtemp(prefix="sefi-workflows-"))
    for name, items in workflows(Node, Note).items():
        path = ROOT / "workflows" / f"{name}.json"
        path.write_text(json.dumps(build(items, host.nodes.NODE_CLASS_MAPPINGS), indent=1) + "\n")
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
