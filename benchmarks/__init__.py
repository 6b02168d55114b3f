"""Benchmarks of the MoE op, the engine and the service (run as scripts: `python benchmarks/bench_moe.py`), and the
MoE problems they share with the tests (`benchmarks.moe_cases`). Installed with the project, so a script imports
its siblings as `benchmarks.*` from any working directory."""
