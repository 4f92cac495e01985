"""PVA, parallel visual attention (Xu et al., WACV 2024, arXiv 2312.03556), host-free: the attention mechanism, and
(to come) the identity encoder and the face recognizer. The ComfyUI side is in nodes/."""
