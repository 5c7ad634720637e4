"""The `moai` command line: thin wrappers that check their inputs, call `moai_lib`, and print.

    moai model-info --config 2b [--verbose]        parameter counts and memory (built on the meta device)
    moai model-info --all-sizes                    one line per preset
    moai model-info --memory [--config 8b]         training memory per GPU under DDP / FSDP2 (2b, 8b, 16b)
    moai generate --model_path M --tokenizer_path T --prompt "..."
    moai generate ... --input_file prompts.txt --output_file out.json
    moai generate ... --chat
    moai tokenize --corpus 'data/*.jsonl' --out data/packed --vocab_size 32000 --block_size 1024
    moai tokenize --corpus ... --out ... --tokenizer my-128k-tokenizer/ --block_size 2048
    moai train --config tiny --data_dir data/packed --output_dir runs/tiny [--max_steps N ...]
    moai train --test                               a quick run on random tokens
    moai train --model_path runs/tiny/model --data_dir ... --quantize --bits 4    QAT, then convert
    torchrun --nproc_per_node 8 -m moai_lib.cli train --config 8b --distributed fsdp2 ...   (see pretrain.sh)
    moai train ... --check_only --world_size 16     check inputs and the resume checkpoint, train nothing
    moai stage NAME [--method M] [--variant V] --params params.yaml [-S key=value]   one pipeline stage
    moai promote --params params.yaml              register the exported models, set the champion alias

Every input is checked before anything heavy is loaded; a bad one ends the command with exit status 2 and a
one-line message on stderr (no traceback).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

from .config import load_mamba_config
from .errors import MoaiError
from .model.generate import Completion, check_generation_args, generate_completions, generate_text
from .model.info import format_model_info, format_size_summary
from .train.loop import NonFiniteLossError

EXIT_USAGE = 2
EXIT_FAILURE = 1


class UsageError(MoaiError):
    """Bad command-line input; the message says what is wrong and how to fix it."""


# model-info ------------------------------------------------------------------------------------------------
def cmd_model_info(args: argparse.Namespace) -> int:
    if args.memory:
        from .train.memory import format_memory_table

        if args.world_size < 1 or args.micro_batch < 1:
            raise UsageError("--world_size and --micro_batch must be ≥ 1")
        presets = (args.config,) if args.config is not None else ("2b", "8b", "16b")
        print(format_memory_table(presets, world_size=args.world_size, micro_batch=args.micro_batch))
        return 0
    if args.config is None and not args.all_sizes:
        raise UsageError("model-info needs --config NAME_OR_JSON, --all-sizes or --memory")
    if args.config is not None:
        config = load_mamba_config(args.config)
        name = Path(args.config).stem if os.path.exists(args.config) else args.config.lower()
        print(format_model_info(config, name=name, verbose=args.verbose))
    if args.all_sizes:
        if args.config is not None:
            print()
        print(format_size_summary())
    return 0


# generate: input checks (cheap, before any model is loaded) -----------------------------------------------
def _check_model_dir(path: str) -> None:
    model_dir = Path(path)
    if not model_dir.is_dir():
        raise UsageError(f"model directory {path!r} does not exist" if not model_dir.exists()
                         else f"--model_path {path!r} is not a directory")
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"no config.json in model directory {path!r}")
    if not any(model_dir.glob("*.safetensors")):
        found = ", ".join(sorted(p.name for p in model_dir.glob("*.bin"))) or "none"
        raise UsageError(f"no *.safetensors weights in model directory {path!r} (found .bin files: {found}); "
                         "only safetensors checkpoints are loaded: re-save with save_pretrained()")


def _check_tokenizer_dir(path: str) -> None:
    if not Path(path).is_dir():
        raise UsageError(f"tokenizer directory {path!r} does not exist" if not Path(path).exists()
                         else f"--tokenizer_path {path!r} is not a directory")


def read_prompts(path: str) -> list[str]:
    """One prompt per non-blank line, or JSONL objects with a "prompt" (or "text") field.

    A file is JSONL when its name ends in .jsonl or every non-blank line is a JSON object.
    """
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"input file {path!r} does not exist" if not file.exists()
                         else f"input file {path!r} is not a regular file")
    lines = [(n, line) for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    if not lines:
        raise UsageError(f"input file {path!r} is empty: give one prompt per line (or JSONL with \"prompt\")")

    def as_object(line: str):
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, dict) else None

    objects = [as_object(line) for _, line in lines]
    if not file.name.endswith(".jsonl") and not all(o is not None for o in objects):
        return [line for _, line in lines]
    prompts = []
    for (number, _), obj in zip(lines, objects, strict=True):
        if obj is None:
            raise UsageError(f"{path}:{number}: not a JSON object (a .jsonl input needs one object per line)")
        prompt = obj.get("prompt", obj.get("text"))
        if not isinstance(prompt, str):
            raise UsageError(f"{path}:{number}: needs a string field \"prompt\" or \"text\"")
        if not prompt.strip():
            raise UsageError(f"{path}:{number}: empty prompt")
        prompts.append(prompt)
    return prompts


def _resolve_device_dtype(device: str, dtype: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but CUDA is not available here; use --device cpu")
    if dtype == "auto":  # bf16 where it is fast, fp32 on CPU (bf16 matmuls are slow there)
        dtype = "bfloat16" if device == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    return torch.device(device), getattr(torch, dtype)


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot load a tokenizer from {path!r}: {reason}") from None


def _load_model(path: str, device, dtype):
    # Importing moai_lib (done by importing this module) registered "moai_mamba" with the Auto classes.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, local_files_only=True)
    return model.to(device).eval()


def _write_json_atomic(path: str, data) -> None:
    """Write to a temporary file in the same directory, then rename: readers never see half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".moai-", suffix=".json.tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# generate ----------------------------------------------------------------------------------------------------
