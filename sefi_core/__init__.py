"""The core of the whole pack, both systems: plain torch (with safetensors, numpy and pillow), no ComfyUI.

The top level is what SeFi and PVA share: the pack's file format (files.py), the names an artist types (names.py),
trigger words in tokenized prompts (tokens.py), photos (images.py), loss scaling and optimiser state (training.py),
training states (train_state.py) and pictures (plot.py). `sefi/` is SeFi-IDE (identities of per-stage K/V tokens),
`pva/` is PVA (parallel visual attention); neither imports the other. The ComfyUI side is nodes/, in the same shape.
"""
