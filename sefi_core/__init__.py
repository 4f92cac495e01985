"""SeFi-IDE core: plain torch, no ComfyUI. Identity format, stage schedule, K/V context selection,
token mapper, losses and the training loop."""
