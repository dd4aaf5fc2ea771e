"""What a checkpoint was trained as: the variant and backbone are saved beside the weights and checked on load.

Training saves ``{"model": network weights, "segreg": ModelInfo.state_dict()}`` (ignite ``CheckpointSaver`` with
both in ``save_dict``); inference runs :func:`check_checkpoint` before loading, so evaluating the ``dice`` variant
with the ``edt`` weights, or a SegReg checkpoint as the baseline, is refused with a message that says what to do.
"""

from __future__ import annotations

import os

import torch

INFO_KEY = "segreg"


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    return network.module if hasattr(network, "module") else network


def backbone_signature(network: torch.nn.Module) -> dict:
    """``{"class": name, "parameters": {name: shape}}`` of a network (DDP/DataParallel unwrapped)."""
    net = _unwrap(network)
    return {
        "class": type(net).__name__,
        "parameters": {k: list(v.shape) for k, v in net.state_dict().items()},
    }


class ModelInfo:
    """Checkpoint metadata with ignite's ``state_dict`` / ``load_state_dict`` protocol.

    Args:
        variant: the bundle variant being trained.
        network: the backbone (its class and parameter shapes are recorded).
        global_region: whether the variant registers one global region (the baseline).
        integration_steps: scaling-and-squaring steps the velocity is integrated with.
        frozen_components: displacement components held at 0 (an in-plane field trains a different network).
    """

    def __init__(
        self,
        variant: str,
        network: torch.nn.Module,
        global_region: bool = False,
        integration_steps: int = 7,
        frozen_components=(),
    ) -> None:
        self.variant, self.network = str(variant), network
        self.global_region, self.integration_steps = bool(global_region), int(integration_steps)
        self.frozen_components = sorted(int(c) for c in (frozen_components or ()))

    def state_dict(self) -> dict:
        return {
            "variant": self.variant,
            "global_region": self.global_region,
            "integration_steps": self.integration_steps,
            "frozen_components": self.frozen_components,
            "backbone": backbone_signature(self.network),
        }

    def load_state_dict(self, state: dict, source: str = "the checkpoint") -> None:
        """Raise ``ValueError`` if ``state`` (from a checkpoint) does not match this configuration."""
        if state.get("variant") != self.variant or bool(state.get("global_region")) != self.global_region:
            raise ValueError(
                f"{source} was trained as variant {state.get('variant')!r} but this run is variant {self.variant!r}. "
                f"Pass --variant {state.get('variant')} or the checkpoint of variant {self.variant!r} (--ckpt_path)."
            )
        if int(state.get("integration_steps", -1)) != self.integration_steps:
            raise ValueError(
                f"{source} integrates the velocity with {state.get('integration_steps')} steps, this run with "
                f"{self.integration_steps}; set --integration_steps {state.get('integration_steps')}."
            )
        if list(state.get("frozen_components", [])) != self.frozen_components:
            raise ValueError(
                f"{source} was trained with frozen_components {state.get('frozen_components', [])} (displacement "
                f"components held at 0), this run uses {self.frozen_components}; set --frozen_components to match."
            )
        ours, theirs = backbone_signature(self.network), state.get("backbone", {})
        if ours != theirs:
            params_a, params_b = ours["parameters"], theirs.get("parameters", {})
            diff = [k for k in sorted(set(params_a) | set(params_b)) if params_a.get(k) != params_b.get(k)][:3]
            details = ", ".join(f"{k}: checkpoint {params_b.get(k)} vs network {params_a.get(k)}" for k in diff)
            raise ValueError(
                f"{source} holds a different backbone ({theirs.get('class')}; {details}). Set network_def "
                "(e.g. network_def#channels) to the settings it was trained with."
            )


def check_checkpoint(path: str | os.PathLike, info: ModelInfo, hint: str = "") -> str:
    """Check that ``path`` exists and was trained as ``info`` describes; returns ``path``.

    Raises ``FileNotFoundError`` (with ``hint``: what to run) for a missing file and ``ValueError`` for a checkpoint
    without SegReg metadata or of another variant/backbone.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {hint or 'train this variant first or set --ckpt_path'}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or INFO_KEY not in ckpt or "model" not in ckpt:
        raise ValueError(
            f"{path} is not a SegReg checkpoint (no '{INFO_KEY}' and 'model' entries); it cannot be checked against "
            f"variant {info.variant!r}. Retrain with this version's train.json."
        )
    info.load_state_dict(ckpt[INFO_KEY], source=str(path))
    return str(path)
