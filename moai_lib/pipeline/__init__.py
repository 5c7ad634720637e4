"""The pipeline: tokenize → pretrain → QAT → quantize → evaluate → report → export, as library functions.

`params.py` parses params.yaml (`PipelineParams`); `stages.py` runs one stage (`run_stage`). DVC (`dvc.yaml`,
`moai stage ...`) and Metaflow (`flows/`) are thin drivers over these.
"""

from .errors import PipelineError
from .params import PipelineParams

__all__ = ["PipelineError", "PipelineParams"]
