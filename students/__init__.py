"""Student training: losses, the trainer (plain PyTorch or DeepSpeed backends), evaluation.

Importing the package registers its entries: KD losses and trainer backends (`deepspeed`
itself loads lazily, at its seam).
"""
from students import backends, deepspeed_backend, losses  # noqa: F401  (register entries)
