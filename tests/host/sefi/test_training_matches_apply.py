"""Training learns what Apply uses. For the same K/V tokens, template prompt, latent, timestep and noise, the noise
prediction of SeFi Apply Stage Tokens' MODEL and CLIP, run through the host's own sampler, equals the one a training
step computes (HostTrainer), in every stage and for each K/V half; and a few steps of the real SeFi Train Identity
node lower the denoising loss through that Apply path, on (t, noise) pairs training never drew, below the class word's.

The same eps prediction, computed three ways at one timestep inside each of the 5 stages:
- apply: the Apply'd CLIP through CLIPTextEncode; the Apply'd MODEL through comfy.sample.sample_custom (CFGGuider:
  prepare_sampling, process_conds, process_latent_in and the model's noise_scaling, the pack's OUTER_SAMPLE /
  CALC_COND_BATCH / DIFFUSION_MODEL wrappers, one UNet call batching the positive with a negative at CFG 7.5) with a
  one-call sampler at the timestep's sigma from the model's own model_sampling. The positive row's prediction is
  read in a post-CFG hook.
- training: sefi_core.sefi.train.loss_terms (a training step: its own stage choice, HostTrainer.encode_kv on the template
  with the trigger, HostTrainer.denoise), on the same latent and noise.
- reference (word tokens only): no SeFi code at all. The host's plain CLIP encodes the template with the stage's K
  word and with its V word, and a test-owned attn2 patch puts keys from the first and values from the second into
  every cross-attention layer of a plain model clone, for the stage of the paper's definition (timesteps
  [1000 - 200 (s+1), 1000 - 200 s) are stage s, noisiest first). It catches what training and Apply could share
  wrongly (the stage map, the K/V injector).

Tokens. Part 1 uses "word tokens": rows of the tiny checkpoint's word-embedding table, which is random, so they are
random vectors of exactly a word embedding's size that the reference can also reach by typing the word; each stage
and each K/V half gets a different row (a trained identity's stages differ little after a few steps, so a wrong
stage would hardly show). Part 2 uses the identity trained by the real node (3 steps, the paper's settings, 64 px),
and checks its Apply and training predictions agree too, in one stage (each stage costs a training-path CLIP encode).
The class word baseline is the template with the class word through the same Apply'd MODEL and CLIP: what strength 0
gives (the class word's embedding in the trigger's slot), at one CLIP encode instead of eleven.

Latents: the augmented views of the training image that training drew from (seed 0), VAE-encoded by
HostTrainer.training_samples; the raw VAE latents go to the sampler, which applies process_latent_in itself.

Tolerance: on the CPU the UNet and the CLIP text model compute in fp32 on both hosts (asserted: the checkpoint is
fp16, the host upcasts all but the final layer norm and the projection, which compute in fp32 too). Apply and the
reference agree bit for bit; training differs at ~4e-6 (eps values of size 1-2), from the batch composition alone:
CLIP encodes 11 prompts for Apply and 2 in training, the UNet runs 2 rows (CFG) for Apply and 1 in training, and CPU
kernels block differently by batch size. ATOL = 1e-5 is ~2.5x that; one stage's K token moves eps by ~3e-2.
"""
import pytest
import torch

from sefi_testkit import probe

TRIGGER = "sks"
CLASS_WORD = "person"
# One timestep inside each of the paper's 5 even stages (stage s: [1000 - 200 (s+1), 1000 - 200 s)), noisiest first.
STAGE_TIMESTEPS = (901, 703, 499, 297, 105)
WORDS = ("cat", "dog", "car", "tree", "house")  # one token each
K_WORDS = WORDS  # stage s: keys from WORDS[s], values from WORDS[s+1]: no two stages alike, and K != V in each
V_WORDS = WORDS[1:] + WORDS[:1]
CHANGED_K_STAGE, CHANGED_V_STAGE = 1, 3  # identity B differs from A only in this stage's K and that stage's V token
K_WORDS_B = tuple("tree" if s == CHANGED_K_STAGE else w for s, w in enumerate(K_WORDS))
V_WORDS_B = tuple("dog" if s == CHANGED_V_STAGE else w for s, w in enumerate(V_WORDS))
WORD_TEMPLATE, TRAINED_TEMPLATE = 3, 0  # indices into sefi_core.train.PROMPT_TEMPLATES
TRAIN_STEPS, TRAIN_SEED = 3, 0  # 3 steps: held-out loss ~4% below the class word's (2 steps: 1.5%)
TRAINED_CHECK_STAGE = 2  # the trained identity's predictions are compared in one stage (each costs a CLIP encode)
CFG = 7.5
ATOL = 1e-5  # see the module docstring
NOISE_SEED = 20240202  # the held-out noise; training draws its own from TRAIN_SEED


