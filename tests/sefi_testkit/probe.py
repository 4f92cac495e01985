"""Test helpers around the real host: encode, sample, record cross-attention calls, and compute attention
independently from the UNet's own weights. Of the pack's code only the host-free Identity is used here (to build
identities from words); the nodes are reached through the Host."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from sefi_core.sefi.identity import Identity


def train_node(host, **inputs):
    """SeFi Train Identity's execute called as the host calls a node that takes its inputs as lists (is_input_list):
    every input a list, a single value a list of one (`image` and `subject_mask` may be given as lists of several)."""
    listed = {k: v if k in ("image", "subject_mask") and isinstance(v, list) else [v] for k, v in inputs.items()}
    with torch.inference_mode():
        return host.node("SefiTrainIdentity").execute(**listed)


def text_encoder_keys(clip) -> tuple[str, ...]:
    """The host's token keys of the CLIP's text encoders: ("l",) SD1.x, ("h",) SD2, ("l", "g") SDXL (its encode
    concatenates CLIP-L's output and bigG's in that order)."""
    name = getattr(clip.cond_stage_model, "clip_name", None)
    return (name,) if name else ("l", "g")


def family(clip) -> str:
    return "sdxl" if text_encoder_keys(clip) == ("l", "g") else "sd1"


def embedding(clip, word: str) -> torch.Tensor:
    """A word's input embedding, read straight from the host's token tables: the CLIP's one text encoder's (CLIP-L;
    SD2's OpenCLIP ViT-H), or SDXL's CLIP-L and bigG embeddings side by side."""
    parts = []
    for key in text_encoder_keys(clip):
        chunk = clip.tokenize(word)[key][0]
        ids = [t for t, *_ in chunk[1:]]
        ids = ids[: ids.index(getattr(clip.tokenizer, f"clip_{key}").end_token)]
        table = getattr(clip.cond_stage_model, f"clip_{key}").transformer.get_input_embeddings().weight
        parts.append(table[torch.tensor(ids)].detach().float().mean(0))
    return torch.cat(parts)


def word_identity(clip, k_words, v_words, trigger="sks") -> Identity:
    k = torch.stack([embedding(clip, w) for w in k_words])
    v = torch.stack([embedding(clip, w) for w in v_words])
    return Identity(k, v, trigger, family=family(clip))


def apply(host, model, clip, identity, trigger="", strength=1.0, start=0.0, end=1.0):
    with torch.inference_mode():
        out = host.node("SefiApplyStageTokens").execute(model=model, clip=clip, identity=identity, trigger=trigger,
                                                         strength=strength, start_percent=start, end_percent=end)
    return out.result


def encode(host, clip, text):
    with torch.inference_mode():
        return host.nodes.CLIPTextEncode().encode(clip, text)[0]


def stage_contexts(conditioning) -> torch.Tensor:
    """(B, G, 2, L, C): the K and V contexts per segment that a SeFi conditioning tensor carries."""
    return conditioning[0][0].stage_contexts()


def sample(host, model, positive, negative, steps=3, cfg=7.0, seed=0, size=64) -> torch.Tensor:
    with torch.inference_mode():
        latent = host.nodes.EmptyLatentImage().generate(size, size, 1)[0]
        return host.nodes.common_ksampler(model, seed, steps, cfg, "euler", "normal", positive, negative, latent)[0]["samples"]


def txt2img_graph(positive, negative, identity=None, ckpt="tiny.safetensors", steps=3) -> dict:
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}}
    model, clip = ["1", 0], ["1", 1]
    if identity:
        graph["2"] = {"class_type": "SefiLoadIdentity", "inputs": {"identity_file": identity}}
        graph["3"] = {"class_type": "SefiApplyStageTokens", "inputs": {
            "model": model, "clip": clip, "identity": ["2", 0], "trigger": "", "strength": 1.0,
            "start_percent": 0.0, "end_percent": 1.0}}
        model, clip = ["3", 0], ["3", 1]
    graph.update({
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": clip}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": clip}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": model, "seed": 0, "steps": steps, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["6", 0], "denoise": 1.0}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": "sefi_test"}},
    })
    return graph


def saved_latent(host, result, node_id="8") -> torch.Tensor:
    info = result.outputs[node_id]["latents"][0]
    return load_file(str(host.output_dir / info["subfolder"] / info["filename"]))["latent_tensor"]


def reference_attention(attn, x, k_context, v_context) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V per head, then the output projection, from the layer's own weights."""
    heads = attn.heads
    q = F.linear(x.float(), attn.to_q.weight.float())
    k = F.linear(k_context.float().expand(x.shape[0], -1, -1), attn.to_k.weight.float())
    v = F.linear(v_context.float().expand(x.shape[0], -1, -1), attn.to_v.weight.float())
    split = lambda t: t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # (B, heads, T, d)
    q, k, v = split(q), split(k), split(v)
    probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
    proj = attn.to_out[0]
    return F.linear(out, proj.weight.float(), proj.bias.float())


@dataclass
class Attn2Calls:
    model: object
    keep_tensors: bool = True
    records: list = field(default_factory=list)

    def by_unet_call(self):
        groups = []
        for r in self.records:
            if not groups or groups[-1][0] != r["sigma"]:
                groups.append((r["sigma"], []))
            groups[-1][1].append(r)
        return groups


@contextlib.contextmanager
def _hooks(modules, hook):
    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class record_attn2:
    """Records every cross-attention call of `model` while sampling inside `with`; the hooks are removed
    afterwards, so the shared host model is left as it was."""

    def __init__(self, model, keep_tensors=True):
        self.calls = Attn2Calls(model, keep_tensors)
        modules = [m for name, m in model.model.named_modules() if name.endswith("attn2")]
        self._cm = _hooks(modules, self._hook)

    def _hook(self, module, args, kwargs, output):
        options = kwargs.get("transformer_options", {})
        record = {"block": (options.get("block"), options.get("block_index")),
                  "sigma": float(options["sigmas"][0]), "context_row0": kwargs["context"][0].detach().clone()}
        if self.calls.keep_tensors:
            record.update(module=module, x=args[0].detach().clone(), out=output.detach().clone(),
                          context=kwargs["context"].detach().clone(), value=kwargs["value"].detach().clone())
        self.calls.records.append(record)

    def __enter__(self):
        self._cm.__enter__()
        return self.calls

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


@dataclass
class UnetCalls:
    model: object
    batches: list = field(default_factory=list)


def count_unet_calls(model) -> UnetCalls:
    import comfy.patcher_extension  # the host is on sys.path only once the `host` fixture ran

    calls = UnetCalls(model.clone())

    def count(executor, x, *args, **kwargs):
        calls.batches.append(x.shape[0])
        return executor(x, *args, **kwargs)

    calls.model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "sefi_test_count", count)
    return calls


