"""SeFi Attention Map Preview against the real host, and its layout."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sefi_testkit import probe
from sefi_core.sefi.attention_maps import COLOUR_BAR_HEIGHT, LABEL_HEIGHT, _heat, grid_shape, prompt_words, render_grid

FULL = "full latent (64x64 at 512 px)"


def small_image(host, size=64):
    image = host.nodes.LoadImage().load_image("astronaut.png")[0]
    return F.interpolate(image.movedim(-1, 1), size=(size, size), mode="bilinear").movedim(1, -1)


def preview(host, model, clip, vae, prompt, words="", layers=FULL, image=None):
    with torch.inference_mode():
        return host.node("SefiAttentionMapPreview").execute(
            model=model, clip=clip, prompt=prompt, words=words, at_percent=0.5, layers=layers, seed=0,
            image=image if image is not None else small_image(host), vae=vae).result


def record_projection_inputs(model):
    """Forward hooks on every attn2's to_q and to_k: (attn2 module, query input, key input) per call."""
    records, handles = [], []
    for name, attn in model.model.named_modules():
        if name.endswith("attn2"):
            handles.append(attn.to_q.register_forward_hook(
                lambda m, args, out, attn=attn: records.append({"module": attn, "x": args[0].detach().clone()})))
            handles.append(attn.to_k.register_forward_hook(
                lambda m, args, out: records[-1].update(context=args[0].detach().clone())))
    return records, handles


HALF = "1/2 latent (32x32 at 512 px, the paper's)"


@pytest.mark.parametrize("preset, layers, count", [
    ("tiny", FULL, 4),  # every cross-attention layer of the tiny model
    ("tiny_sdxl", HALF, 4),  # SDXL has none at the latent's own size; at half of it, input_blocks.4-5's four
], ids=["sd1", "sdxl"])
def test_maps_equal_an_independent_softmax_qk_computation(host, preset, layers, count):
    model, clip, vae = host.load_checkpoint(host.checkpoint(preset))
    prompt = "a photo of a cat holding a cup"
    records, handles = record_projection_inputs(model)
    try:
        picture, masks = preview(host, model, clip, vae, prompt, words="cat, cup", layers=layers)
    finally:
        for h in handles:
            h.remove()
    chunk = clip.tokenize(prompt)["l"][0]
    ids = [t for t, *_ in chunk]
    positions = [ids.index(clip.tokenize(w)["l"][0][1][0]) for w in ("cat", "cup")]
    side = 64 // 8 // (2 if layers == HALF else 1)
    records = [rec for rec in records if rec["x"].shape[1] == side * side]  # the layers of the chosen grid
    per_layer = []
    for rec in records:
        attn = rec["module"]
        q = F.linear(rec["x"][:1].float(), attn.to_q.weight.float())
        k = F.linear(rec["context"][:1].float(), attn.to_k.weight.float())
        qh = q.view(1, q.shape[1], attn.heads, -1).transpose(1, 2)
        kh = k.view(1, k.shape[1], attn.heads, -1).transpose(1, 2)
        probs = torch.softmax(qh @ kh.transpose(-1, -2) / qh.shape[-1] ** 0.5, -1).mean(1)[0]  # (N, T)
        side = int(probs.shape[0] ** 0.5)
        grids = probs[:, positions].T.reshape(2, 1, side, side)
        per_layer.append(F.interpolate(grids, size=(64, 64), mode="bilinear", align_corners=False)[:, 0])
    expected = torch.stack(per_layer).mean(0)
    expected = expected / expected.max()
    assert len(records) == count
    assert masks.shape == (2, 64, 64)
    torch.testing.assert_close(masks, expected, rtol=1e-3, atol=1e-4)
    assert picture.shape == (1, 256 + LABEL_HEIGHT + COLOUR_BAR_HEIGHT, 512, 3)


@pytest.mark.parametrize("count", [1, 3, 12])
def test_layout_has_one_labelled_tile_per_word(host, count):
    model, clip, vae = host.load_checkpoint("tiny.safetensors")
    vocabulary = ["cat", "dog", "car", "tree", "house", "river", "sun", "moon", "chair", "table", "lamp", "boat"]
    prompt = " ".join(vocabulary[:count])
    picture, masks = preview(host, model, clip, vae, prompt)
    rows, columns = grid_shape(count)
    assert (rows, columns) == {1: (1, 1), 3: (1, 3), 12: (3, 4)}[count]
    assert masks.shape[0] == count
    assert picture.shape == (1, rows * (256 + LABEL_HEIGHT) + COLOUR_BAR_HEIGHT, max(columns, 2) * 256, 3)
    image = picture[0].numpy()
    for i in range(count):
        r, c = divmod(i, columns)
        top = r * (256 + LABEL_HEIGHT)
        label_bar = image[top:top + LABEL_HEIGHT, c * 256:(c + 1) * 256]
        assert (label_bar < 0.5).any(), f"no label drawn for word {i}"


