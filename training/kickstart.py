"""Kick-start PPO from a teacher: behaviour cloning on the teacher's own rollouts.

PPO from a uniform (or merely biased) start spends most of a short budget relearning
what a hand-written controller already does: move the batch limits up while batches meet
the latency objective and down when they miss. So before PPO runs, the teacher (AIMD in
the agent's own action space, `agents.aimd.AIMDTeacher`) drives the training
environments for a few thousand steps; the actor is fitted to its actions (cross-entropy
under the same masks PPO uses) and the critic to the discounted normalised returns it
earned. PPO then starts as the teacher and learns where to depart from it, as
kickstarting (Schmitt et al., 2018) and DQfD-style pre-training do.

The teacher may be privileged: `ProfileTeachers` gives each profile of the card its own
teacher (AIMD over that profile's best-static knobs), which it knows from the episode's
scenario. The student sees only the observation: it tells the profiles apart by the card
features (`engine/card.py`, a reference decode step per kernel timed when the engine
starts), as a policy on a real card must.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np


class ProfileTeachers:
    """One teacher per calibration profile, chosen by each episode's (privileged) profile."""

    def __init__(self, teachers: dict[str, Any]) -> None:
        if not teachers:
            raise ValueError("at least one teacher")
        self.teachers = teachers

    def act(self, obs: np.ndarray, profiles: list[str], masks: np.ndarray) -> np.ndarray:
        return np.stack([self.teachers[p].act(o, m) for o, p, m in zip(obs, profiles, masks, strict=True)])


def collect(venv: Any, teacher: Any, steps: int) -> dict[str, np.ndarray]:
    """Roll the teacher out in the (VecNormalize-wrapped) training envs for `steps` env steps
    in all; return raw observations, actions, masks, raw rewards, episode ends and each
    step's profiles (a `ProfileTeachers` is told them)."""
    from sb3_contrib.common.maskable.utils import get_action_masks

    n = venv.num_envs
    venv.reset()
    obs, acts, masks, rews, dones, profiles = [], [], [], [], [], []
    for _ in range(max(1, steps // n)):
        raw = venv.get_original_obs()
        mask = get_action_masks(venv)
        profiles.append([sc.profile for sc in venv.get_attr("scenario")])
        action = (
            teacher.act(raw, profiles[-1], mask) if isinstance(teacher, ProfileTeachers) else teacher.act(raw, mask)
        )
        _, _, done, _ = venv.step(action)
        obs.append(raw)
        acts.append(action)
        masks.append(mask)
        rews.append(venv.get_original_reward())
        dones.append(done)
    return {
        k: np.stack(v)
        for k, v in {
            "obs": obs,
            "actions": acts,
            "masks": masks,
            "rewards": rews,
            "dones": dones,
            "profiles": profiles,
        }.items()
    }


def discounted_returns(rewards: np.ndarray, dones: np.ndarray, gamma: float) -> np.ndarray:
    """Per-env discounted returns `[T, n]`, cut at episode ends (and at the data's end)."""
    out = np.zeros_like(rewards, dtype=np.float64)
    running = np.zeros(rewards.shape[1])
    for t in range(len(rewards) - 1, -1, -1):
        running = rewards[t] + gamma * running * (1.0 - dones[t])
        out[t] = running
    return out


def kickstart(
    model: Any,
    venv: Any,
    teacher: Any,
    steps: int = 32768,
    epochs: int = 10,
    batch_size: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
) -> dict[str, float]:
    """Fit `model`'s actor to the teacher's actions and its critic to the returns; returns
    the final cross-entropy and the share of the teacher's actions the actor now picks."""
    import torch as th

    data = collect(venv, teacher, steps)
    T, n = data["rewards"].shape
    obs = venv.normalize_obs(data["obs"].reshape(T * n, -1)).astype(np.float32)
    returns = discounted_returns(venv.normalize_reward(data["rewards"]), data["dones"], model.gamma)
    x = th.as_tensor(obs)
    a = th.as_tensor(data["actions"].reshape(T * n, -1))
    m = th.as_tensor(data["masks"].reshape(T * n, -1))
    v = th.as_tensor(returns.reshape(-1), dtype=th.float32)
    policy = model.policy
    opt = th.optim.Adam(policy.parameters(), lr=lr)
    gen = th.Generator().manual_seed(seed)
    policy.set_training_mode(True)
    for _ in range(epochs):
        for idx in th.randperm(len(x), generator=gen).split(batch_size):
            values, log_prob, _ = policy.evaluate_actions(x[idx], a[idx], action_masks=m[idx])
            loss = -log_prob.mean() + 0.5 * th.nn.functional.mse_loss(values.flatten(), v[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    policy.set_training_mode(False)
    with th.no_grad():
        _, log_prob, _ = policy.evaluate_actions(x, a, action_masks=m)
        picked = policy.get_distribution(x, action_masks=m.numpy()).mode()
    stats = {
        "steps": float(T * n),
        "cross_entropy": float(-log_prob.mean()),
        "agreement": float((picked == a).all(dim=1).float().mean()),
    }
    print(
        f"kick-start: {T * n} teacher steps; the actor now picks the teacher's action on "
        f"{stats['agreement']:.1%} of them (cross-entropy {stats['cross_entropy']:.3f})",
        file=sys.stderr,
    )
    return stats