def _sampling(args: argparse.Namespace) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty)


def cmd_generate(args: argparse.Namespace) -> int:
    sampling = _sampling(args)
    try:
        check_generation_args(**sampling, batch_size=args.batch_size)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.prompt is not None and not args.prompt.strip():
        raise UsageError("empty prompt: --prompt needs some text")
    if (args.input_file is None) != (args.output_file is None):
        raise UsageError("--input_file and --output_file go together")
    prompts = read_prompts(args.input_file) if args.input_file is not None else None
    if args.output_file is not None:
        out_dir = os.path.dirname(os.path.abspath(args.output_file))
        if not os.path.isdir(out_dir):
            raise UsageError(f"directory of --output_file {out_dir!r} does not exist")
        if os.path.isdir(args.output_file):
            raise UsageError(f"--output_file {args.output_file!r} is a directory")
    _check_model_dir(args.model_path)
    _check_tokenizer_dir(args.tokenizer_path)
    config = load_mamba_config(args.model_path)
    device, dtype = _resolve_device_dtype(args.device, args.dtype)
    tokenizer = _load_tokenizer(args.tokenizer_path)
    if len(tokenizer) > config.vocab_size:
        raise UsageError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}: "
            "use the model's own tokenizer, or resize the model's embeddings first "
            "(model.resize_token_embeddings(len(tokenizer)) and save_pretrained)"
        )

    if args.seed is not None:
        from transformers import set_seed

        set_seed(args.seed)
    model = _load_model(args.model_path, device, dtype)
    if args.chat:
        return _chat(model, tokenizer, sampling)
    if args.prompt is not None:
        from transformers import TextStreamer

        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        generate_text(model, tokenizer, [args.prompt], streamer=streamer, **sampling)
        return 0
    completions: list[Completion] = []
    for start in range(0, len(prompts), args.batch_size):
        completions += generate_completions(model, tokenizer, prompts[start:start + args.batch_size], **sampling)
        print(f"generated {len(completions)}/{len(prompts)}", file=sys.stderr)
    _write_json_atomic(args.output_file, [
        {"prompt": c.prompt, "completion": c.completion, "num_new_tokens": c.num_new_tokens} for c in completions
    ])
    print(f"wrote {len(completions)} completions to {args.output_file}", file=sys.stderr)
    return 0