def test_labels_name_the_words_in_order():
    maps = np.zeros((3, 8, 8), dtype=np.float32)
    drawn = render_grid(np.ones((8, 8, 3), dtype=np.float32), maps, ["cat", "cup (x2)", "sks"])
    blank = render_grid(np.ones((8, 8, 3), dtype=np.float32), maps, ["", "", ""])
    changed = [(drawn[:LABEL_HEIGHT, c * 256:(c + 1) * 256] != blank[:LABEL_HEIGHT, c * 256:(c + 1) * 256]).sum()
               for c in range(3)]
    assert all(n > 0 for n in changed) and changed[1] > changed[0]  # a longer label covers more pixels


def test_labels_are_large_enough_to_read_and_the_colour_bar_shows_the_scale():
    picture = render_grid(np.ones((8, 8, 3), dtype=np.float32), np.zeros((3, 8, 8), dtype=np.float32), ["sks", "cup", "latte"])
    ink_rows = np.nonzero((picture[:LABEL_HEIGHT, :256] < 0.5).any(axis=(1, 2)))[0]
    assert ink_rows.max() - ink_rows.min() >= 18  # the letters of 'sks' are ~20 px tall (the old labels were ~8)
    bar_row = picture[-COLOUR_BAR_HEIGHT + 16, 24:-24]  # the ramp, left (0) to right (1)
    np.testing.assert_allclose(bar_row[0], _heat(np.array(0.0)), atol=2 / 255)
    np.testing.assert_allclose(bar_row[-1], _heat(np.array(1.0)), atol=2 / 255)
    brightness = bar_row.sum(axis=1)
    assert (np.diff(brightness) >= -2 / 255).all()  # the heat colours brighten from 0 to 1


def test_absent_repeated_and_trigger_words(host):
    model, clip, vae = host.load_checkpoint("tiny.safetensors")
    with pytest.raises(ValueError, match="'teapot' not in the prompt. Words in it: a, cup"):
        preview(host, model, clip, vae, "a cup", words="teapot")
    picture, masks = preview(host, model, clip, vae, "a cup, a red cup", words="cup")
    assert masks.shape[0] == 1
    ident = probe.word_identity(clip, ["cat"] * 5, ["dog"] * 5)
    patched_model, patched_clip = probe.apply(host, model, clip, ident)
    _, with_id = preview(host, patched_model, patched_clip, vae, "a photo of sks with a cup", words="sks, cup")
    _, plain = preview(host, model, clip, vae, "a photo of sks with a cup", words="sks, cup")
    assert with_id.shape == plain.shape == (2, 64, 64)
    assert not torch.allclose(with_id, plain)  # the identity changed where the words attend


def test_prompt_words():
    assert prompt_words("(sks:1.2) enjoying a cup, a CUP of latte!") == ["sks", "enjoying", "a", "cup", "of", "latte"]


def test_needs_an_image_with_vae_or_a_latent(host):
    model, clip, _ = host.load_checkpoint("tiny.safetensors")
    with pytest.raises(ValueError, match="image together with its VAE, or a latent"):
        with torch.inference_mode():
            host.node("SefiAttentionMapPreview").execute(model=model, clip=clip, prompt="a cat", words="", at_percent=0.5,
                                                         layers=FULL, seed=0, image=small_image(host))


def test_the_preview_attends_through_the_hosts_attention_wrapper(host):
    """Another pack's attention override (transformer_options['optimized_attention_override'], read by the host's
    @wrap_attn) still sees the cross-attention calls the preview's recorder makes, with the layer's precision."""
    model, clip, vae = host.load_checkpoint("tiny.safetensors")
    seen = []

    def override(attention, q, k, v, heads, *args, **kwargs):
        seen.append((k.shape[1], "attn_precision" in kwargs))
        return attention(q, k, v, heads, *args, **kwargs)

    overridden = model.clone()
    overridden.model_options["transformer_options"]["optimized_attention_override"] = override
    preview(host, overridden, clip, vae, "a photo of a cat", words="cat")
    cross = [precision for tokens, precision in seen if tokens == 77]
    assert cross and all(cross)
