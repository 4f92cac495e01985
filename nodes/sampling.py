"""What both systems' Apply nodes add to a MODEL for sampling beside their own patches."""
from __future__ import annotations

import comfy.patcher_extension

MASK_CHECK_KEY = "sefi_ide_inpainting_mask"  # one wrapper per MODEL, whichever Apply node added it


def refuse_empty_inpainting_mask(executor, noise, latent_image, sampler, sigmas, denoise_mask=None, *args, **kwargs):
    """OUTER_SAMPLE wrapper: a latent whose inpainting mask is empty would come back unchanged, silently."""
    if denoise_mask is not None and not bool(denoise_mask.any()):
        raise ValueError("The latent's inpainting mask is empty, so nothing would be repainted and the photo would come "
                         "back unchanged. Paint over the face (right-click Load Image > Open in MaskEditor) or connect a "
                         "mask that covers it, then queue again.")
    return executor(noise, latent_image, sampler, sigmas, denoise_mask, *args, **kwargs)


def check_inpainting_masks(patched) -> None:
    """Adds the empty-mask refusal to a MODEL clone, once."""
    outer = comfy.patcher_extension.WrappersMP.OUTER_SAMPLE
    if not patched.get_wrappers(outer, MASK_CHECK_KEY):
        patched.add_wrapper_with_key(outer, MASK_CHECK_KEY, refuse_empty_inpainting_mask)
