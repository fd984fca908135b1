"""Gymnasium environments over the engine's knobs."""

from __future__ import annotations

ENV_ID = "autoopt/InferenceTuning-v0"


def register_envs() -> None:
    """Register the environment ids with gymnasium (idempotent)."""
    from gymnasium.envs.registration import register, registry

    if ENV_ID not in registry:
        register(id=ENV_ID, entry_point="autoopt.envs.inference_tuning:InferenceTuningEnv")


register_envs()
