"""Training pieces that need no host: attention loss vs an independent computation, mapper, augmentation,
the loop's divergence guard and settings validation."""
import pytest
import torch
import torch.nn.functional as F

from sefi_core.images import as_rgb, center_square
from sefi_core.sefi.augment import SUBJECT_MARGIN, augment, subject_square
from sefi_core.sefi.losses import attention_loss, token_mask
from sefi_core.sefi.mapper import TokenMapper
from sefi_core.sefi.train import TrainSettings, TrainingDiverged, masked_mse, train_tokens

ADVICE = "Delete it and train the identity anew."  # what the node that reads a state says to do


def independent_attention_loss(q, k_t, k_r, heads, columns=None):
    b, n, dim = q.shape
    d = dim // heads
    qh = q.reshape(b, n, heads, d)
    maps = []
    for k in (k_t, k_r):
        kh = k.reshape(b, k.shape[1], heads, d)
        maps.append(torch.softmax(torch.einsum("bnhd,bthd->bhnt", qh, kh) / d ** 0.5, dim=-1))
    a_t, a_r = maps
    if columns is not None:
        a_t, a_r = a_t[..., columns], a_r[..., columns]
    return ((a_t - a_r) ** 2).sum() / a_t.numel()


@pytest.mark.parametrize("option", ["all", "trigger", "prompt"])
def test_attention_loss_and_gradient_match_an_independent_computation(option):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 64, 40, generator=g, dtype=torch.float64)
    k_t = torch.randn(2, 77, 40, generator=g, dtype=torch.float64, requires_grad=True)
    k_r = torch.randn(2, 77, 40, generator=g, dtype=torch.float64)
    mask = token_mask(option, 77, [6], 7)
    columns = None if mask is None else mask.nonzero().flatten()
    ours = attention_loss(q, k_t, k_r, heads=8, token_mask=mask)
    theirs = independent_attention_loss(q, k_t, k_r, 8, columns)
    assert ours.item() > 0
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-9)
    g_ours, = torch.autograd.grad(ours, k_t)
    g_theirs, = torch.autograd.grad(theirs, k_t)
    torch.testing.assert_close(g_ours.double(), g_theirs, rtol=1e-4, atol=1e-9)


def test_token_mask_options():
    assert token_mask("all", 77, [5], 8) is None
    assert token_mask("trigger", 77, [5], 8).nonzero().flatten().tolist() == [5]
    assert token_mask("prompt", 77, [5], 8).sum() == 9


@pytest.mark.parametrize("stages", [1, 5, 10])
def test_mapper_starts_at_the_class_word_and_learns(stages):
    cls = torch.randn(768) * 0.02
    mapper = TokenMapper(cls, stages)
    k, v = mapper()
    assert k.shape == v.shape == (stages, 768)
    assert torch.equal(k, cls.expand_as(k)) and torch.equal(v, cls.expand_as(v))
    (k.sum() + 2 * v.sum()).backward()
    assert all(p.grad is not None for p in mapper.parameters())


@pytest.mark.parametrize("shape", [(300, 451, 3), (64, 64, 1), (100, 40, 4)])
def test_augment_any_image_shape(shape):
    square = center_square(as_rgb(torch.rand(shape)), 64)
    g = torch.Generator().manual_seed(0)
    image, mask = augment(square, g)
    assert image.shape == (3, 64, 64) and mask.shape == (64, 64)
    assert 0 <= image.min() and image.max() <= 1
    side = int(mask.sum().sqrt())
    assert 6 <= side <= 64 and mask.sum() == side * side  # scale 0.1-1.0 of the canvas


def box_mask(height, width, top, bottom, left, right):
    mask = torch.zeros(height, width)
    mask[top:bottom, left:right] = 1
    return mask


