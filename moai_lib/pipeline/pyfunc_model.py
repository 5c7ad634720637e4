"""MLflow "model from code": text generation with an exported MOAI model (what `registry.py` registers).

MLflow copies this file into each model version and runs it at load time; `set_model` at the bottom names the
model. The exported HF directory is the artifact "model" (weights as artifacts, no pickled torch module), and
`moai_lib` travels with the model as a code path, so loading needs no `trust_remote_code`:

    model = mlflow.pyfunc.load_model("models:/moai-mamba@champion")
    model.predict(pd.DataFrame({"prompt": ["Once upon a time"]}), params={"max_new_tokens": 16})
    # → DataFrame with a "completion" column (the generated text only)

Input: a DataFrame with a `prompt` column (or its first column), a list of strings, or one string.
Params: max_new_tokens (default: the model config's, 32), do_sample (False: greedy), temperature, top_k, top_p.
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

GENERATION_DEFAULTS = {"max_new_tokens": 32, "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0}


def _prompts(model_input) -> list[str]:
    if isinstance(model_input, pd.DataFrame):
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return [str(x) for x in model_input[column].tolist()]
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, dict):
        value = model_input.get("prompt", next(iter(model_input.values())))
        return [value] if isinstance(value, str) else [str(x) for x in value]
    return [str(x) for x in model_input]


class MoaiTextGenerator(PythonModel):
    """Greedy (or sampled) continuation of prompts by a MOAI causal LM loaded from the "model" artifact."""

    def load_context(self, context) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import moai_lib  # noqa: F401  registers the moai model types and quantization method with transformers

        path = context.artifacts["model"]
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
        config = dict(context.model_config or {})
        self.defaults = {k: type(v)(config.get(k, v)) for k, v in GENERATION_DEFAULTS.items()}

    def predict(self, context, model_input, params: dict | None = None) -> pd.DataFrame:
        import torch

        from moai_lib.model.generate import generate_completions

        options = {**self.defaults, **{k: v for k, v in (params or {}).items() if k in GENERATION_DEFAULTS}}
        prompts = _prompts(model_input)
        with torch.inference_mode():
            completions = generate_completions(self.model, self.tokenizer, prompts, **options)
        return pd.DataFrame({"completion": [c.completion for c in completions]})


mlflow.models.set_model(MoaiTextGenerator())
