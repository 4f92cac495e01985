"""Writes workflows/*.json (ComfyUI's saved-workflow format) from the descriptions below, laying out widgets in
the host's own input order. Run after changing a node's inputs:

    COMFYUI_PATH=/path/to/ComfyUI python tests/tools/make_workflows.py

The shipped files were written with ComfyUI v0.3.64 (v0.33.0's SaveImage adds an IMAGE output to its node). The saved
view is fitted to the frontends measured in sefi_testkit/frontends.py (FRONTENDS); check it in the real ones with
tests/tools/check_frontend_layout.py.
"""
from __future__ import annotations

import json
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CKPT = {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}
SDXL_CKPT = {"ckpt_name": "sd_xl_base_1.0.safetensors"}
# Each model a workflow loads, as its first Note names it: folder, what it is, size, where the official copy is, licence
# (the README's Models table says the same, with links).
MODELS = {
    "v1-5-pruned-emaonly.safetensors": "checkpoints/v1-5-pruned-emaonly.safetensors (Stable Diffusion 1.5, 4.3 GB, "
                                       "Hugging Face Comfy-Org/stable-diffusion-v1-5-archive; CreativeML OpenRAIL-M)",
    "sd_xl_base_1.0.safetensors": "checkpoints/sd_xl_base_1.0.safetensors (SDXL 1.0 base, 6.9 GB, Hugging Face "
                                  "stabilityai/stable-diffusion-xl-base-1.0; CreativeML Open RAIL++-M)",
    "sd-v1-5-inpainting.ckpt": "checkpoints/sd-v1-5-inpainting.ckpt (SD 1.5 inpainting, 4.3 GB, Hugging Face "
                               "stable-diffusion-v1-5/stable-diffusion-inpainting; CreativeML OpenRAIL-M)",
    "ms1mv3_arcface_r50.pth": "face_recognizers/ms1mv3_arcface_r50.pth (ArcFace r50, 175 MB: InsightFace's "
                              "arcface_torch model zoo, ms1mv3_arcface_r50_fp16/backbone.pth renamed; non-commercial "
                              "research only)",
    "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors": "optionally clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors "
                                                   "(OpenCLIP ViT-H/14, 2.5 GB, Hugging Face h94/IP-Adapter, "
                                                   "models/image_encoder/model.safetensors renamed; MIT)",
}


def models_note(*files: str) -> str:
    """The line of a first Note that names the models to download."""
    return f"Models (in ComfyUI/models; sources and licences in the README's Models table): " + \
        "; ".join(MODELS[f] for f in files) + "."