def resized(window, size=64):
    return F.interpolate(window[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def test_the_square_follows_an_off_centre_subject_whole_and_centred():
    """A half-body shot 400x200 with the face far right: the centre square (cols 100-300) would lose it."""
    image, subject = torch.rand(3, 200, 400), box_mask(200, 400, 40, 100, 300, 360)
    square, mask = subject_square(image, subject, 64)
    side = round(60 * (1 + SUBJECT_MARGIN))  # the box's longer side plus the margin: 75
    top, left = round((40 + 100 - side) / 2), round((300 + 360 - side) / 2)  # centred on the box
    torch.testing.assert_close(square, resized(image[:, top:top + side, left:left + side]).clamp(0, 1))
    torch.testing.assert_close(mask, resized(subject[None, top:top + side, left:left + side])[0].clamp(0, 1))
    rows, cols = torch.nonzero(mask > 0.5, as_tuple=True)
    assert abs(float(rows.float().mean()) - 31.5) < 1 and abs(float(cols.float().mean()) - 31.5) < 1
    assert not torch.allclose(center_square(image, 64), square)


def test_a_subject_at_the_edge_shifts_the_square_inside_and_stays_whole():
    image, subject = torch.rand(3, 200, 400), box_mask(200, 400, 150, 200, 370, 400)  # bottom-right corner
    square, mask = subject_square(image, subject, 50)
    side = round(50 * (1 + SUBJECT_MARGIN))
    torch.testing.assert_close(square, resized(image[:, 200 - side:, 400 - side:], 50).clamp(0, 1))
    assert float(mask.sum()) == pytest.approx(float(subject.sum()) * (50 / side) ** 2, rel=0.02)  # nothing cut off


def test_a_subject_larger_than_the_short_side_is_padded_with_the_mean_colour():
    image, subject = torch.rand(3, 100, 300), box_mask(100, 300, 0, 100, 50, 200)  # 150 wide, photo 100 high
    square, mask = subject_square(image, subject, 64)
    assert square.shape == (3, 64, 64)
    torch.testing.assert_close(square[:, 0, 32], image.mean((1, 2)), atol=1e-5, rtol=0)  # above the photo: its mean
    assert float(mask.sum()) == pytest.approx(float(subject.sum()) * (64 / round(150 * 1.25)) ** 2, rel=0.03)


def test_an_empty_subject_mask_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="The subject mask is empty: paint over the subject"):
        subject_square(torch.rand(3, 64, 64), torch.zeros(64, 64), 64)


def test_augment_with_a_full_subject_mask_is_augment_without_one():
    square = torch.rand(3, 64, 64)
    plain = augment(square, torch.Generator().manual_seed(3))
    full = augment(square, torch.Generator().manual_seed(3), torch.ones(64, 64))
    assert torch.equal(plain[0], full[0])  # the photo's handling is untouched by the mask
    torch.testing.assert_close(full[1], plain[1], atol=1e-6, rtol=0)  # a resized all-ones mask: ones within rounding


def test_augment_weights_the_loss_by_the_subject_flipped_and_scaled_with_the_photo():
    square, subject = torch.rand(3, 64, 64), box_mask(64, 64, 0, 64, 0, 32)  # the subject: the left half
    flips = set()
    for seed in range(8):
        _, mask = augment(square, torch.Generator().manual_seed(seed), subject)
        g = torch.Generator().manual_seed(seed)  # replay the draws: jitter (3), flip, scale, top, left
        for _ in range(3):
            torch.rand((), generator=g)
        flip = float(torch.rand((), generator=g)) < 0.5
        side = max(8, round(64 * (0.1 + 0.9 * float(torch.rand((), generator=g)))))
        top, left = (int(torch.randint(0, 64 - side + 1, (), generator=g)) for _ in range(2))
        expected = torch.zeros(64, 64)
        expected[top:top + side, left:left + side] = resized((subject.flip(-1) if flip else subject)[None], side)[0]
        torch.testing.assert_close(mask, expected.clamp(0, 1))
        flips.add(flip)
    assert flips == {True, False}


def test_augment_rejects_non_images():
    with pytest.raises(ValueError, match="height, width"):
        as_rgb(torch.rand(3, 4))


def test_masked_mse_ignores_outside():
    pred, target = torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2)
    pred[..., 1, :] = 5
    mask = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    assert masked_mse(pred, target, mask).item() == pytest.approx(1.0)


def _fake_host(scale=1.0):
    target = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    samples = [(torch.zeros(1, 4, 4, 4), torch.ones(1, 1, 4, 4))]

    def encode_kv(index, k, v):
        return k.view(1, 1, -1), v.view(1, 1, -1)

    def denoise(latent, noise, t, k_ctx, v_ctx, index):
        eps = noise + scale * (k_ctx.sum() + v_ctx.sum()) * target
        return eps, (k_ctx ** 2).mean()

    return samples, encode_kv, denoise