def _chat(model, tokenizer, sampling: dict) -> int:
    """Read user turns from stdin; the conversation so far is the prompt of each turn.

    With a chat template in the tokenizer it renders the messages; otherwise a plain transcript
    "User: …\\nAssistant: …" that a base model can continue. /reset forgets the conversation, /exit ends.
    """
    from transformers import TextStreamer

    messages: list[dict] = []
    template = getattr(tokenizer, "chat_template", None)
    print("chat: type a message; /reset forgets the conversation, /exit quits", flush=True)
    while True:
        print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:  # EOF
            print()
            return 0
        text = line.strip()
        if text == "/exit":
            return 0
        if text == "/reset":
            messages.clear()
            print("(conversation reset)", flush=True)
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        if template:
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            prompt = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
        print("assistant> ", end="", flush=True)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        reply = generate_text(model, tokenizer, [prompt], streamer=streamer, add_special_tokens=not template,
                              **sampling)[0]
        # A base model may go on to write the user's next turn: the reply ends where that starts.
        messages.append({"role": "assistant", "content": reply.split("\nUser:")[0].strip()})


# tokenize ----------------------------------------------------------------------------------------------------
def cmd_tokenize(args: argparse.Namespace) -> int:
    from .data import TokenizeParams, prepare_data

    _log_to_stderr()
    params = TokenizeParams(
        corpus=args.corpus, valid_corpus=args.valid_corpus, valid_fraction=args.valid_fraction,
        vocab_size=args.vocab_size, tokenizer=args.tokenizer, added_tokens=args.added_tokens or [],
        block_size=args.block_size, num_proc=args.num_proc, text_field=args.text_field, text_unit=args.text_unit,
        seed=args.seed,
    )
    metrics = prepare_data(params, args.out)
    for split in ("train", "valid"):
        langs = sorted(k.removeprefix(f"{split}_tokens_") for k in metrics if k.startswith(f"{split}_tokens_"))
        per_lang = ", ".join(f"{lang} {metrics[f'{split}_tokens_{lang}']:,}" for lang in langs)
        print(f"{split}: {metrics[f'{split}_documents']:,} documents, {metrics[f'{split}_tokens']:,} tokens"
              f"{f' ({per_lang})' if per_lang else ''}, {metrics[f'{split}_blocks']:,} blocks of "
              f"{metrics['block_size']}")
    print(f"wrote {args.out} (vocabulary {metrics['vocab_size']:,})")
    return 0


# train -------------------------------------------------------------------------------------------------------
# Flags that map 1:1 onto TrainParams fields; unset flags keep the params file's (or the default) value.
_TRAIN_PARAM_FLAGS = ("batch_size", "gradient_accumulation_steps", "global_batch_size", "distributed", "num_epochs",
                      "learning_rate", "max_length",
                      "max_steps", "warmup_steps", "weight_decay", "max_grad_norm", "eval_every", "eval_batches",
                      "save_every", "seed", "mixed_precision", "time_budget_s")
_TEST_DEFAULTS = {"max_steps": 10, "max_length": 128, "batch_size": 8}


