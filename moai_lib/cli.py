"""The `moai` command line: thin wrappers that check their inputs, call `moai_lib`, and print.

    moai model-info --config 2b [--verbose]        parameter counts and memory (built on the meta device)
    moai model-info --all-sizes                    one line per preset
    moai generate --model_path M --tokenizer_path T --prompt "..."
    moai generate ... --input_file prompts.txt --output_file out.json
    moai generate ... --chat

Every input is checked before anything heavy is loaded; a bad one ends the command with exit status 2 and a
one-line message on stderr (no traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from .config import ConfigError, load_mamba_config
from .model.generate import Completion, check_generation_args, generate_completions, generate_text
from .model.info import format_model_info, format_size_summary

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad command-line input; the message says what is wrong and how to fix it."""


# model-info ------------------------------------------------------------------------------------------------
def cmd_model_info(args: argparse.Namespace) -> int:
    if args.config is None and not args.all_sizes:
        raise UsageError("model-info needs --config NAME_OR_JSON or --all-sizes")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `moai` command; returns the exit status (argparse's own errors exit 2 via SystemExit)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, UsageError, FileNotFoundError) as exc:
        message = " ".join(str(exc).split())  # one line, whatever the exception text holds
        print(f"moai {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
