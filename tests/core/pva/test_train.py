"""PVA's fine-tune loop and its network files, host-free: the timesteps are stratified, the loss is the denoising MSE
computed independently here, AdamW moves only the projections and the word (each at its own rate), and encoder and
recognizer files round-trip or are refused by name."""
import pytest
import torch
from safetensors.torch import save_file

from sefi_core.pva.attention import VisualProjections
from sefi_core.pva.encoder import IdentityEncoder
from sefi_core.pva.face import IResNet
from sefi_core.pva.model_files import (PVAModelFileError, load_encoder, recognizer_from_state_dict, save_encoder,
                                       weights_hash)
from sefi_core.pva.train import (FineTuneSettings, InpaintSample, TrainableIdentity, denoising_loss, fine_tune,
                                 stratified_timesteps)


def test_timesteps_are_one_per_equal_slice_of_the_schedule():
    g = torch.Generator().manual_seed(0)
    for count in (1, 2, 4, 7):
        for _ in range(50):
            t = stratified_timesteps(count, g)
            assert t.dtype == torch.long and len(t) == count
            assert all(k * 1000 / count <= int(v) < (k + 1) * 1000 / count for k, v in enumerate(t))


def identity(width=8, layers=("a", "b")):
    g = torch.Generator().manual_seed(1)
    projections = {n: VisualProjections(*(torch.randn(width, width, generator=g) for _ in range(3))) for n in layers}
    return TrainableIdentity(projections, torch.randn(width, generator=g), "cpu")


def toy_denoise(ident, seen):
    """eps = a function of the projections, the word and the inputs (any differentiable one will do)."""
    def denoise(latents, noise, timesteps, concat, word):
        seen.append((latents, noise, timesteps, concat))
        mix = sum(p.to_q.sum() + p.to_k.mean() - p.to_v.std() for p in ident.projections.values())
        return latents * torch.tanh(mix) + concat[:, :4] * word.mean() + timesteps.view(-1, 1, 1, 1) / 1000
    return denoise


def sample():
    g = torch.Generator().manual_seed(2)
    return InpaintSample(torch.randn(1, 4, 3, 3, generator=g), torch.randn(1, 5, 3, 3, generator=g))


def test_the_loss_is_the_mse_between_the_noise_and_its_prediction_at_each_timestep():
    ident, seen = identity(), []
    s = sample()
    loss = denoising_loss(s, ident, toy_denoise(ident, seen), 2, torch.Generator().manual_seed(3))
    latents, noise, timesteps, concat = seen[0]
    assert latents.shape == (2, 4, 3, 3) and torch.equal(latents[0], latents[1]) and not torch.equal(noise[0], noise[1])
    g = torch.Generator().manual_seed(3)
    expected_t = stratified_timesteps(2, g)
    expected_noise = torch.randn((2, 4, 3, 3), generator=g)
    assert torch.equal(timesteps, expected_t) and torch.equal(noise, expected_noise)
    eps = toy_denoise(ident, [])(latents, noise, timesteps, concat, ident.word())
    assert torch.allclose(loss, ((eps - noise) ** 2).mean())


def test_the_fine_tune_moves_the_projections_and_the_word_and_nothing_else():
    ident = identity()
    start = [t.detach().clone() for t in ident.projection_tensors()]
    base = ident.word_base.clone()
    samples = [sample(), sample()]
    result = fine_tune(FineTuneSettings(steps=3, resolution=64), ident, samples, toy_denoise(ident, []))
    assert len(result.losses) == 3 and torch.equal(ident.word_base, base)
    assert all(not torch.equal(a, b) for a, b in zip(start, ident.projection_tensors()))
    assert not torch.equal(result.word, base) and torch.equal(result.word, (ident.word_base + ident.word_offset).detach())
    assert all(not t.requires_grad for p in result.projections.values() for t in p.tensors())
    # the word's learning rate 0 keeps the trigger's own embedding (weight decay acts on the offset, which stays 0)
    still = identity()
    fixed = fine_tune(FineTuneSettings(steps=2, word_learning_rate=0.0, resolution=64), still, samples,
                      toy_denoise(still, []))
    assert torch.equal(fixed.word, still.word_base)


