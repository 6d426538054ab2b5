"""Known-benign third-party warnings, hidden once for every command (set
``TEMPNET_SHOW_WARNINGS=1`` to see them all). Each pattern is a message megatron-core or torch
prints on every import or step of a CPU / no-Transformer-Engine run, repeated per rank, that
asks nothing of the user."""
from __future__ import annotations

import os
import warnings

BENIGN = (
    (UserWarning, r"Transformer Engine and Apex are not installed"),
    (UserWarning, r"Apex is not installed"),
    (UserWarning, r"full scope is deprecated"),
    (UserWarning, r"When using async grad allreduce it is recommended to set the environment "
                  r"variable CUDA_DEVICE_MAX_CONNECTIONS"),
    (UserWarning, r"The \.grad attribute of a Tensor that is not a leaf Tensor"),
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor"),
    (FutureWarning, r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is "
                    r"deprecated"),
    (FutureWarning, r"`load_state_dict` is deprecated and will be removed"),
)


def hide_benign_warnings(environ=os.environ) -> None:
    if environ.get("TEMPNET_SHOW_WARNINGS", "") not in ("", "0"):
        return
    for category, message in BENIGN:
        warnings.filterwarnings("ignore", message=message, category=category)
