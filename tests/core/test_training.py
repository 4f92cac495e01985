"""What both systems' trainings share (host-free)."""
import torch

from sefi_core.training import INITIAL_LOSS_SCALE, loss_scaler


def test_loss_scaling_only_for_fp16():
    assert loss_scaler("cpu", torch.float16).is_enabled() and loss_scaler("cpu", torch.float16).get_scale() == INITIAL_LOSS_SCALE
    assert not loss_scaler("cpu", torch.bfloat16).is_enabled() and not loss_scaler("cpu", torch.float32).is_enabled()
