"""Reinforcement learning as a task's building blocks (discrete actions): config sections (``config``),
environments and seeded episode returns (``envs``), actor-critic policies (``policies``), PPO (``ppo``),
ensemble action rules (``ensemble``) and return statistics (``stats``).

Nothing here is registered as a task yet; the modules are imported one by one, so using the statistics or
the config sections does not import gymnasium.
"""