def train_graph(name, steps=20, overwrite=False, image="astronaut.png", **extra):
    inputs = {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "image": ["2", 0], "name": name,
              "trigger": "sks", "class_word": "person", "steps": steps, "learning_rate": 0.005,
              "attention_weight": 0.003, "seed": 0, "resolution": 64, "kv_pairs": "5",
              "attention_loss": "all tokens (#3, paper)", "overwrite": overwrite, "keep_training_state": False}
    inputs.update(extra)  # keep_training_state off unless a test continues: each state is ~120 MB
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
            "2": {"class_type": "LoadImage", "inputs": {"image": image}},
            "3": {"class_type": "SefiTrainIdentity", "inputs": inputs},
            "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 1]}}}


def sampler_eps(model, positive, negative, raw_latent, noise, t, cfg=7.5):
    """(x_t, eps of the positive row) from one call of the host's sampler at timestep t's sigma."""
    import comfy.sample
    import comfy.samplers

    sigma = model.get_model_object("model_sampling").sigma(torch.tensor([float(t)]))
    seen = {}

    def post_cfg(args):
        seen["x"], seen["cond"] = args["input"].clone(), args["cond_denoised"].clone()
        return args["denoised"]

    def one_call(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        return model_k(x, sigmas[0] * x.new_ones([x.shape[0]]), **extra_args)

    m = model.clone()
    m.set_model_sampler_post_cfg_function(post_cfg)
    with torch.inference_mode():
        comfy.sample.sample_custom(m, noise, cfg, comfy.samplers.KSAMPLER(one_call), torch.cat([sigma, sigma.new_zeros(1)]),
                                   positive, negative, raw_latent, disable_pbar=True, seed=0)
    x = seen["x"].float()
    return x, (x - seen["cond"].float()) / sigma
