"""What the PVA tests share: stand-ins for trained files (a random ArcFace recognizer and encoder, a PVA identity, a
small dataset of people), graphs of the PVA nodes, the test photos, a recorder of every cross-attention call, and the
paper's formula for parallel visual attention and its identity similarity, written out independently of the pack.

A random recognizer (iresnet r18) and a random one-layer encoder stand in for trained ones: the suite proves the
mechanism and the plumbing, not identity quality (no PVA weights exist publicly)."""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from .probe import embedding

PHOTO_SIZE = 64
# The bases PVA serves, as tiny checkpoints (sefi_testkit/checkpoint.py) and the random encoder made for each.
CHECKPOINTS = {"sd15": "tiny_inpaint.safetensors", "sd2": "tiny_sd2_inpaint.safetensors"}
ENCODERS = {"sd15": "random.safetensors", "sd2": "random_sd2.safetensors"}
ENCODER_FAST = {"batch_size": 1, "accumulation": 1, "timesteps_per_sample": 2, "resolution": PHOTO_SIZE}


class CodeInAPickle:
    """Unpickling this would construct a test class: the host's weights-only loader must refuse it."""


def write_pva_files(host):
    """A random iresnet r18 (as InsightFace's .pth state dict and as .safetensors), a random encoder for each base
    (ENCODERS), two photos; (recognizer, SD1.5 encoder)."""
    face, model_files = host.module("sefi_core.pva.face"), host.module("sefi_core.pva.model_files")
    encoder_module = host.module("sefi_core.pva.encoder")
    torch.manual_seed(0)
    recognizer = face.IResNet("r18")
    torch.save({f"module.{k}": v for k, v in recognizer.state_dict().items()}, host.face_recognizer_dir / "r18.pth")
    save_file(recognizer.state_dict(), str(host.face_recognizer_dir / "r18.safetensors"))
    torch.save({"net": CodeInAPickle()}, host.face_recognizer_dir / "code.pth")
    torch.save({"conv1.weight": torch.zeros(1)}, host.face_recognizer_dir / "other.pth")
    encoder = encoder_module.IdentityEncoder(768, layers=1, heads=8)
    model_files.save_encoder(encoder, str(host.pva_encoder_dir / ENCODERS["sd15"]), "iresnet r18")
    model_files.save_encoder(encoder_module.IdentityEncoder(1024, layers=1, heads=8),
                             str(host.pva_encoder_dir / ENCODERS["sd2"]), "iresnet r18",
                             base=host.module("sefi_core.pva.bases").SD2_INPAINTING)
    source = Image.open(host.input_dir / "astronaut.png").convert("RGB")
    for k, box in enumerate([(100, 0, 400, 300), (120, 10, 380, 270)]):
        source.crop(box).resize((PHOTO_SIZE + 16 * k, PHOTO_SIZE + 16 * k)).save(host.input_dir / f"pva_photo{k}.png")
    return recognizer, encoder


def fine_tune_graph(steps=2, ckpt="tiny_inpaint.safetensors", name="fine_tuned", photos=("pva_photo0.png",),
                    recognizer="r18.pth", encoder="random.safetensors"):
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "PVALoadFaceRecognizer", "inputs": {"recognizer_file": recognizer}},
        "3": {"class_type": "PVALoadEncoder", "inputs": {"encoder_file": encoder}},
        "5": {"class_type": "PVAFineTuneIdentity", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "image": ["4", 0], "face_recognizer": ["2", 0],
            "pva_encoder": ["3", 0], "name": name, "trigger": "sks", "steps": steps, "timesteps_per_step": 2,
            "projection_learning_rate": 0.00002, "word_learning_rate": 0.001, "seed": 0, "resolution": PHOTO_SIZE,
            "overwrite": True}},
    }
    for k, photo in enumerate(photos):
        graph[f"4{k}"] = {"class_type": "LoadImage", "inputs": {"image": photo}}
    if len(photos) == 1:
        graph["4"] = graph.pop("40")
    else:  # a list of photos of different sizes, as Load Image (from Folder) would give
        graph["4"] = {"class_type": "ImageBatch", "inputs": {"image1": ["40", 0], "image2": ["41", 0]}}
    return graph


def recognizer_and_encoder(host, encoder_file="random.safetensors"):
    with torch.inference_mode():
        recognizer = host.node("PVALoadFaceRecognizer").execute(recognizer_file="r18.safetensors").result[0]
        encoder = host.node("PVALoadEncoder").execute(encoder_file=encoder_file).result[0]
    return recognizer, encoder


def photo(host, name="pva_photo0.png") -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(host.input_dir / name).convert("RGB")).astype(np.float32) / 255)[None]


def write_dataset(host):
    """input/pva_dataset: three people of three photos each (crops of the test photos), one with a face mask."""
    root = host.input_dir / "pva_dataset"
    for person, source in (("astronaut", "astronaut.png"), ("cat", "chelsea.png"), ("both", "astronaut.png")):
        (root / person).mkdir(parents=True, exist_ok=True)
        image = Image.open(host.input_dir / source).convert("RGB")
        for k in range(3):
            crop = image.crop((40 * k, 10 * k, 40 * k + 250, 10 * k + 250)).resize((PHOTO_SIZE, PHOTO_SIZE))
            (crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if person == "both" else crop).save(root / person / f"{k}.png")
    mask = Image.new("L", (PHOTO_SIZE, PHOTO_SIZE))
    mask.paste(255, (16, 16, 48, 56))
    mask.save(root / "cat" / "0.mask.png")
    return root


