"""PVA, parallel visual attention (Xu et al., WACV 2024, arXiv 2312.03556), host-free: the attention mechanism, the
identity encoder and the ArcFace face recognizer, their files and the PVA identity's, the encoder's dataset, and both
trainings (the per-person fine-tune and the encoder's). The ComfyUI side is nodes/pva/."""
