"""Benchmarks (not tests): each compares methods side by side in one run and prints a table.

- :mod:`.throughput`: candidates/s of the engine vs plain forward passes of the parent;
- :mod:`.latency`: inference latency of a run's ensemble forms (members looped, vmapped, packed, distilled
  student) as ratios to its parent, interleaved in one process;
- :mod:`.packed`: packed partition ensembles and their students vs their parent over seeds (test NLL and
  accuracy, parameters, latency);
- :mod:`.prune_tune`: Prune-and-Tune ensembles vs matched-budget baselines (PAT Table 1 shape);
- :mod:`.rl`: ensemble policies vs their PPO parent on unseen episodes (MinAtar, ProcGen);
- :mod:`.rl_throughput`: env steps/s of policy evaluation vs the parent's own episodes and EvoTorch.
"""