def test_settings_outside_the_range_are_refused_with_the_papers_value():
    with pytest.raises(ValueError, match="the paper uses 40"):
        FineTuneSettings(steps=0)
    with pytest.raises(ValueError, match="the paper uses 2e-5"):
        FineTuneSettings(projection_learning_rate=float("nan"))
    with pytest.raises(ValueError, match="multiple of 64"):
        FineTuneSettings(resolution=100)


def test_an_encoder_file_round_trips_and_other_files_are_refused(tmp_path):
    torch.manual_seed(0)
    encoder = IdentityEncoder(768, layers=2, heads=8).eval()
    projections = {"input_blocks.1.1.transformer_blocks.0.attn2": VisualProjections(
        torch.randn(320, 320), torch.randn(320, 768), torch.randn(320, 768))}
    word = torch.randn(768)
    path = save_encoder(encoder, str(tmp_path / "enc.safetensors"), "iresnet r50", {"stage": 2}, projections, word)
    loaded = load_encoder(path)
    assert loaded.recognizer == "iresnet r50" and loaded.hash == weights_hash(encoder) and loaded.settings == {"stage": 2}
    features = torch.randn(1, 3, 512)
    with torch.no_grad():
        assert torch.equal(loaded.network(features), encoder(features))
    assert torch.equal(loaded.word, word) and loaded.projections.keys() == projections.keys()
    for a, b in zip(loaded.projections["input_blocks.1.1.transformer_blocks.0.attn2"].tensors(),
                    projections["input_blocks.1.1.transformer_blocks.0.attn2"].tensors()):
        assert torch.equal(a, b.half().float())  # stored in fp16, as identities store them
    bare = load_encoder(save_encoder(encoder, str(tmp_path / "bare.safetensors"), "iresnet r50"))
    assert bare.projections == {} and bare.word is None
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"), metadata={"sefi.format": "pva-identity"})
    with pytest.raises(PVAModelFileError, match="other.safetensors is a .safetensors file but not a PVA identity encoder"):
        load_encoder(str(tmp_path / "other.safetensors"))
    (tmp_path / "cut.safetensors").write_bytes(open(path, "rb").read()[:1000])
    with pytest.raises(PVAModelFileError, match="cut.safetensors is not a readable"):
        load_encoder(str(tmp_path / "cut.safetensors"))
    other = IdentityEncoder(768, layers=1, heads=8)
    assert weights_hash(other) != weights_hash(encoder)


def test_a_recognizer_state_dict_is_recognised_by_its_blocks_and_a_foreign_one_refused():
    torch.manual_seed(0)
    net = IResNet("r18")
    loaded = recognizer_from_state_dict({f"module.{k}": v for k, v in net.state_dict().items()}, "backbone.pth")
    assert loaded.depth == "r18" and not loaded.training
    with pytest.raises(PVAModelFileError, match="backbone.pth is not an ArcFace iresnet state dict"):
        recognizer_from_state_dict({k: v for k, v in net.state_dict().items() if k != "fc.weight"}, "backbone.pth")


