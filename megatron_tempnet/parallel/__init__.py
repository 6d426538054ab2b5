"""Distributed runtime: launcher detection, process groups, seeding, CPU compatibility."""
from megatron_tempnet.parallel.runtime import (LaunchEnv, ParallelContext, detect_launch_env,
                                               initialize, set_seed, shutdown, slurm_first_host,
                                               validate_layout)

__all__ = ["LaunchEnv", "ParallelContext", "detect_launch_env", "initialize", "set_seed",
           "shutdown", "slurm_first_host", "validate_layout"]
