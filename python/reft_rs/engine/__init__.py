"""CPU inference in Rust, without torch: Hugging Face folders and GGUF files,
with interventions and many adapters.

    engine      :class:`Engine`: load, generate, stream, score
    scheduler   :class:`Scheduler`: continuous batching of requests over one Engine
    sampling    :class:`SamplingParams`: the one sampling-settings type, read by
                the Rust engine as it is
"""

from .engine import Engine, kernel_isa, read_gguf_tensor
from .sampling import SamplingParams
from .scheduler import Scheduler

__all__ = ["Engine", "SamplingParams", "Scheduler", "kernel_isa", "read_gguf_tensor"]
