"""A training run's state, kept beside its identity so that training can continue where it stopped.

What step N+1 needs beyond the identity's ten tokens: the token mapper's weights (the tokens are its output, not its
parameters), Adam's moments and step count, the step generator's position, the fp16 loss scale, and the losses so far
(for the loss curve). With them, 500 steps and then 500 more end exactly where 1000 steps end for the same seed.
About 120 MB (the mapper's 10M fp32 weights and Adam's two moments of each), so it lives in its own file and folder:
the identity file stays ~30 KB and is all that applying or sharing an identity needs.
PVA's encoder training keeps its run in the same format: its weights are the encoder's, the visual projections', the
word's and (stage 2) the face recognizer's.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import torch

from .files import format_metadata, read_versioned, save_atomically

FORMAT_NAME = "sefi-training-state"
FORMAT_VERSION = 1
ADAM_KEYS = ("step", "exp_avg", "exp_avg_sq")


class TrainStateError(ValueError):
    """A training state that cannot be continued from; the message says why and what to do."""


def tokens_digest(k_tokens: torch.Tensor, v_tokens: torch.Tensor) -> str:
    """Ties a state to the identity it produced: a replaced identity file no longer matches its old state."""
    data = torch.cat([k_tokens, v_tokens]).detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:32]


def photos_digest(photos, masks=None) -> str:
    """Which photos (and subject masks) a run learned from, to tell a continuation on other photos."""
    digest = hashlib.sha256()
    for tensor in [*photos, *(masks or [])]:
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


@dataclass
class TrainState:
    steps_done: int
    settings: dict  # TrainSettings.as_metadata() of the run so far (its `steps` is steps_done)
    weights: dict[str, torch.Tensor]  # what the run trains, by name: SeFi's TokenMapper.state_dict(), PVA's networks
    adam: list[dict[str, torch.Tensor]]  # Adam's (or AdamW's) state of each trained parameter, in parameter order
    generator: torch.Tensor  # the step generator's state (uint8)
    scaler: dict = field(default_factory=dict)  # GradScaler.state_dict(); empty where loss scaling was off
    losses: list[float] = field(default_factory=list)
    tokens: str = ""  # tokens_digest of the identity this run saved
    photos: str = ""  # photos_digest of what it learned from


def save_train_state(state: TrainState, path: str) -> str:
    tensors = {f"mapper.{name}": value for name, value in state.weights.items()}  # "mapper.": format 1's prefix
    for index, moments in enumerate(state.adam):
        tensors.update({f"adam.{index}.{key}": moments[key] for key in ADAM_KEYS})
        tensors[f"adam.{index}.step"] = torch.as_tensor(moments["step"]).reshape(1)  # safetensors has no 0-d
    tensors["generator"] = state.generator
    tensors["losses"] = torch.tensor(state.losses, dtype=torch.float32)
    metadata = {**format_metadata(FORMAT_NAME, FORMAT_VERSION), "sefi.steps_done": str(state.steps_done),
                "sefi.settings": json.dumps(state.settings, sort_keys=True),
                "sefi.scaler": json.dumps(state.scaler, sort_keys=True), "sefi.tokens": state.tokens,
                "sefi.photos": state.photos}
    return save_atomically(tensors, metadata, path)


def load_train_state(path: str, advice: str) -> TrainState:
    """The state in `path`; a missing, damaged or foreign file raises TrainStateError naming it, then `advice` (what
    the node that reads it can do: start its training anew)."""
    _, meta, tensors = read_versioned(path, FORMAT_NAME, FORMAT_VERSION, TrainStateError,
                                      "a training state of this pack", advice, advice)
    name = os.path.basename(path)
    try:
        count = 1 + max((int(k.split(".")[1]) for k in tensors if k.startswith("adam.")), default=-1)
        adam = [{key: tensors[f"adam.{i}.{key}"] for key in ADAM_KEYS} for i in range(count)]
        adam = [{**m, "step": m["step"].reshape(())} for m in adam]
        state = TrainState(
            steps_done=int(meta["sefi.steps_done"]), settings=json.loads(meta["sefi.settings"]),
            weights={k[len("mapper."):]: v for k, v in tensors.items() if k.startswith("mapper.")}, adam=adam,
            generator=tensors["generator"], scaler=json.loads(meta["sefi.scaler"]),
            losses=tensors["losses"].tolist(), tokens=meta["sefi.tokens"], photos=meta.get("sefi.photos", ""))
    except (KeyError, ValueError, TypeError) as e:
        raise TrainStateError(f"{name} is damaged ({type(e).__name__}: {e}). {advice}") from None
    if not (isinstance(state.settings, dict) and state.steps_done == len(state.losses) and state.weights and adam):
        raise TrainStateError(f"{name} is damaged (its steps, losses and weights do not agree). {advice}")
    return state
