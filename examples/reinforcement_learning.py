"""The reinforcement-learning program of the Ray paper (Moritz et al., OSDI 2018, Fig. 3).

A policy is a small linear controller; `Simulator` actors run rollouts of it in a toy
environment; `update_policy` is a task that combines the rollouts into a better policy
(a random-search step). Runs unchanged with `import ray`.

    python examples/reinforcement_learning.py
    mpirun -n 4 python -m hpcray examples/reinforcement_learning.py   # many nodes
"""

import numpy as np

import hpcray as ray

OBSERVATION_SIZE = 8
ROLLOUT_STEPS = 200


def environment_step(state, action, rng):
    """A noisy linear system; the reward is higher the closer the state stays to zero."""
    state = 0.9 * state + 0.1 * action + 0.01 * rng.standard_normal(state.shape)
    return state, -float(np.sum(state ** 2))


@ray.remote
def create_policy(seed=0):
    rng = np.random.default_rng(seed)
    return {"weights": rng.standard_normal((OBSERVATION_SIZE, OBSERVATION_SIZE)) * 0.5,
            "iteration": 0}


@ray.remote
class Simulator:
    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def rollout(self, policy, noise_scale=0.05):
        """Run the policy perturbed by fresh noise; return the noise and the total reward."""
        noise = self.rng.standard_normal(policy["weights"].shape) * noise_scale
        weights = policy["weights"] + noise
        state = self.rng.standard_normal(OBSERVATION_SIZE)
        total_reward = 0.0
        for _ in range(ROLLOUT_STEPS):
            state, reward = environment_step(state, -weights @ state, self.rng)
            total_reward += reward
        return {"noise": noise, "reward": total_reward}


@ray.remote
def update_policy(policy, *rollouts, learning_rate=0.5):
    rewards = np.array([r["reward"] for r in rollouts])
    advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-8)
    step = sum(a * r["noise"] for a, r in zip(advantages, rollouts)) / len(rollouts)
    return {"weights": policy["weights"] + learning_rate * step,
            "iteration": policy["iteration"] + 1}


def mean_reward(policy_ref, simulators):
    rollouts = ray.get([s.rollout.remote(policy_ref, 0.0) for s in simulators])
    return float(np.mean([r["reward"] for r in rollouts]))


def train(num_simulators=4, iterations=20):
    simulators = [Simulator.remote(seed) for seed in range(num_simulators)]
    policy = create_policy.remote()
    start = mean_reward(policy, simulators)
    for _ in range(iterations):
        rollouts = [s.rollout.remote(policy) for s in simulators for _ in range(2)]
        policy = update_policy.remote(policy, *rollouts)
    end = mean_reward(policy, simulators)
    return start, end, ray.get(policy)["iteration"]


if __name__ == "__main__":
    ray.init()
    start, end, iterations = train()
    print(f"mean reward over {iterations} iterations: {start:.2f} -> {end:.2f}")
    ray.shutdown()
