"""Test-wide settings."""

import torch

# One torch thread: the suite's models are tiny, and on a shared 2-core machine more threads than
# free cores slow torch down many times over (Ray's client actors set their own count).
torch.set_num_threads(1)