def test_loop_is_deterministic_and_lowers_the_loss():
    samples, encode_kv, denoise = _fake_host()
    cls = torch.randn(768, generator=torch.Generator().manual_seed(1)) * 0.02
    settings = TrainSettings(steps=60, seed=4, resolution=64)
    a = train_tokens(settings, cls, samples, encode_kv, denoise)
    b = train_tokens(settings, cls, samples, encode_kv, denoise)
    assert torch.equal(a.k_tokens, b.k_tokens) and a.losses == b.losses
    assert sum(a.losses[-10:]) < sum(a.losses[:10])


def test_non_finite_loss_stops_with_advice():
    samples, encode_kv, _ = _fake_host()
    nan = lambda latent, noise, t, k, v, index: (noise + k.sum() * float("nan"), torch.zeros(()))
    with pytest.raises(TrainingDiverged, match="Lower the learning rate"):
        train_tokens(TrainSettings(steps=3, resolution=64), torch.zeros(768), samples, encode_kv, nan)


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "steps"), ({"learning_rate": -1.0}, "learning rate"), ({"learning_rate": float("nan")}, "learning rate"),
    ({"attention_weight": -0.1}, "attention-loss weight"), ({"resolution": 500}, "multiple of 64"),
    ({"stage_count": 3}, "1, 5 or 10"), ({"attention_option": "x"}, "attention-loss option"),
])
def test_settings_reject_invalid_numbers(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainSettings(**kwargs)


def test_one_adam_step_moves_a_token_by_at_most_lr_times_its_size_per_dimension():
    """The mapper's residual is scaled so that Adam's first step (every weight by exactly lr) moves each output
    dimension by at most ~0.8 * lr * |class embedding| (independent bound: lr * sum|LayerNorm(h)| / C <= lr)."""
    cls = torch.randn(768, generator=torch.Generator().manual_seed(2)) * 0.03
    mapper = TokenMapper(cls, 5)
    optimizer = torch.optim.Adam(mapper.parameters(), lr=0.005)
    k, v = mapper()
    (k.sum() - v.pow(2).sum()).backward()
    optimizer.step()
    with torch.no_grad():
        k, v = mapper()
    moved = (torch.cat([k, v]) - cls).abs().max()
    assert 0 < moved <= 0.005 * cls.norm() * 1.01


def test_sdxl_mapper_starts_at_the_class_word_in_both_encoders_and_moves_each_part_by_its_own_size():
    """SDXL: CLIP-L's 768 then bigG's 1280 side by side, of different sizes (bigG's word embeddings are smaller).
    Adam's first step moves each part by at most lr times its own class embedding's size, per dimension."""
    g = torch.Generator().manual_seed(3)
    l_part, g_part = torch.randn(768, generator=g) * 0.03, torch.randn(1280, generator=g) * 0.005
    cls = torch.cat([l_part, g_part])
    mapper = TokenMapper(cls, 5, widths=(768, 1280))
    k, v = mapper()
    assert k.shape == (5, 2048) and torch.equal(k, cls.expand_as(k)) and torch.equal(v, cls.expand_as(v))
    optimizer = torch.optim.Adam(mapper.parameters(), lr=0.005)
    (k.sum() - v.pow(2).sum()).backward()
    optimizer.step()
    with torch.no_grad():
        moved = (torch.cat(mapper()) - cls).abs()
    for part, size in ((moved[:, :768], l_part.norm()), (moved[:, 768:], g_part.norm())):
        assert 0 < part.max() <= 0.005 * size * 1.01
    assert moved[:, 768:].max() < 0.5 * moved[:, :768].max()  # the smaller part moves less: scaled by its own size


def test_widths_that_do_not_add_up_to_the_embedding_are_refused():
    with pytest.raises(ValueError, match=r"token widths \(768, 1024\) do not add up to the class embedding's 2048"):
        TokenMapper(torch.zeros(2048), 5, widths=(768, 1024))


def _pushing_host():
    """A fake host whose loss keeps falling as the tokens grow: Adam pushes them without limit."""
    samples = [(torch.zeros(1, 4, 4, 4), torch.ones(1, 1, 4, 4))]

    def encode_kv(index, k, v):
        return k.view(1, 1, -1), v.view(1, 1, -1)

    def denoise(latent, noise, t, k_ctx, v_ctx, index):
        return noise + 1 / (1 + k_ctx.norm() + v_ctx.norm()), torch.zeros(())

    return samples, encode_kv, denoise


def test_tokens_that_blow_up_stop_the_run_with_advice():
    samples, encode_kv, denoise = _pushing_host()
    cls = torch.randn(768, generator=torch.Generator().manual_seed(1)) * 0.036
    with pytest.raises(TrainingDiverged, match=r"tokens grew to a size of .* Lower the learning rate \(now 0.1\), "
                                               r"e.g. to 0.02; nothing was saved"):
        train_tokens(TrainSettings(steps=400, learning_rate=0.1, resolution=64), cls, samples, encode_kv, denoise)


def test_losses_are_read_back_every_n_steps_not_every_step():
    samples, encode_kv, denoise = _fake_host()
    seen = []
    train_tokens(TrainSettings(steps=12, resolution=64), torch.zeros(768) + 0.02, samples, encode_kv, denoise,
                 on_step=lambda step, losses: seen.append(len(losses)), readback_every=5)
    assert seen == [0, 0, 0, 0, 5, 5, 5, 5, 5, 10, 10, 12]


# -- continuing a run -------------------------------------------------------------------------------------------------

def _two_view_host():
    """The fake host with two views, so that the step generator's draws (view, timestep, template, noise) all matter."""
    samples, encode_kv, denoise = _fake_host()
    samples = samples + [(torch.ones(1, 4, 4, 4), torch.ones(1, 1, 4, 4))]
    return samples, encode_kv, denoise


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # fp16: the loss scaler's state goes along too
def test_continuing_from_a_saved_state_ends_exactly_where_one_run_ends(tmp_path, dtype):
    from sefi_core.train_state import load_train_state, save_train_state
    samples, encode_kv, denoise = _two_view_host()
    cls = torch.randn(768, generator=torch.Generator().manual_seed(1)) * 0.02
    run = lambda steps, resume=None: train_tokens(TrainSettings(steps=steps, seed=3, resolution=64), cls, samples,
                                                  encode_kv, denoise, compute_dtype=dtype, readback_every=4,
                                                  resume=resume)
    whole, first = run(10), run(4)
    path = save_train_state(first.state, str(tmp_path / "state.safetensors"))
    rest = run(10, load_train_state(path, ADVICE))
    assert torch.equal(rest.k_tokens, whole.k_tokens) and torch.equal(rest.v_tokens, whole.v_tokens)
    assert rest.losses == whole.losses and len(rest.losses) == 10
    assert rest.state.scaler == whole.state.scaler and bool(whole.state.scaler) == (dtype == torch.float16)
    assert all(torch.equal(a, b) for a, b in zip(rest.state.generator, whole.state.generator))
    # Without Adam's moments (or the generator's position) the run goes elsewhere: the test can tell.
    blank = load_train_state(path, ADVICE)
    blank.adam = [{k: torch.zeros_like(v) for k, v in m.items()} for m in blank.adam]
    assert not torch.equal(run(10, blank).k_tokens, whole.k_tokens)
    moved = load_train_state(path, ADVICE)
    moved.generator = run(5).state.generator
    assert not torch.equal(run(10, moved).k_tokens, whole.k_tokens)


def test_a_state_continues_only_with_its_own_settings_and_more_steps(tmp_path):
    samples, encode_kv, denoise = _two_view_host()
    state = train_tokens(TrainSettings(steps=3, resolution=64), torch.zeros(768) + 0.02, samples, encode_kv,
                         denoise).state
    for settings in (TrainSettings(steps=6, learning_rate=0.001, resolution=64), TrainSettings(steps=3, resolution=64)):
        with pytest.raises(ValueError, match="cannot continue a run"):
            train_tokens(settings, torch.zeros(768) + 0.02, samples, encode_kv, denoise, resume=state)


def test_a_damaged_or_foreign_state_file_is_refused_with_what_to_do(tmp_path):
    from safetensors.torch import save_file
    from sefi_core.train_state import TrainStateError, load_train_state, save_train_state
    samples, encode_kv, denoise = _two_view_host()
    state = train_tokens(TrainSettings(steps=2, resolution=64), torch.zeros(768) + 0.02, samples, encode_kv,
                         denoise).state
    path = save_train_state(state, str(tmp_path / "good.safetensors"))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(open(path, "rb").read()[:5000])
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    for bad, message in [(truncated, "truncated.safetensors is not a readable .safetensors file"),
                         (foreign, "foreign.safetensors is a .safetensors file but not a training state of this pack"),
                         (tmp_path / "missing.safetensors", "missing.safetensors does not exist")]:
        with pytest.raises(TrainStateError, match=message + ".*train the identity anew"):
            load_train_state(str(bad), ADVICE)