NEGATIVE = "blurry, lowres, deformed, watermark, text"
SAMPLER = {"seed": 42, "steps": 50, "cfg": 7.5, "sampler_name": "ddim", "scheduler": "ddim_uniform", "denoise": 1.0}
SDXL_SAMPLER = {"seed": 42, "steps": 30, "cfg": 7.0, "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1.0}
APPLY = {"trigger": "", "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}


TITLE = 30  # the frontend draws a node's title bar above its position
SLOT = 20  # and its sockets 20 apart from 14 below it
NOTE_HEIGHT = 140
ROW = NOTE_HEIGHT + 60  # first row of nodes; the Notes sit above it
SCALE = 0.8  # the saved view: every workflow fits a 1920x1080 screen at 80%, in every frontend of FRONTENDS
MARGIN = 16  # screen pixels wanted between the graph and the bars and toolbars over the canvas


def socket_y(y: int, index: int) -> int:
    return y + 14 + SLOT * index


def bus(x: int, *ys: int) -> list[tuple[int, int]]:
    """Reroute points down a vertical corridor at x."""
    return [(x, y) for y in ys]


def workflows(Node, Note) -> dict[str, list]:
    def identity_note(i, text, files="my_identity.safetensors"):
        """The first Note of a workflow that needs identity files: which, and how to make them."""
        how = ("make each with workflow 1_train_and_generate, once per person with that name and trigger"
               if " and " in files else "make it with workflow 1_train_and_generate")
        return Note(i, (0, 0), f"Needs {files} in models/sefi_identities: {how} (one photo, about 1000 steps). "
                               f"{models_note(CKPT['ckpt_name'])}\n\n{text}", size=(1100, NOTE_HEIGHT))

    ckpt = Node(1, "CheckpointLoaderSimple", (0, ROW), CKPT, size=(320, 100))
    m, c, v = (1, 0), (1, 1), (1, 2)
    latent = lambda i, pos, side=512: Node(i, "EmptyLatentImage", pos, {"width": side, "height": side, "batch_size": 1},
                                           size=(300, 110))
    negative = lambda i, pos, clip, width=300: Node(i, "CLIPTextEncode", pos, {"text": NEGATIVE}, {"clip": clip},
                                                    size=(width, 100), title="Negative prompt")
    positive = lambda i, pos, clip, text, title=None, width=360: Node(i, "CLIPTextEncode", pos, {"text": text},
                                                                      {"clip": clip}, size=(width, 130), title=title)
    sampler = lambda i, pos, links, settings=SAMPLER: Node(i, "KSampler", pos, settings, links, size=(280, 262))
    decode = lambda i, pos, samples, vae: Node(i, "VAEDecode", pos, {}, {"samples": samples, "vae": vae}, size=(160, 50))
    save = lambda i, pos, images, prefix, size=(280, 280): Node(i, "SaveImage", pos, {"filename_prefix": prefix},
                                                                 {"images": images}, size=size)
    load_identity = lambda i, pos, file: Node(i, "SefiLoadIdentity", pos, {"identity_file": file}, size=(320, 80))
    apply = lambda i, pos, model, clip, identity, trigger="": Node(
        i, "SefiApplyStageTokens", pos, {**APPLY, "trigger": trigger}, {"model": model, "clip": clip, "identity": identity},
        size=(300, 180))
    def saved_identity_columns():
        """Checkpoint and identity file, then Apply (node 3), the negative prompt (4) and the empty latent (5)."""
        return [ckpt, load_identity(2, (0, ROW + 150), "my_identity.safetensors"), apply(3, (360, ROW), m, c, (2, 0)),
                negative(4, (360, ROW + 240), c), latent(5, (360, ROW + 400))]

    top = ROW - 45  # a corridor between the Notes and the first row's title bars, for the VAE wire
    vae_over_the_top = lambda x: (1, 2, [(340, top), (x - 24, top)])
    out = {}

    def train_and_generate(training: dict, checkpoint=ckpt, side=512, settings=SAMPLER) -> list:
        """Checkpoint and photo -> SeFi Train Identity (`training`: its widgets) -> Apply -> generate at `side` px."""
        return [
            checkpoint,
            Node(2, "LoadImage", (0, ROW + 150), {"image": "example.png"}, size=(320, 360)),
            Node(3, "SefiTrainIdentity", (360, ROW), {"trigger": "sks", "class_word": "person", **training},
                 {"model": m, "clip": c, "vae": v, "image": (2, 0)}, size=(320, 640)),
            apply(5, (720, ROW), m, c, (3, 0)),
            Node(24, "SaveImage", (720, ROW + 260), {"filename_prefix": "sefi_training_previews"}, {"images": (3, 2)},
                 size=(300, 280), title="Training previews"),
            positive(20, (1060, ROW), (5, 1), "a photo of sks as an old man playing guitar in Paris", width=320),
            negative(7, (1060, ROW + 170), (5, 1), width=320),
            latent(8, (1060, ROW + 320), side),
            sampler(21, (1420, ROW), {"model": (5, 0), "positive": (20, 0), "negative": (7, 0), "latent_image": (8, 0)},
                    settings),
            decode(22, (1740, ROW), (21, 0), vae_over_the_top(1740)),
            save(23, (1940, ROW), (22, 0), "sefi_train", size=(260, 300)),
        ]

    out["1_train_and_generate"] = [
        Note(100, (0, 0), "1. Train an identity from one photo\n\nLoad your SD1.x checkpoint and ONE photo of the person "
             "(or pet). SeFi Train Identity learns ten tokens (~30 KB) in about 1000 steps, shows its loss and a preview "
             "every 250 steps on the node and saves models/sefi_identities/my_identity.safetensors. Settings are the paper's; class_word 'dog', 'cat'... "
             "for non-faces. Cancel stops it and saves nothing; change the name (or turn on overwrite) to train again.\n"
             + models_note(CKPT["ckpt_name"]), size=(680, NOTE_HEIGHT)),
        Note(101, (720, 0), "2. Generate with it straight away\n\nSeFi Apply Stage Tokens patches a copy of the model "
             "and CLIP. Write the trigger 'sks' in the prompt with any scene, action or facial attribute: 'sks as an old "
             "man playing guitar in Paris'. Workflows 2-5 use the saved file.", size=(700, NOTE_HEIGHT)),
        *train_and_generate({"name": "my_identity"}),
    ]

    prompts = [("Scene", "a photo of sks standing in front of the Eiffel Tower at sunset"),
               ("Action", "a photo of sks playing the guitar on a stage"),
               ("Facial attributes", "a close-up photo of an old sks laughing, grey hair")]
    rows = [ROW, ROW + 305, ROW + 610]
    route = lambda x, socket, k: bus(x, *[socket_y(y, socket) for y in rows[:k + 1]])
    generations = []
    for k, ((title, text), y) in enumerate(zip(prompts, rows)):
        i = 10 + 10 * k
        generations += [
            positive(i, (820, y), (3, 1, route(715, 0, k)), text, title=title),
            sampler(i + 1, (1220, y), {"model": (3, 0, route(690, 0, k)), "positive": (i, 0),
                                       "negative": (4, 0, route(740, 2, k)), "latent_image": (5, 0, route(765, 3, k))}),
            decode(i + 2, (1540, y), (i + 1, 0), (1, 2, route(790, 1, k))),
            save(i + 3, (1740, y), (i + 2, 0), f"sefi_{title.split()[0].lower()}", size=(260, 224)),
        ]
    out["2_saved_identity_prompts"] = [
        identity_note(100, "Generate with a saved identity: pick the identity file, then write prompts with its trigger. "
                      "The three rows show a scene, an action and facial attributes (age, expression, hair) side by side, "
                      "the paper's three kinds of prompt. Lower 'strength' (0.7-0.9) or raise 'start_percent' (0.1-0.3) "
                      "if the prompt is not followed; raise strength for more likeness."),
        *saved_identity_columns(),
        *generations,
    ]

    out["3_two_identities"] = [
        identity_note(100, "Two identities in one image: train each person separately (paper Fig. 8), then chain two "
                      "SeFi Apply Stage Tokens nodes with different triggers ('sks' and 'zwx') and name both in one "
                      "prompt.", files="my_identity.safetensors and friend.safetensors (trigger 'zwx')"),
        ckpt, load_identity(2, (0, ROW + 150), "my_identity.safetensors"), load_identity(3, (0, ROW + 280), "friend.safetensors"),
        apply(4, (360, ROW), m, c, (2, 0), trigger="sks"),
        apply(5, (700, ROW), (4, 0), (4, 1), (3, 0, [(680, ROW + 220)]), trigger="zwx"),
        positive(6, (1040, ROW), (5, 1), "a photo of sks and zwx having coffee together in a cafe", width=320),
        negative(7, (1040, ROW + 170), (5, 1), width=320), latent(8, (1040, ROW + 320)),
        sampler(9, (1400, ROW), {"model": (5, 0), "positive": (6, 0), "negative": (7, 0), "latent_image": (8, 0)}),
        decode(10, (1720, ROW), (9, 0), vae_over_the_top(1720)),
        save(11, (1920, ROW), (10, 0), "sefi_two"),
    ]

    out["4_face_inpainting"] = [
        identity_note(100, "Personalized face inpainting (the PVA task): load a photo, right-click Load Image > Open in "
                      "MaskEditor and paint over the face (an empty mask is an error). ComfyUI's own VAE Encode (for "
                      "Inpainting) keeps everything outside the mask; the prompt with the trigger repaints the face as "
                      "that person. With the SD1.5 inpainting checkpoint use InpaintModelConditioning instead."),
        ckpt, load_identity(2, (0, ROW + 150), "my_identity.safetensors"),
        Node(4, "LoadImage", (0, ROW + 280), {"image": "example.png"}, size=(320, 360), title="Photo (paint the face mask)"),
        apply(3, (360, ROW), m, c, (2, 0)),
        positive(10, (700, ROW), (3, 1), "a photo of sks smiling"),
        negative(6, (700, ROW + 170), (3, 1), width=360),
        Node(5, "VAEEncodeForInpaint", (700, ROW + 320), {"grow_mask_by": 6},
             {"pixels": (4, 0), "vae": (1, 2, [(340, ROW + 240)]), "mask": (4, 1)},
             size=(360, 100)),
        sampler(11, (1100, ROW), {"model": (3, 0), "positive": (10, 0), "negative": (6, 0), "latent_image": (5, 0)}),
        decode(12, (1420, ROW), (11, 0), vae_over_the_top(1420)),
        save(13, (1620, ROW), (12, 0), "sefi_inpaint", size=(400, 420)),
    ]

    prompt = "a photo of sks enjoying a cup of latte"
    below = ROW + 540  # a corridor under the first row, for the plain model and CLIP of the "without" preview
    preview = lambda i, x, model, clip, vae, title: Node(
        i, "SefiAttentionMapPreview", (x, ROW), {"prompt": prompt, "words": "sks, cup, latte"},
        {"model": model, "clip": clip, "latent": (21, 0), "vae": vae}, size=(390, 500), title=title)
    out["5_attention_preview"] = [
        identity_note(100, "See where each word attends: the same prompt and generated image, analysed with and without "
                      "the identity. A good identity attends to the face and leaves 'cup' and 'latte' their own regions "
                      "(paper Fig. 1, Fig. 6); an overfit one covers the whole picture. Use it to tune strength and "
                      "start/end percent."),
        *saved_identity_columns(),
        positive(20, (700, ROW), (3, 1), prompt, width=320),
        sampler(21, (1060, ROW), {"model": (3, 0), "positive": (20, 0), "negative": (4, 0), "latent_image": (5, 0)}),
        preview(30, 1380, (3, 0), (3, 1), (1, 2, [(340, top), (1356, top)]), "With the identity"),
        preview(31, 1810, (1, 0, [(340, below), (1786, below)]), (1, 1, [(352, below + 16), (1786, below + 16)]),
                (1, 2, [(340, top), (1356, top), (1786, top)]), "Without (plain model and CLIP)"),
        decode(22, (1380, ROW + 600), (21, 0), (1, 2, [(340, top), (1356, top)])),
        save(23, (1580, ROW + 600), (22, 0), "sefi_preview", size=(260, 240)),
    ]
    out["6_pva_face_inpainting"] = pva_face_inpainting(Node, Note, decode, save, negative, positive)
    out["7_sefi_vs_pva"] = sefi_vs_pva(Node, Note)
    out["8_pva_train_encoder"] = pva_train_encoder(Node, Note, save)

    out["9_continue_training"] = [
        Note(100, (0, 0), "Continue a training\n\nNeeds my_identity.safetensors in models/sefi_identities with its "
             "training state in models/sefi_training_state: workflow 1_train_and_generate saves both (keep_training_state "
             "on). continue_from trains it 'steps' more with its own settings, trigger and class word, and saves "
             "my_identity_more; with the same photo, 1000 + 1000 steps end where 2000 end.\n" + models_note(CKPT["ckpt_name"]),
             size=(680, NOTE_HEIGHT)),
        Note(101, (720, 0), "Then generate with it\n\nMore steps: more likeness, less room for the prompt. Compare with "
             "the first run's file (workflow 2) at the same seed; if the prompt stops being followed, keep the earlier "
             "file or lower strength. Cancel stops and saves nothing: the identity and its state stay as they were.",
             size=(700, NOTE_HEIGHT)),
        *train_and_generate({"name": "my_identity_more", "continue_from": "my_identity.safetensors"}),
    ]

    out["10_sdxl_train_and_generate"] = [
        Note(100, (0, 0), "1. Train an identity on SDXL\n\nLoad an SDXL checkpoint (SDXL 1.0 base or a fine-tune of it: "
             "Pony, Illustrious, NoobAI, merges) and ONE photo. SeFi Train Identity learns ten tokens for both of SDXL's "
             "text encoders (~80 KB) at 1024 px (resolution 0: the model's own size) in about 1000 steps and saves "
             "my_sdxl_identity. If the GPU runs out of memory, gradient checkpointing switches itself on ('auto').\n"
             + models_note(SDXL_CKPT["ckpt_name"]), size=(680, NOTE_HEIGHT)),
        Note(101, (720, 0), "2. Generate at 1024 px\n\nAs on SD1.x: write the trigger 'sks' in any prompt. An SDXL "
             "identity works on SDXL models (the base and its fine-tunes), an SD1.x identity on SD1.x models; the "
             "other family's is refused with a message. CLIP Text Encode SDXL takes the trigger too.",
             size=(700, NOTE_HEIGHT)),
        *train_and_generate({"name": "my_sdxl_identity"}, Node(1, "CheckpointLoaderSimple", (0, ROW), SDXL_CKPT,
                                                                size=(320, 100)), 1024, SDXL_SAMPLER),
    ]
    return out


INPAINT_CKPT = {"ckpt_name": "sd-v1-5-inpainting.ckpt"}
PVA_FILES = {"recognizer_file": "ms1mv3_arcface_r50.pth", "encoder_file": "my_pva_encoder.safetensors"}
CLIP_VISION = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
PVA_PROMPT = "photo of a sks person"  # the paper's prompt with the learned word
PVA_APPLY = {"strength": 1.0, "start_percent": 0.0, "end_percent": 1.0, "on_negative": True}


def inpaint_conditioning(Node, i, pos, positive, negative, vae, photo, width=320):
    """ComfyUI's own InpaintModelConditioning: the inpainting model's mask and masked-photo latent."""
    return Node(i, "InpaintModelConditioning", pos, {"noise_mask": True},
                {"positive": positive, "negative": negative, "vae": vae, "pixels": (photo, 0), "mask": (photo, 1)},
                size=(width, 150))


def pva_face_inpainting(Node, Note, decode, save, negative, positive) -> list:
    top = ROW - 45
    return [
        Note(100, (0, 0), "Needs pva_encoders/my_pva_encoder.safetensors in ComfyUI/models (no pretrained PVA encoder "
             "exists publicly: train one with PVA Train Encoder on photos of many people, workflow 8_pva_train_encoder). "
             + models_note(INPAINT_CKPT["ckpt_name"], PVA_FILES["recognizer_file"]), size=(860, NOTE_HEIGHT)),
        Note(101, (900, 0), "1. PVA Fine-tune Identity: 1-5 photos of the person (aligned face crops, a batch or Load "
             "Image (from Folder)); 40 steps (the paper: about a minute on a GPU); saves models/pva_identities/my_pva_identity."
             "\n2. Paint the face on the photo to repaint (right-click > Open in MaskEditor); PVA Apply and ComfyUI's "
             "InpaintModelConditioning repaint it as that person: prompt 'photo of a sks person'.", size=(860, NOTE_HEIGHT)),
        Node(1, "CheckpointLoaderSimple", (0, ROW), INPAINT_CKPT, size=(320, 100)),
        Node(2, "PVALoadFaceRecognizer", (0, ROW + 150), {"recognizer_file": PVA_FILES["recognizer_file"]}, size=(320, 80)),
        Node(3, "PVALoadEncoder", (0, ROW + 280), {"encoder_file": PVA_FILES["encoder_file"]}, size=(320, 80)),
        Node(4, "LoadImage", (0, ROW + 410), {"image": "example.png"}, size=(320, 360), title="Photos of the person"),
        Node(5, "PVAFineTuneIdentity", (360, ROW), {"name": "my_pva_identity", "trigger": "sks"},
             {"model": (1, 0), "clip": (1, 1), "vae": (1, 2), "image": (4, 0), "face_recognizer": (2, 0),
              "pva_encoder": (3, 0)}, size=(270, 620)),
        Node(6, "PVAApply", (670, ROW), PVA_APPLY, {"model": (1, 0), "clip": (1, 1), "pva_identity": (5, 0)},
             size=(250, 180)),
        Node(7, "LoadImage", (670, ROW + 240), {"image": "example.png"}, size=(250, 360), title="Photo (paint the face mask)"),
        positive(10, (960, ROW), (6, 1), PVA_PROMPT, width=240),
        negative(11, (960, ROW + 170), (6, 1), width=240),
        inpaint_conditioning(Node, 12, (1240, ROW), (10, 0), (11, 0), (1, 2, [(340, top), (1216, top)]), 7, width=240),
        Node(13, "KSampler", (1520, ROW), SAMPLER, {"model": (6, 0), "positive": (12, 0), "negative": (12, 1),
                                                    "latent_image": (12, 2)}, size=(240, 262)),
        decode(14, (1800, ROW), (13, 0), (1, 2, [(340, top), (1776, top)])),
        save(15, (1990, ROW), (14, 0), "pva_inpaint", size=(210, 300)),
    ]


def pva_train_encoder(Node, Note, save) -> list:
    """PVA Train Encoder on a folder of people with ArcFace; CLIP vision features beside it as the other source."""
    return [
        Note(100, (0, 0), "Needs ComfyUI/input/pva_dataset: one sub-folder per person, 2+ aligned face photos each "
             "(optional photo.mask.png face masks and photo.txt captions). The paper trained on CelebAHQ-IDI (1,963 "
             "people; see the README) in two stages of up to 50k steps on a large GPU; a few people and 1000 steps "
             "make a first test. " + models_note(INPAINT_CKPT["ckpt_name"], PVA_FILES["recognizer_file"], CLIP_VISION),
             size=(900, NOTE_HEIGHT)),
        Note(101, (940, 0), "1. Stage 1 trains the encoder, every layer's visual projections and the learned word, "
             "saving models/pva_encoders/my_pva_encoder and its state every save_every steps: Cancel keeps the last save, "
             "Queue again resumes.\n2. Stage 2 also tunes the recognizer: connect PVA Load Encoder (the stage-1 file) to "
             "pva_encoder, pick stage 2 and a new name.\nOr read the photos with CLIP vision: connect PVA Face Features "
             "from CLIP Vision (left) to face_recognizer (stage 1 only). Workflow 6 then fine-tunes a person.",
             size=(900, NOTE_HEIGHT)),
        Node(1, "CheckpointLoaderSimple", (0, ROW), INPAINT_CKPT, size=(320, 100)),
        Node(2, "PVALoadFaceRecognizer", (0, ROW + 150), {"recognizer_file": PVA_FILES["recognizer_file"]},
             size=(320, 80)),
        Node(3, "CLIPVisionLoader", (0, ROW + 290), {"clip_name": CLIP_VISION}, size=(320, 80),
             title="Or: Load CLIP Vision"),
        Node(4, "PVAClipVisionFeatures", (360, ROW + 290), {}, {"clip_vision": (3, 0)}, size=(300, 60)),
        Node(5, "PVATrainEncoder", (700, ROW), {"dataset_folder": "pva_dataset", "name": "my_pva_encoder"},
             {"model": (1, 0), "clip": (1, 1), "vae": (1, 2), "face_recognizer": (2, 0)}, size=(340, 620)),
        save(6, (1080, ROW), (5, 1), "pva_encoder_loss", size=(400, 340)),
    ]


def sefi_vs_pva(Node, Note) -> list:
    """One masked photo, one seed: SeFi's identity (top row) and PVA's (bottom row) on the SD1.5 inpainting model."""
    top, rows = ROW - 45, (ROW, ROW + 340)
    out = [
        Note(100, (0, 0), "Needs my_identity.safetensors in models/sefi_identities (make it with workflow "
             "1_train_and_generate, one photo) and my_pva_identity.safetensors in models/pva_identities (workflow "
             "6_pva_face_inpainting, 1-5 photos) of the same person. Paint the face on the photo (right-click > Open in "
             "MaskEditor). " + models_note(INPAINT_CKPT["ckpt_name"], PVA_FILES["recognizer_file"]), size=(860, NOTE_HEIGHT)),
        Note(101, (900, 0), "The same photo, mask and seed, repainted twice through ComfyUI's own "
             "InpaintModelConditioning. Top: SeFi, ten learned tokens in the text's keys and values (prompt 'a photo "
             "of sks'). Bottom: PVA, the encoder's visual tokens in a parallel attention beside the text (prompt "
             "'photo of a sks person'). Under each result, PVA Identity Similarity scores it against the photo, as "
             "the PVA paper measures identity.", size=(860, NOTE_HEIGHT)),
        Node(1, "CheckpointLoaderSimple", (0, ROW), INPAINT_CKPT, size=(300, 100)),
        Node(2, "LoadImage", (0, ROW + 150), {"image": "example.png"}, size=(300, 360), title="Photo (paint the face mask)"),
        Node(3, "SefiLoadIdentity", (350, rows[0]), {"identity_file": "my_identity.safetensors"}, size=(240, 80)),
        Node(4, "PVALoadIdentity", (350, rows[1]), {"pva_identity_file": "my_pva_identity.safetensors"},
             size=(240, 80)),
        Node(7, "PVALoadFaceRecognizer", (0, ROW + 560), {"recognizer_file": PVA_FILES["recognizer_file"]},
             size=(300, 80)),
        Node(5, "SefiApplyStageTokens", (630, rows[0]), APPLY, {"model": (1, 0), "clip": (1, 1), "identity": (3, 0)},
             size=(240, 180)),
        Node(6, "PVAApply", (630, rows[1]), PVA_APPLY, {"model": (1, 0), "clip": (1, 1), "pva_identity": (4, 0)},
             size=(240, 180)),
    ]
    for k, (y, applied, text, prefix) in enumerate(zip(rows, (5, 6), ("a photo of sks", PVA_PROMPT),
                                                       ("sefi_inpaint", "pva_inpaint"))):
        i = 10 + 10 * k
        out += [
            Node(i, "CLIPTextEncode", (910, y), {"text": text}, {"clip": (applied, 1)}, size=(260, 100),
                 title="SeFi prompt" if k == 0 else "PVA prompt"),
            Node(i + 1, "CLIPTextEncode", (910, y + 150), {"text": NEGATIVE}, {"clip": (applied, 1)},
                 size=(260, 100), title="Negative prompt"),
            inpaint_conditioning(Node, i + 2, (1210, y), (i, 0), (i + 1, 0), (1, 2, [(320, top), (1190, top)]), 2,
                                 width=240),
            Node(i + 3, "KSampler", (1490, y), SAMPLER, {"model": (applied, 0), "positive": (i + 2, 0),
                                                         "negative": (i + 2, 1), "latent_image": (i + 2, 2)},
                 size=(240, 262)),
            Node(i + 4, "VAEDecode", (1770, y), {}, {"samples": (i + 3, 0), "vae": (1, 2, [(320, top), (1750, top)])},
                 size=(150, 50)),
            Node(i + 5, "SaveImage", (1960, y), {"filename_prefix": prefix}, {"images": (i + 4, 0)}, size=(240, 180),
                 title="SeFi" if k == 0 else "PVA"),
            Node(i + 6, "PVAIdentitySimilarity", (1960, y + 215), {}, {"image": (i + 4, 0), "reference": (2, 0),
                                                                      "face_recognizer": (7, 0)}, size=(240, 90),
                 title="SeFi's likeness" if k == 0 else "PVA's likeness"),
        ]
    return out


def saved_view(workflow: dict, frontends: dict) -> dict:
    """The view at SCALE that shows the whole graph, Notes included, clear of every bar and toolbar in every frontend
    of `frontends` (the measured FRONTENDS of sefi_testkit/frontends.py): of the offsets that keep MARGIN page pixels (or
    else as many as can be) between each node and anything covering the canvas, the one nearest the top-left."""
    import numpy as np

    left = min(n["pos"][0] for n in workflow["nodes"])
    top = min(n["pos"][1] for n in workflow["nodes"]) - TITLE
    steps = np.arange(0, 400) / SCALE  # one page pixel apart
    ox, oy = (MARGIN / SCALE - left + steps)[:, None], (MARGIN / SCALE - top + steps)[None, :]
    worst = np.full((len(steps), len(steps)), np.inf)
    for frontend in frontends.values():
        (cx, cy), (v0, w0, v1, w1) = frontend["canvas"], frontend["visible"]
        for node in workflow["nodes"]:
            (x, y), (w, h) = node["pos"], node["size"]
            x0, x1 = cx + (x + ox) * SCALE, cx + (x + w + ox) * SCALE
            y0, y1 = cy + (y - frontend["title"] + oy) * SCALE, cy + (y + h + oy) * SCALE
            worst = np.minimum(worst, np.minimum(np.minimum(x0 - v0, v1 - x1), np.minimum(y0 - w0, w1 - y1)))
            for p0, q0, p1, q1 in frontend["covered"]:
                worst = np.minimum(worst, np.maximum(np.maximum(p0 - x1, x0 - p1), np.maximum(q0 - y1, y0 - q1)))
    wanted = np.minimum(worst, MARGIN)
    if wanted.max() < 0:
        raise SystemExit(f"the graph does not fit the frontends' canvas at {SCALE:.0%}")
    i, j = min(zip(*np.nonzero(wanted == wanted.max())), key=lambda ij: (ij[0] + ij[1], ij[1]))
    return {"scale": SCALE, "offset": [round(float(ox[i, 0]), 3), round(float(oy[0, j]), 3)]}


def main() -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from sefi_testkit import pack
    pack.prepare()  # sefi_core importable, the repository root off sys.path
    from sefi_testkit.comfy_env import find_comfyui
    from sefi_testkit.host import Host
    from sefi_testkit.workflow_format import Node, Note, build, provenance
    from sefi_testkit.frontends import FRONTENDS

    comfy_path = find_comfyui()
    if comfy_path is None:
        sys.exit("Set COMFYUI_PATH to a ComfyUI checkout (see README).")
    host = Host(comfy_path, ROOT, tempfile.mkdtemp(prefix="sefi-workflows-"))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    registry = host.nodes.NODE_CLASS_MAPPINGS
    properties = provenance(registry, (project["name"], project["version"]), host.version)
    for name, items in workflows(Node, Note).items():
        path = ROOT / "workflows" / f"{name}.json"
        workflow = build(items, registry, properties=properties)
        workflow["extra"]["ds"] = saved_view(workflow, FRONTENDS)
        path.write_text(json.dumps(workflow, indent=1) + "\n")
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
