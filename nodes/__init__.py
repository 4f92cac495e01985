"""The ComfyUI side of the pack: the only package that imports the host.

Its top level is what both systems' nodes share (models folders, checks, photos, CLIP tokens, node UI, output files,
the loader skeleton, sampling and training through the host); `sefi/` holds SeFi-IDE's nodes, `pva/` PVA's. The wings
never import each other, and the shared modules import neither (tests/test_layout.py). The pack's __init__.py
registers both wings' nodes.
"""