def cmd_train(args: argparse.Namespace) -> int:
    from .data import make_random_shards
    from .train import TrainParams, build_model, check_resume, check_train_inputs, model_config, pretrain
    from .train.distributed import cpu_only_launch, resolve_strategy, world_size_from_env

    _log_to_stderr()
    world = args.world_size or world_size_from_env()
    if world < 1:
        raise UsageError(f"--world_size must be ≥ 1, got {world}")
    is_main = int(os.environ.get("RANK", "0")) == 0
    overrides = {k: getattr(args, k) for k in _TRAIN_PARAM_FLAGS if getattr(args, k) is not None}
    if args.gradient_checkpointing:
        overrides["gradient_checkpointing"] = True
    if args.no_resume:
        overrides["resume"] = False
    if args.test:
        overrides = {**_TEST_DEFAULTS, **overrides}
    params = TrainParams.from_json(args.params, **overrides) if args.params else TrainParams(**overrides)

    if args.config is not None and args.model_path is not None:
        raise UsageError("give --config (train a new model) or --model_path (continue from a saved one), not both")
    if args.model_path is not None:
        _check_model_dir(args.model_path)
        source = args.model_path
    elif args.config is not None:
        source = load_mamba_config(args.config)
    elif args.test:
        source = load_mamba_config("tiny")
    else:
        raise UsageError("train needs --config NAME_OR_JSON (a new model) or --model_path DIR (fine-tuning)")
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"--output_dir {args.output_dir!r} exists and is not a directory")

    config = model_config(source)
    if args.test:
        if args.data_dir is not None:
            raise UsageError("--test trains on random tokens: leave out --data_dir")
        seq_len = min(params.max_length, getattr(config, "max_position_embeddings", params.max_length))
        data_dir = output_dir / "test_data"
        if world > 1 and not args.check_only:  # one writer; the other ranks wait at the barrier
            from accelerate import PartialState

            with PartialState(cpu=cpu_only_launch()).main_process_first():
                if is_main:
                    _make_test_data(make_random_shards, data_dir, config, seq_len, params, world)
        else:
            _make_test_data(make_random_shards, data_dir, config, seq_len, params, world)
    elif args.data_dir is None:
        raise UsageError("train needs --data_dir (shards written by `moai tokenize`), or --test for random data")
    else:
        data_dir = Path(args.data_dir)
    # Everything that can be checked before loading weights (and before a launcher holds GPUs).
    check_train_inputs(params, source, data_dir, world)
    strategy = resolve_strategy(params.distributed, world)
    planned = config
    if args.quantize:  # the QAT model below records these in its config (and so in its checkpoints)
        planned = copy.deepcopy(config)
        planned.use_quantization, planned.quantization_bits = True, args.bits
    latest, _ = check_resume(params, planned, data_dir, output_dir, world)
    if args.check_only:
        accumulation = params.accumulation_steps(world)
        print(f"ok: {world} process(es), {strategy}, global batch {params.batch_size * accumulation * world} = "
              f"{params.batch_size} × {accumulation} micro-batches × {world}; "
              + (f"resumes from {latest}" if latest is not None else "starts from scratch"))
        return 0

    finalize = None
    if args.quantize:  # QAT: fake-quantized weights during training (moai_lib.quant), converted at the end
        from .quant import QATConfig, QuantizationError, quantize_

        try:
            qat = QATConfig(bits=args.bits, group_size=args.group_size, step="prepare")
            model = build_model(source, params.seed)
            model.config.use_quantization, model.config.quantization_bits = True, args.bits
            quantize_(model, qat)
        except QuantizationError as exc:
            raise UsageError(str(exc)) from None
        source = model

        def finalize(trained):
            return quantize_(trained, dataclasses.replace(qat, step="convert"))

    metrics = pretrain(params, source, data_dir, output_dir, finalize_model=finalize)
    if is_main:
        _print_train_summary(metrics, output_dir)
    return 0


def _make_test_data(make_random_shards, data_dir: Path, config, seq_len: int, params, world: int) -> None:
    global_batch = params.batch_size * params.accumulation_steps(world) * world
    make_random_shards(data_dir, config.vocab_size, seq_len, train_blocks=max(64, 2 * global_batch),
                       valid_blocks=8, seed=params.seed)


def _print_train_summary(metrics: dict, output_dir: Path) -> None:
    loss = metrics["train_loss"]
    line = (f"step {metrics['step']}/{metrics['total_steps']}: train loss "
            f"{'n/a' if loss is None else f'{loss:.4f}'}, {metrics['tokens_seen']:,} tokens, "
            f"{metrics['tokens_per_second']:,.0f} tokens/s")
    if "val_ppl" in metrics:
        line += f", validation perplexity {metrics['val_ppl']:.2f}"
        if "valid_unigram_ppl" in metrics:
            line += f" (unigram baseline {metrics['valid_unigram_ppl']:.2f})"
    if metrics.get("peak_mem_gib_per_rank"):
        line += ", peak GPU memory per rank " + "/".join(f"{g:.1f}" for g in metrics["peak_mem_gib_per_rank"]) + " GiB"
    if metrics.get("resumed_from_step"):
        line += f", resumed from step {metrics['resumed_from_step']} on {metrics['num_processes']} process(es)"
    print(line)
    per_lang = {k.removeprefix("val_ppl_"): v for k, v in metrics.items() if k.startswith("val_ppl_")}
    if per_lang:
        print("validation perplexity per language: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(per_lang.items())))
    if metrics["completed"]:
        print(f"saved the model to {metrics['model_dir']}")
    else:
        print(f"stopped early; run the same command again to resume from {output_dir / 'checkpoints'}")


def _log_to_stderr() -> None:
    import logging

    if not logging.getLogger().handlers:
        # Under torchrun / accelerate launch only rank 0 logs progress; the others log warnings and errors.
        level = logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING
        logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)


