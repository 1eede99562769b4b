"""The trainer, the sampler and what they share. Importing it bounds oneDNN's caches (engine/cpu_caches.py),
which must happen before the process's first bf16 op on the CPU."""
from .cpu_caches import bound_primitive_caches

bound_primitive_caches()
