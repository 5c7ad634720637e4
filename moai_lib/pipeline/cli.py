"""`moai stage` and `moai promote`: the commands DVC's `cmd:` lines and users call.

    moai stage tokenize --params params.yaml
    moai stage quantize --method gptq --params params.yaml -S quantize.methods.gptq.group_size=64
    moai stage evaluate --variant int4 --params params.yaml
    moai stage report --params params.yaml          prints the comparison table
    moai promote --params params.yaml               registers the exports, sets the `champion` alias

`promote` is not a DVC stage: DVC's run cache would restore its (empty) outputs without registering anything.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import PipelineError

STAGE_NAMES = ("tokenize", "pretrain", "qat", "quantize", "evaluate", "report", "export")


def add_parsers(sub) -> None:
    stage = sub.add_parser("stage", help="run one pipeline stage (what dvc.yaml calls)")
    stage.add_argument("name", choices=STAGE_NAMES, help="the stage")
    stage.add_argument("--method", help="quantize: the method (a key of quantize.methods)")
    stage.add_argument("--variant", help="evaluate/export: bf16, qat or a quantize method")
    _common(stage)
    stage.set_defaults(func=cmd_stage)

    promote = sub.add_parser("promote", help="register the exported models in MLflow and set the champion alias")
    _common(promote)
    promote.set_defaults(func=cmd_promote)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="the params file (its directory is the run root)")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param (dotted key, YAML value), e.g. -S pretrain.learning_rate=1e-3")
    parser.add_argument("--pipeline-id", help="groups the stages' MLflow runs under one parent run "
                        "(default: $MOAI_PIPELINE_ID, else derived by the tracking module)")


def _load(args: argparse.Namespace):
    from .params import PipelineParams

    return PipelineParams.load(args.params, overrides=args.overrides)


def cmd_stage(args: argparse.Namespace) -> int:
    from ..quant import QuantizationError
    from .stages import run_stage

    _log_to_stderr()
    params = _load(args)
    try:
        metrics = run_stage(args.name, params, method=args.method, variant=args.variant,
                            pipeline_id=args.pipeline_id or os.environ.get("MOAI_PIPELINE_ID"))
    except QuantizationError as exc:
        raise PipelineError(f"quantize.methods.{args.method}: {exc}" if args.method else str(exc)) from None
    if args.name == "report":
        table = params.path("reports") / "comparison.md"
        if table.is_file():
            print(table.read_text(encoding="utf-8"))
    else:
        shown = {k: v for k, v in metrics.items() if isinstance(v, int | float | str) and not isinstance(v, bool)}
        print(json.dumps(shown, indent=1, ensure_ascii=False, default=str))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from .registry import register_and_promote

    _log_to_stderr()
    result = register_and_promote(_load(args))
    print(f"champion: {result.get('champion')} (version {result.get('version')})")
    print(json.dumps(result, indent=1, ensure_ascii=False, default=str))
    return 0


def _log_to_stderr() -> None:
    import logging

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