def paper_stage(t: float) -> int:
    return 4 - int(t // 200)


def templates(host):
    return host.module("sefi_core.sefi.train").PROMPT_TEMPLATES


def close(actual, expected, what, atol=ATOL):
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------- the three paths

def apply_path(host, model, clip, identity, prompts, pairs):
    """{prompt: [(x_t, eps)] per (raw latent, t, noise) pair} through Apply's MODEL and CLIP; the negative prompt
    is empty (encoded by the Apply'd CLIP too)."""
    patched_model, patched_clip = probe.apply(host, model, clip, identity)
    negative = probe.encode(host, patched_clip, "")
    out = {}
    for prompt in prompts:
        positive = probe.encode(host, patched_clip, prompt)
        out[prompt] = [probe.sampler_eps(patched_model, positive, negative, raw, noise, t, CFG) for raw, _, _, t, noise in pairs]
    return out


class FixedTokens:
    """Stands in for the token mapper: loss_terms asks it for the (S, C) K and V tokens."""

    def __init__(self, identity):
        self.k_tokens, self.v_tokens = identity.k_tokens, identity.v_tokens

    def __call__(self):
        return self.k_tokens, self.v_tokens


def training_path(host, trainer, identity, template, pairs, stages=range(5)):
    """{stage: eps} as a training step computes it (loss_terms: its stage choice, encode_kv, denoise)."""
    train = host.module("sefi_core.sefi.train")
    out = {}
    for s in stages:
        _, latent, mask, t, noise = pairs[s]
        seen = []

        def denoise(*args):
            eps, attention = trainer.denoise(*args)
            seen.append(eps)
            return eps, attention

        with torch.no_grad():
            train.loss_terms(FixedTokens(identity), train.Batch(latent, mask, t, template, noise), trainer.encode_kv,
                             denoise, train.even_boundaries(5))
        out[s] = seen[0].float()
    return out


def reference_contexts(host, clip, template):
    """{word: (1, 77, C)} the plain host CLIP gives the template with the word, all encoded in one batch (each of
    SDXL's encoders its own prompts)."""
    prompts = [clip.tokenize(templates(host)[template].format(w)) for w in WORDS]
    tokens = {key: [c for p in prompts for c in p[key]] for key in probe.text_encoder_keys(clip)}
    with torch.inference_mode():
        encoded = clip.encode_from_tokens(tokens).float()
    return dict(zip(WORDS, encoded.chunk(len(WORDS), dim=1)))


def reference_path(host, model, clip, contexts, k_words, v_words, pairs, template, stages=range(5)):
    """{stage: eps} with no SeFi code: keys and values of the positive row put into every attn2 by hand. The positive
    is the template with the class word, whose keys and values are replaced in every layer; SDXL's UNet takes its
    pooled embedding too (through `y`), which SeFi leaves the class word's."""
    positive = probe.encode(host, clip, templates(host)[template].format(CLASS_WORD))
    negative = probe.encode(host, clip, "")
    out = {}
    for s in stages:
        raw, _, _, t, noise = pairs[s]
        k, v = contexts[k_words[paper_stage(t)]], contexts[v_words[paper_stage(t)]]

        def kv_patch(n, context_attn2, value_attn2, extra_options, k=k, v=v):
            rows = torch.tensor([c == 0 for c in extra_options["cond_or_uncond"]])  # 0: the positive's rows
            rows = rows.repeat_interleave(context_attn2.shape[0] // rows.shape[0]).view(-1, 1, 1).to(n.device)
            return n, torch.where(rows, k.to(context_attn2), context_attn2), torch.where(rows, v.to(value_attn2), value_attn2)

        plain = model.clone()
        plain.set_model_attn2_patch(kv_patch)
        out[s] = probe.sampler_eps(plain, positive, negative, raw, noise, t, CFG)[1]
    return out


class RecordingVAE:
    """The VAE, keeping each latent it encodes (before the model's process_latent_in)."""

    def __init__(self, vae):
        self.vae, self.latents = vae, []

    def encode(self, pixels):
        latent = self.vae.encode(pixels)
        self.latents.append(latent.clone().float())
        return latent

    def __getattr__(self, name):
        return getattr(self.vae, name)


# ---------------------------------------------------------------- one run for the module

@pytest.fixture(scope="module", params=["tiny", "tiny_sdxl"])
def paths(host, request):
    model, clip, vae = host.load_checkpoint(host.checkpoint(request.param))
    training, shared = host.module("nodes.sefi.training"), host.module("nodes.training")
    assert model.model.get_dtype() == torch.float32 and model.model.manual_cast_dtype is None

    image = host.nodes.LoadImage().load_image("astronaut.png")[0]
    trained = probe.train_node(
        host, model=model, clip=clip, vae=vae, image=image, name="matches_apply", trigger=TRIGGER, class_word=CLASS_WORD,
        steps=TRAIN_STEPS, learning_rate=0.005, attention_weight=0.003, seed=TRAIN_SEED, resolution=64,
        kv_pairs="5", attention_loss="all tokens (#3, paper)", overwrite=True).result[0]
    a = probe.word_identity(clip, K_WORDS, V_WORDS, trigger=TRIGGER)
    b = probe.word_identity(clip, K_WORDS_B, V_WORDS_B, trigger=TRIGGER)

    trainer = training.HostTrainer(model, clip, TRIGGER, CLASS_WORD, "all")
    recording = RecordingVAE(vae)
    with shared.training_session(trainer):
        # The views the node trained on: training_samples with its seed and count.
        views = trainer.training_samples(image, recording, 64, training.view_count(1),
                                         torch.Generator().manual_seed(TRAIN_SEED))
        g = torch.Generator().manual_seed(NOISE_SEED)
        pairs = []  # per stage: (raw latent, latent, mask, t, noise)
        for s, t in enumerate(STAGE_TIMESTEPS):
            latent, mask = views[s % len(views)]
            pairs.append((recording.latents[s % len(views)], latent, mask, t, torch.randn(latent.shape, generator=g)))
        result = {
            "train_a": training_path(host, trainer, a, WORD_TEMPLATE, pairs),
            "train_b": training_path(host, trainer, b, WORD_TEMPLATE, pairs, (CHANGED_K_STAGE, CHANGED_V_STAGE)),
            "train_trained": training_path(host, trainer, trained, TRAINED_TEMPLATE, pairs, (TRAINED_CHECK_STAGE,)),
            "x_train": [trainer.sampling.noise_scaling(trainer.sampling.sigma(torch.tensor([float(t)])), noise, latent)
                        for _, latent, _, t, noise in pairs],
        }

    word_prompt = templates(host)[WORD_TEMPLATE].format(TRIGGER)
    trained_prompt, class_prompt = (templates(host)[TRAINED_TEMPLATE].format(w) for w in (TRIGGER, CLASS_WORD))
    text_models = [getattr(clip.cond_stage_model, f"clip_{key}").transformer.text_model
                   for key in probe.text_encoder_keys(clip)]
    dtypes = set()
    hooks = [m.register_forward_hook(lambda m, args, out: dtypes.update({args[0].dtype, out.dtype}))
             for text_model in text_models for m in (text_model.encoder.layers[0].mlp.fc1, text_model.final_layer_norm)]
    try:
        apply_a = apply_path(host, model, clip, a, [word_prompt], pairs)[word_prompt]
    finally:
        for h in hooks:
            h.remove()
    assert dtypes == {torch.float32}, f"the CLIP computed in {dtypes}: the tolerance assumes fp32"
    contexts = reference_contexts(host, clip, WORD_TEMPLATE)
    result.update(
        apply_a=apply_a,
        apply_b=apply_path(host, model, clip, b, [word_prompt], pairs)[word_prompt],
        # With the class word in the trigger's place, through the same Apply'd MODEL and CLIP (what strength 0 gives).
        apply_trained=apply_path(host, model, clip, trained, [trained_prompt, class_prompt], pairs),
        reference_a=reference_path(host, model, clip, contexts, K_WORDS, V_WORDS, pairs, WORD_TEMPLATE),
        reference_b=reference_path(host, model, clip, contexts, K_WORDS_B, V_WORDS_B, pairs, WORD_TEMPLATE,
                                   (CHANGED_K_STAGE, CHANGED_V_STAGE)),
        pairs=pairs, trained_prompt=trained_prompt, class_prompt=class_prompt,
    )
    return result


# ---------------------------------------------------------------- the tests

def test_apply_and_training_predict_the_same_noise_in_every_stage(paths):
    for s, t in enumerate(STAGE_TIMESTEPS):
        x_apply, eps_apply = paths["apply_a"][s]
        assert torch.equal(x_apply, paths["x_train"][s]), f"stage {s}: the sampler's x_t is not the training's"
        close(eps_apply, paths["reference_a"][s], f"stage {s} (t={t}): Apply vs the reference")
        close(paths["train_a"][s], paths["reference_a"][s], f"stage {s} (t={t}): training vs the reference")
        close(eps_apply, paths["train_a"][s], f"stage {s} (t={t}): Apply vs training")


def test_changing_only_one_k_or_one_v_token_changes_both_paths_alike(paths):
    for s, half in ((CHANGED_K_STAGE, "K"), (CHANGED_V_STAGE, "V")):
        d_apply = paths["apply_b"][s][1] - paths["apply_a"][s][1]
        d_train = paths["train_b"][s] - paths["train_a"][s]
        d_reference = paths["reference_b"][s] - paths["reference_a"][s]
        assert d_reference.abs().max() > 1000 * ATOL, f"the {half} token of stage {s} hardly matters: no test"
        close(d_apply, d_reference, f"changing the {half} token of stage {s}, Apply vs the reference", 2 * ATOL)
        close(d_train, d_reference, f"changing the {half} token of stage {s}, training vs the reference", 2 * ATOL)
        close(d_apply, d_train, f"changing the {half} token of stage {s}, Apply vs training", 2 * ATOL)
    for s in set(range(5)) - {CHANGED_K_STAGE, CHANGED_V_STAGE}:  # the other stages do not see those tokens at all
        assert torch.equal(paths["apply_b"][s][1], paths["apply_a"][s][1]), f"stage {s} changed with another stage's token"


def masked_loss(eps, noise, mask):
    return float(((eps - noise) ** 2 * mask).sum() / (mask.sum() * eps.shape[1]))


def test_trained_identity_matches_and_beats_the_class_word_on_held_out_pairs(paths, host):
    train = host.module("sefi_core.sefi.train")
    g = torch.Generator().manual_seed(TRAIN_SEED)  # train_tokens' draws, replayed
    samples = [(torch.zeros(paths["pairs"][0][1].shape), None)] * min(32, TRAIN_STEPS)  # as many views as it had
    drawn = [train.draw_batch(samples, g) for _ in range(TRAIN_STEPS)]
    assert not {d.t for d in drawn} & set(STAGE_TIMESTEPS), "a held-out timestep was drawn in training"
    assert not any(torch.equal(d.noise, p[4]) for d in drawn for p in paths["pairs"])
    applied = paths["apply_trained"]
    s = TRAINED_CHECK_STAGE
    close(applied[paths["trained_prompt"]][s][1], paths["train_trained"][s], f"trained identity, stage {s}: Apply vs training")
    trained, plain = [], []
    for s, (_, _, mask, t, noise) in enumerate(paths["pairs"]):
        trained.append(masked_loss(applied[paths["trained_prompt"]][s][1], noise, mask))
        plain.append(masked_loss(applied[paths["class_prompt"]][s][1], noise, mask))
    assert sum(trained) < 0.99 * sum(plain), f"held-out loss per stage: trained {trained}, class word {plain}"
