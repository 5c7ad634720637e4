"""Fixtures for the model tests.

`mamba_ssm_cpu` makes state-spaces/mamba (mamba-ssm 2.3.2) usable as a CPU reference. Its pure-Python install
(MAMBA_SKIP_CUDA_BUILD) fails at `import selective_scan_cuda`, and its fast paths are CUDA or Triton kernels, so
(as in shared/NOTES.md) the fixture:
- stubs `selective_scan_cuda` with a module that raises if anything reaches for a CUDA kernel;
- routes `selective_scan_fn` to mamba-ssm's own `selective_scan_ref`, `selective_state_update` to None (its
  inline einsum step; tests may reroute it to `selective_state_update_ref`), `causal_conv1d_*` to None (torch
  conv), and the Triton `RMSNorm.forward` to its `rms_norm_ref`; models must use `fused_add_norm=False`;
- imports transformers' Mamba first: transformers binds mamba-ssm kernels at import time when mamba_ssm
  imports, and it must keep its own pure-torch path to stay an independent reference.
Everything it adds to `sys.modules` is removed afterwards, and what was there before is put back.
"""

import importlib
import importlib.util
import sys
import types

import pytest

MAMBA_SSM_INSTALL = ("MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE pip install --no-build-isolation --no-deps "
                     "mamba-ssm==2.3.2.post1 (it also needs einops and triton at import time)")


def _is_mamba_ssm_module(name: str) -> bool:
    return name in ("mamba_ssm", "selective_scan_cuda") or name.startswith("mamba_ssm.")


def _cuda_stub(name: str) -> types.ModuleType:
    module = types.ModuleType(name)

    def __getattr__(attr):
        raise RuntimeError(f"{name}.{attr}: this CUDA extension is stubbed in the CPU tests; "
                           "a CUDA-only mamba-ssm path was reached (is fused_add_norm=False?)")

    module.__getattr__ = __getattr__
    return module


@pytest.fixture(scope="module")
def mamba_ssm_cpu():
    """mamba-ssm routed through its pure-torch references; yields a namespace of the pieces the tests use."""
    if importlib.util.find_spec("mamba_ssm") is None:
        pytest.skip(f"mamba-ssm is not installed; install it with: {MAMBA_SSM_INSTALL}")
    importlib.import_module("transformers.models.mamba.modeling_mamba")  # before mamba_ssm: see module docstring
    saved = {name: mod for name, mod in sys.modules.items() if _is_mamba_ssm_module(name)}
    for name in saved:
        del sys.modules[name]
    sys.modules["selective_scan_cuda"] = _cuda_stub("selective_scan_cuda")
    patch = pytest.MonkeyPatch()
    try:
        importlib.import_module("mamba_ssm")
        config_mamba = importlib.import_module("mamba_ssm.models.config_mamba")
        mixer_seq = importlib.import_module("mamba_ssm.models.mixer_seq_simple")
        mamba_simple = importlib.import_module("mamba_ssm.modules.mamba_simple")
        block = importlib.import_module("mamba_ssm.modules.block")
        scan_iface = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
        layer_norm = importlib.import_module("mamba_ssm.ops.triton.layer_norm")
        state_update = importlib.import_module("mamba_ssm.ops.triton.selective_state_update")
        generation = importlib.import_module("mamba_ssm.utils.generation")

        def rms_norm_forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
            assert residual is None and not prenorm, "the CPU reference needs fused_add_norm=False"
            return layer_norm.rms_norm_ref(x, self.weight, self.bias, eps=self.eps, upcast=True)

        def no_fused_add_norm(*args, **kwargs):
            raise RuntimeError("fused add+norm is a Triton GPU kernel: build the reference with fused_add_norm=False")

        patch.setattr(mamba_simple, "selective_scan_fn", scan_iface.selective_scan_ref)
        patch.setattr(mamba_simple, "selective_state_update", None)
        patch.setattr(mamba_simple, "causal_conv1d_fn", None)
        patch.setattr(mamba_simple, "causal_conv1d_update", None)
        patch.setattr(layer_norm.RMSNorm, "forward", rms_norm_forward)
        patch.setattr(block, "layer_norm_fn", no_fused_add_norm)
        patch.setattr(mixer_seq, "layer_norm_fn", no_fused_add_norm)
        yield types.SimpleNamespace(
            MambaConfig=config_mamba.MambaConfig,
            MambaLMHeadModel=mixer_seq.MambaLMHeadModel,
            Mamba=mamba_simple.Mamba,
            mamba_simple=mamba_simple,
            InferenceParams=generation.InferenceParams,
            selective_state_update_ref=state_update.selective_state_update_ref,
        )
    finally:
        patch.undo()
        for name in [n for n in sys.modules if _is_mamba_ssm_module(n)]:
            del sys.modules[name]
        sys.modules.update(saved)
