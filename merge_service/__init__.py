"""merge-service: merge fine-tuned models and LoRA adapters with SVD-based methods."""

import os

__version__ = "0.1.0"

# PyTorch puts CPU tensors of 2 MiB and more on transparent huge pages when this is set before
# its first allocation: a streamed merge allocates its model's size several times over, and
# one page fault per 4 KiB page cost more CPU than the arithmetic (Llama-3.2-1B, T = 4, task
# arithmetic: 6.3 M faults, 50 s of system time; 0.36 M and 29 s with it). Set it to 0 to opt out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
