"""Drop two known, harmless log records that importing transformers' quantizer registry produces.

`serialization` registers our method with transformers' quantizer registry, which imports torchao. torchao logs
a warning for each optional CUDA extension it cannot load (expected on CPU machines), and torch's pytree warns
about the enums torchao registers. Both are noise for our users; only exactly those records are filtered.
"""

import logging

logging.getLogger("torchao").addFilter(lambda r: not r.getMessage().startswith("Failed to load"))
logging.getLogger("torch.utils._pytree").addFilter(lambda r: "is an Enum subclass" not in r.getMessage())
