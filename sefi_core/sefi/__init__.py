"""SeFi-IDE (stage-aware K/V token identities), host-free: the identity and its file, the timestep stages, the token
mapper, prompt variants and K/V selection, the context that carries an identity through conditioning nodes, the
losses, augmentation, attention maps and the training loop. The ComfyUI side is nodes/sefi/."""