@pytest.mark.parametrize("change, message", [
    ({"pva.heads": "7"}, "metadata pva.heads 7 does not divide the width 768"),
    ({"pva.layers": "100000"}, "metadata pva.layers is 100000 but its tensors have 1"),
    ({"pva.tokens": "4"}, "metadata pva.tokens is 4 but its tensors have 10"),
    ({"pva.context_dim": "1024"}, "metadata pva.context_dim is 1024 but its tensors have 768"),
])
def test_an_encoders_metadata_is_checked_against_its_tensors_before_anything_is_built(tmp_path, monkeypatch, change,
                                                                                        message):
    """A head count that does not divide the width, or a layer count far beyond the file's tensors, is refused by
    name, and no network is built from it (building 100,000 layers would exhaust the machine first)."""
    from safetensors import safe_open
    from sefi_core.pva import model_files
    path = save_encoder(IdentityEncoder(768, layers=1, heads=8), str(tmp_path / "good.safetensors"), "iresnet r50")
    with safe_open(path, "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(tmp_path / "edited.safetensors"), metadata={**metadata, **change})
    built = []
    monkeypatch.setattr(model_files, "IdentityEncoder", lambda *a, **k: built.append(a) or IdentityEncoder(*a, **k))
    with pytest.raises(PVAModelFileError, match="edited.safetensors is damaged.*" + message):
        load_encoder(str(tmp_path / "edited.safetensors"))
    assert built == []


def test_a_recognizer_that_is_not_a_state_dict_or_has_negative_variances_is_refused():
    with pytest.raises(PVAModelFileError, match="backbone.pth holds a list where a recognizer's state dict"):
        recognizer_from_state_dict([torch.zeros(1)], "backbone.pth")
    torch.manual_seed(0)
    state = IResNet("r18").state_dict()
    state["bn2.running_var"] = -state["bn2.running_var"].abs() - 1  # finite weights, NaN features
    with pytest.raises(PVAModelFileError, match="backbone.pth holds negative batch-norm variances \\(bn2.running_var\\)"):
        recognizer_from_state_dict(state, "backbone.pth")


def test_a_state_of_another_shape_is_refused_naming_the_weight():
    from sefi_core.pva.train import StateMismatch, weights_mismatch
    assert weights_mismatch({"a": torch.zeros(2)}, {"a": torch.ones(2)}) is None
    assert weights_mismatch({"a": torch.zeros(10, 4)}, {"a": torch.zeros(4, 4)}) == "a is (4, 4) there and (10, 4) here"
    assert "1 missing (b)" in weights_mismatch({"a": torch.zeros(1), "b": torch.zeros(1)}, {"a": torch.zeros(1)})
    assert issubclass(StateMismatch, ValueError)


# Encoder training (sefi_core/pva/train.py, second half) on a stand-in UNet: a differentiable function of the latents,
# the word, the visual tokens and one layer's visual projections.
LAYER = "input_blocks.1.1.transformer_blocks.0.attn2"


def encoder_run(stage=1, steps=3, dropout=0.1, seed=0, resume=None, saves=None, prompts=None):
    prompts = prompts if prompts is not None else {}
    from sefi_core.pva.train import EncoderSample, EncoderTrainables, EncoderTrainingSettings, train_encoder
    torch.manual_seed(0)
    encoder, recognizer = IdentityEncoder(768, layers=1, heads=8, dropout=dropout), IResNet("r18")
    projections = {LAYER: VisualProjections(torch.randn(32, 32) * 0.1, torch.randn(32, 768) * 0.02,
                                            torch.randn(32, 768) * 0.02)}
    identity = TrainableIdentity(projections, torch.randn(768) * 0.02, "cpu")
    trainables = EncoderTrainables(encoder, recognizer, identity, stage)
    photos = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    latents = torch.randn(4, 1, 4, 8, 8, generator=torch.Generator().manual_seed(2))

    def draw(generator):
        target = int(torch.randint(4, (1,), generator=generator))
        drawn.append(f"caption of {target}" if target % 2 else None)  # captions beside some photos
        return EncoderSample(InpaintSample(latents[target], torch.zeros(1, 5, 8, 8)),
                             photos[[i for i in range(4) if i != target][:2]], prompt=drawn[-1])

    drawn, seen = prompts.setdefault("drawn", []), prompts.setdefault("seen", [])

    def denoise(latents_, noise, timesteps, concat, word, tokens, prompt):
        seen.append(prompt)
        p = identity.projections[LAYER]
        signal = (tokens @ p.to_k.T).mean() + (tokens @ p.to_v.T).std() + word.mean() + p.to_q.mean()
        return noise * 0.5 + latents_ * signal + timesteps.view(-1, 1, 1, 1) * 1e-4

    settings = EncoderTrainingSettings(stage=stage, steps=steps, batch_size=1, accumulation=2, timesteps=2, seed=seed,
                                       resolution=64, encoder_learning_rate=1e-3, projection_learning_rate=1e-3,
                                       recognizer_learning_rate=1e-3)
    on_save = (lambda state: saves.append(state)) if saves is not None else (lambda state: None)
    return trainables, train_encoder(settings, trainables, draw, denoise, on_save=on_save, save_every=1, resume=resume)


@pytest.mark.parametrize("stage", [1, 2])
def test_encoder_training_moves_what_its_stage_trains_and_nothing_else(stage):
    torch.manual_seed(0)
    before_encoder, before_recognizer = IdentityEncoder(768, layers=1, heads=8), IResNet("r18")
    trainables, result = encoder_run(stage=stage)
    moved = lambda a, b: not torch.equal(a, b)
    assert all(moved(p, q) for p, q in zip(trainables.encoder.state_dict().values(),
                                           before_encoder.state_dict().values()))
    assert bool(trainables.identity.word_offset.abs().sum() > 0)
    after = trainables.recognizer.state_dict()
    for name, value in before_recognizer.state_dict().items():
        trained = stage == 2 and name in dict(before_recognizer.named_parameters()) and name != "features.weight"
        assert moved(after[name], value) == trained, name  # batch-norm statistics and ArcFace's fixed scale stay
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))