# parser ------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="moai", description="Train, quantize and ship pure-Mamba LMs.")
    parser.add_argument("--version", action="version", version=f"moai {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("model-info", help="parameter counts and memory of a config (nothing is allocated)")
    info.add_argument("--config", help="preset name (tiny, 130m, ..., 16b), JSON config file or model directory")
    info.add_argument("--all-sizes", action="store_true", help="one summary line per preset")
    info.add_argument("--verbose", action="store_true", help="also print every layer")
    info.add_argument("--memory", action="store_true",
                      help="training memory per GPU under DDP and FSDP2 at L=2048/8192 (default presets 2b, 8b, 16b)")
    info.add_argument("--world_size", type=int, default=8, help="GPUs that FSDP2 shards over (with --memory)")
    info.add_argument("--micro_batch", type=int, default=1, help="sequences per GPU per micro-batch (with --memory)")
    info.set_defaults(func=cmd_model_info)

    gen = sub.add_parser("generate", help="generate text with a saved model (safetensors)",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    gen.add_argument("--model_path", required=True, help="directory written by save_pretrained")
    gen.add_argument("--tokenizer_path", required=True, help="directory with the tokenizer files")
    mode = gen.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", help="one prompt; the completion is streamed to stdout")
    mode.add_argument("--chat", action="store_true", help="interactive conversation on stdin")
    mode.add_argument("--input_file", help="prompts, one per line, or JSONL with \"prompt\"/\"text\"")
    gen.add_argument("--output_file", help="JSON list of {prompt, completion, num_new_tokens} (with --input_file)")
    gen.add_argument("--max_new_tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top_k", type=int, default=50, help="0 disables")
    gen.add_argument("--top_p", type=float, default=1.0)
    gen.add_argument("--repetition_penalty", type=float, default=1.0)
    decoding = gen.add_mutually_exclusive_group()
    decoding.add_argument("--do_sample", dest="do_sample", action="store_true", default=True,
                          help="sample (default)")
    decoding.add_argument("--greedy", dest="do_sample", action="store_false", help="greedy decoding")
    gen.add_argument("--seed", type=int, help="seed of the sampling RNG")
    gen.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    gen.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                     help="auto: bfloat16 on a GPU that supports it, else float32")
    gen.add_argument("--batch_size", type=int, default=8, help="prompts per generate call (--input_file)")
    gen.set_defaults(func=cmd_generate)

    tok = sub.add_parser("tokenize", help="corpus → tokenizer → packed train/valid token shards",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    tok.add_argument("--corpus", nargs="+", required=True,
                     help="training corpus: files, directories or globs (.jsonl[.gz], .txt[.gz], .parquet)")
    tok.add_argument("--valid_corpus", nargs="+", help="validation corpus (default: hold out --valid_fraction)")
    tok.add_argument("--valid_fraction", type=float, default=0.05)
    tok.add_argument("--out", required=True, help="output directory (replaced atomically when complete)")
    source = tok.add_mutually_exclusive_group(required=True)
    source.add_argument("--vocab_size", type=int, help="train a byte-level BPE of this many tokens")
    source.add_argument("--tokenizer", help="use this Hugging Face tokenizer directory unchanged")
    tok.add_argument("--added_tokens", nargs="+", help="domain tokens to add to --tokenizer")
    tok.add_argument("--block_size", type=int, default=1024, help="tokens per packed block")
    tok.add_argument("--num_proc", type=int, default=1, help="tokenization processes")
    tok.add_argument("--text_field", default="text")
    tok.add_argument("--text_unit", choices=("line", "paragraph", "document"), default="paragraph",
                     help="documents in plain-text files")
    tok.add_argument("--seed", type=int, default=0, help="seed of the train/valid split")
    tok.set_defaults(func=cmd_tokenize)

    train = sub.add_parser("train", help="pretrain or fine-tune on packed shards (or random data with --test)")
    train.add_argument("--config", help="preset name (tiny, 130m, ..., 16b), JSON config file or model directory")
    train.add_argument("--model_path", help="continue from this saved model (fine-tuning; safetensors)")
    train.add_argument("--data_dir", help="packed shards written by `moai tokenize`")
    train.add_argument("--output_dir", default="output", help="checkpoints/, model/ and metrics.json go here")
    train.add_argument("--test", action="store_true", help="a quick run on random tokens (default preset tiny)")
    train.add_argument("--params", help="JSON file of TrainParams fields; flags override it")
    train.add_argument("--batch_size", type=int, help="sequences per micro-batch (default 8)")
    train.add_argument("--gradient_accumulation_steps", type=int, help="micro-batches per optimizer step (1)")
    train.add_argument("--global_batch_size", type=int,
                       help="sequences per step over all processes; sets the accumulation steps for the world size")
    train.add_argument("--distributed", choices=("auto", "no", "ddp", "fsdp2"),
                       help="data-parallel strategy under torchrun/accelerate launch (auto: ddp with >1 process)")
    train.add_argument("--check_only", action="store_true",
                       help="check inputs, batch vs. world size and the resume checkpoint; train nothing")
    train.add_argument("--world_size", type=int,
                       help="processes the run will have (default: $WORLD_SIZE or 1); for --check_only")
    train.add_argument("--num_epochs", type=float, help="passes over the data (1); --max_steps overrides")
    train.add_argument("--max_steps", type=int, help="optimizer steps of the whole run (sets the schedule)")
    train.add_argument("--learning_rate", type=float, help="peak AdamW learning rate (3e-4)")
    train.add_argument("--warmup_steps", type=int, help="linear warmup steps (default 2%% of the run)")
    train.add_argument("--weight_decay", type=float, help="AdamW weight decay (0.1; none on A_log, D, norms, biases)")
    train.add_argument("--max_grad_norm", type=float, help="gradient clipping norm (1.0; 0 disables)")
    train.add_argument("--max_length", type=int, help="tokens per sequence; divides the data's block size")
    train.add_argument("--eval_every", type=int, help="validate every N steps (0: at the end only)")
    train.add_argument("--eval_batches", type=int, help="validation batches (default: the whole split)")
    train.add_argument("--save_every", type=int, help="checkpoint every N steps (0: none)")
    train.add_argument("--seed", type=int, help="seed of the initialisation and the data order (0)")
    train.add_argument("--mixed_precision", choices=("auto", "no", "bf16"),
                       help="auto: bf16 autocast on a GPU, fp32 on CPU")
    train.add_argument("--time_budget_s", type=float, help="checkpoint and stop after this many seconds")
    train.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    train.add_argument("--no_resume", action="store_true", help="ignore checkpoints in --output_dir")
    train.add_argument("--quantize", action="store_true", help="quantization-aware training (fake-quant weights)")
    train.add_argument("--bits", type=int, choices=(4, 8), default=4, help="QAT weight bits")
    train.add_argument("--group_size", type=int, default=128, help="QAT quantization group size")
    train.set_defaults(func=cmd_train)

    from .pipeline.cli import add_parsers

    add_parsers(sub)  # stage, promote
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `moai` command; returns the exit status (argparse's own errors exit 2 via SystemExit)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (MoaiError, FileNotFoundError) as exc:  # bad input: the message names the problem and the fix
        message = " ".join(str(exc).split())  # one line, whatever the exception text holds
        print(f"moai {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except NonFiniteLossError as exc:
        print(f"moai {args.command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
