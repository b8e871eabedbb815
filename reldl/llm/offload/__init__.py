"""Offloading (issue 8, FlexGen + Fuyou): placement policies over GPU / CPU / disk and their cost model.

Pure Python + numpy at import (torch only inside the `measure_*` hooks).
"""

from reldl.llm.offload.policy import (
    COMPRESSED_BYTES,
    Estimate,
    Hardware,
    ModelShape,
    Policy,
    estimate,
    memory,
    search_policy,
)

__all__ = [
    "COMPRESSED_BYTES",
    "Estimate",
    "Hardware",
    "ModelShape",
    "Policy",
    "estimate",
    "memory",
    "search_policy",
]