def test_an_encoder_training_continued_from_its_saved_state_ends_exactly_where_one_run_ends(tmp_path):
    from sefi_core.train_state import load_train_state, save_train_state
    whole, whole_result = encoder_run(steps=4)
    saves = []
    encoder_run(steps=2, saves=saves)
    assert [s.steps_done for s in saves] == [1, 2]
    path = save_train_state(saves[-1], str(tmp_path / "state.safetensors"))
    rest, rest_result = encoder_run(steps=4, resume=load_train_state(path, "Delete it to start anew."))
    assert rest_result.losses == whole_result.losses
    assert all(torch.equal(a, b) for a, b in zip(rest.encoder.state_dict().values(), whole.encoder.state_dict().values()))
    assert torch.equal(rest.identity.word(), whole.identity.word())
    # the dropout is part of it: with another dropout draw the run goes elsewhere (the test can tell)
    moved = load_train_state(path, "Delete it to start anew.")
    moved.generator = torch.Generator().manual_seed(5).get_state()
    assert encoder_run(steps=4, resume=moved)[1].losses[2:] != whole_result.losses[2:]
    with pytest.raises(ValueError, match="cannot continue a run"):
        encoder_run(steps=2, resume=load_train_state(path, "Delete it to start anew."))


def test_the_step_loss_is_the_mean_denoising_mse_of_its_samples_computed_independently():
    """Step 1's loss (before any update) recomputed from the same draws: the run's generator gives each sample of the
    step a seed; a sample's generator gives its dropout seed, its draw, its stratified timesteps and its noise."""
    import torch.nn.functional as F
    trainables_run, result = encoder_run(steps=1, dropout=0.0)
    torch.manual_seed(0)
    encoder, recognizer = IdentityEncoder(768, layers=1, heads=8, dropout=0.0), IResNet("r18").eval()
    projections = VisualProjections(torch.randn(32, 32) * 0.1, torch.randn(32, 768) * 0.02, torch.randn(32, 768) * 0.02)
    word = torch.randn(768) * 0.02
    photos = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    latents = torch.randn(4, 1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    seeds = torch.randint(2**62, (2,), generator=torch.Generator().manual_seed(0)).tolist()
    losses = []
    with torch.no_grad():
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            torch.randint(2**62, (1,), generator=g)
            target = int(torch.randint(4, (1,), generator=g))
            references = photos[[i for i in range(4) if i != target][:2]]
            faces = F.adaptive_avg_pool2d(F.interpolate(references * 2 - 1, (256, 256), mode="bilinear",
                                                        align_corners=True)[:, :, 35:223, 32:220], 112)
            tokens = encoder(recognizer(faces)[None])[0]
            t = ((torch.arange(2) + torch.rand(2, generator=g)) * 500).long()
            noise = torch.randn(2, 4, 8, 8, generator=g)
            signal = (tokens @ projections.to_k.T).mean() + (tokens @ projections.to_v.T).std() + word.mean() + \
                projections.to_q.mean()
            eps = noise * 0.5 + latents[target].expand(2, -1, -1, -1) * signal + t.view(-1, 1, 1, 1) * 1e-4
            losses.append(((eps - noise) ** 2).mean())
    assert result.losses[0] == pytest.approx(float(sum(losses) / 2), rel=1e-5)


def test_encoder_training_settings_are_checked_with_what_to_do():
    from sefi_core.pva.train import EncoderTrainingSettings
    for bad, message in [({"stage": 3}, "stage must be 1 or 2"), ({"batch_size": 0}, "the paper uses 2 and 4"),
                         ({"encoder_learning_rate": 0.0}, "the encoder's learning rate must be above 0"),
                         ({"recognizer_learning_rate": float("nan")}, "the recognizer's learning rate"),
                         ({"resolution": 96}, "multiple of 64")]:
        with pytest.raises(ValueError, match=message):
            EncoderTrainingSettings(**bad)
    assert EncoderTrainingSettings().samples_per_step == 8


def test_an_encoder_file_of_format_1_still_loads():
    import tempfile
    encoder = IdentityEncoder(768, layers=1, heads=8).eval()
    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/old.safetensors"
        save_file(encoder.state_dict(), path, metadata={
            "sefi.format": "pva-encoder", "sefi.format_version": "1", "pva.recognizer": "iresnet r50",
            "pva.context_dim": "768", "pva.layers": "1", "pva.heads": "8", "pva.tokens": "10"})
        loaded = load_encoder(path)
    assert loaded.hash == weights_hash(encoder) and loaded.projections == {} and loaded.word is None


def test_an_encoder_of_another_feature_width_round_trips_and_an_arcface_one_stays_readable_by_older_packs(tmp_path):
    from safetensors import safe_open
    torch.manual_seed(0)
    clip_width = IdentityEncoder(768, layers=1, heads=8, feature_dim=24).eval()
    path = save_encoder(clip_width, str(tmp_path / "clip.safetensors"), "CLIP vision (24-d image embedding)")
    loaded = load_encoder(path)
    features = torch.randn(1, 2, 24)
    with torch.no_grad():
        assert torch.equal(loaded.network(features), clip_width(features))
    assert loaded.network.queries.shape == (10, 24) and loaded.hash == weights_hash(clip_width)
    versions = {}
    for name, encoder in (("clip", clip_width), ("arcface", IdentityEncoder(768, layers=1, heads=8))):
        with safe_open(save_encoder(encoder, str(tmp_path / f"{name}.safetensors"), name), "pt") as f:
            versions[name] = f.metadata()["sefi.format_version"]
    assert versions == {"clip": "3", "arcface": "2"}


def test_encoder_training_from_features_computed_beforehand_trains_the_encoder_on_them():
    """A frozen feature source (the host's CLIP vision) gives each sample its references' features: the tokens are
    the encoder's of exactly those, and there is no stage 2 without a recognizer to tune."""
    from sefi_core.pva.train import EncoderSample, EncoderTrainables
    torch.manual_seed(0)
    encoder = IdentityEncoder(768, layers=1, heads=8, dropout=0.0, feature_dim=24)
    identity = TrainableIdentity({}, torch.zeros(768), "cpu")
    trainables = EncoderTrainables(encoder, None, identity, 1)
    features = torch.randn(3, 24)
    sample = EncoderSample(InpaintSample(torch.zeros(1, 4, 8, 8), torch.zeros(1, 5, 8, 8)), None, features)
    tokens = trainables.tokens(sample)
    assert torch.equal(tokens, encoder(features[None])[0])
    grads = torch.autograd.grad(tokens.square().sum(), list(encoder.parameters()), allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert [name for name, _ in trainables.named_parameters() if name.startswith("recognizer")] == []
    with pytest.raises(ValueError, match="stage 2 tunes the face recognizer"):
        EncoderTrainables(encoder, None, identity, 2)


def test_each_sample_is_denoised_with_its_own_prompt():
    prompts = {}
    encoder_run(steps=3, prompts=prompts)
    assert prompts["seen"] == prompts["drawn"] and len(prompts["seen"]) == 6  # 3 steps x 2 samples
    assert None in prompts["seen"] and any(prompts["seen"])  # with and without a caption: the test can tell


def test_non_finite_visual_tokens_are_blamed_on_the_recognizer_or_the_encoder_not_the_learning_rates():
    from sefi_core.pva.train import EncoderSample, EncoderTrainables, sample_loss
    encoder = IdentityEncoder(768, layers=1, heads=8, feature_dim=24)
    trainables = EncoderTrainables(encoder, None, TrainableIdentity({}, torch.zeros(768), "cpu"), 1)
    nan_features = torch.full((2, 24), float("nan"))
    sample = EncoderSample(InpaintSample(torch.zeros(1, 4, 8, 8), torch.zeros(1, 5, 8, 8)), None, nan_features)
    with pytest.raises(FloatingPointError, match="not finite at step 3: the face recognizer's features or the "
                                                 "encoder's output"):
        sample_loss(torch.Generator().manual_seed(0), trainables, lambda g: sample, None, 1, "at step 3")