def encoder_train_graph(name, steps=2, stage="1: encoder, visual attention, word", encoder=None,
                        ckpt="tiny_inpaint.safetensors", **extra):
    inputs = {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "face_recognizer": ["2", 0],
              "dataset_folder": "pva_dataset", "name": name, "stage": stage, "steps": steps, **ENCODER_FAST,
              "encoder_learning_rate": 1e-3, "projection_learning_rate": 1e-3, "word_learning_rate": 1e-3,
              "recognizer_learning_rate": 1e-3, "seed": 0, "face_region": "aligned face box",
              "custom_box": "0.125, 0.137, 0.859, 0.871", "save_every": 1, "resume": True, **extra}
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
             "2": {"class_type": "PVALoadFaceRecognizer", "inputs": {"recognizer_file": "r18.safetensors"}},
             "5": {"class_type": "PVATrainEncoder", "inputs": inputs}}
    if encoder:
        graph["3"] = {"class_type": "PVALoadEncoder", "inputs": {"encoder_file": encoder}}
        inputs["pva_encoder"] = ["3", 0]
    return graph


def write_pva_identity(host, name="anna.safetensors", drop_layer=False, seed=0, ckpt="tiny.safetensors"):
    """A PVA identity for a tiny checkpoint's layers and base (SD1.5 by default): random tokens, moved copies of the
    projections, a word."""
    model, clip, _ = host.load_checkpoint(ckpt)
    attention, files = host.module("sefi_core.pva.attention"), host.module("sefi_core.pva.identity")
    g = torch.Generator().manual_seed(seed)
    projections = {}
    for layer_name, layer in host.module("nodes.pva.patch").cross_attention_layers(model).items():
        copy = attention.VisualProjections.copy_of(layer.to_q.weight, layer.to_k.weight, layer.to_v.weight)
        for w in copy.tensors():
            w += 0.5 * w.std() * torch.randn(w.shape, generator=g)
        projections[layer_name] = copy
    if drop_layer:
        projections.pop(sorted(projections)[0])
    width = context_width(model)
    base = next(b for b in host.module("sefi_core.pva.bases").BASES.values() if b.context_dim == width)
    word = embedding(clip, "person") + 0.01 * torch.randn(width, generator=g)
    identity = files.PVAIdentity(torch.randn(10, width, generator=g), projections, word, "sks", base=base)
    files.save_pva_identity(identity, str(host.pva_identity_dir / name), overwrite=True)
    return identity


def context_width(model) -> int:
    """The width of the MODEL's text context: 768 (SD1.x), 1024 (SD2)."""
    return model.model.model_config.unet_config["context_dim"]


@contextlib.contextmanager
def recorded_layers(model):
    """Every attn2 call while sampling: (layer name, module, x, context, value, output, transformer_options)."""
    unet = model.model.diffusion_model
    calls, handles = [], []
    for name, module in unet.named_modules():
        if name.endswith(".attn2"):
            hook = lambda m, args, kwargs, out, name=name: calls.append(
                (name, m, args[0], kwargs.get("context"), kwargs.get("value"), out, kwargs.get("transformer_options")))
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def paper_formula(q, k, v, q_visual, k_visual, v_visual, heads, strength=1.0):
    """out = softmax([Q K_t^T, Q' K_v^T] / sqrt(d)) [V_t ; V_v], per head, the visual keys' weights times strength."""
    b, n, inner = q.shape
    d = inner // heads
    heads_of = lambda t: t.reshape(b, t.shape[1], heads, d).transpose(1, 2).double()  # (B, H, len, d)
    text_logits = heads_of(q) @ heads_of(k).transpose(-1, -2) / math.sqrt(d)
    visual_logits = heads_of(q_visual) @ heads_of(k_visual).transpose(-1, -2) / math.sqrt(d) + math.log(strength)
    weights = torch.softmax(torch.cat([text_logits, visual_logits], dim=-1), dim=-1)
    out = weights @ torch.cat([heads_of(v), heads_of(v_visual)], dim=2)
    return out.transpose(1, 2).reshape(b, n, inner)


def pil_read(picture: torch.Tensor) -> torch.Tensor:
    """(3, H, W) in [0, 1] -> (3, 256, 256) in [-1, 1], resized channel by channel by PIL's bilinear filter, as the
    PVA authors read the pictures they measure."""
    channels = [np.asarray(Image.fromarray(c.numpy(), mode="F").resize((256, 256), Image.Resampling.BILINEAR))
                for c in picture.float()]
    return torch.from_numpy(np.stack(channels)) * 2 - 1


def paper_id_similarity(network, images, references) -> torch.Tensor:
    """The paper's identity similarity written out: each (3, H, W) picture read at 256 px, rows and columns 35..222
    kept and pooled to 112, the recognizer's features; per image the mean over the references of torch's cosine
    similarity (with one reference, the paper's cosine to the original photo)."""
    def features(batch):
        faces = torch.stack([pil_read(p)[:, 35:223, 35:223] for p in batch])
        with torch.no_grad():
            return network(torch.nn.AdaptiveAvgPool2d((112, 112))(faces)).float()
    ours, theirs = features(images), features(references)
    return torch.stack([torch.nn.functional.cosine_similarity(ours, ref[None], dim=1) for ref in theirs]).mean(0)
