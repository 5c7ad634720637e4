"""Train a byte-level BPE tokenizer, or load a user's existing Hugging Face tokenizer unchanged.

Both return a `PreTrainedTokenizerFast` with an eos token: packing separates documents with it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from .corpus import DataError

logger = logging.getLogger(__name__)

# eos (also used as bos, GPT-2 style), then pad. Training appends any further special tokens after these.
DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")
_BYTE_ALPHABET = 256


def _text_batches(dataset, batch_size: int = 1000) -> Iterator[list[str]]:
    for batch in dataset.select_columns(["text"]).iter(batch_size=batch_size):
        yield batch["text"]


def train_tokenizer(
    dataset,
    vocab_size: int,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    out_dir: str | os.PathLike | None = None,
    min_frequency: int = 2,
):
    """Train a byte-level BPE (GPT-2 style: bytes → 256 symbols, no unknown token) on ``dataset["text"]``.

    Args:
        dataset: a `datasets.Dataset` with a ``text`` column (from `read_corpus`).
        vocab_size: total vocabulary including the 256 byte symbols and the special tokens.
        special_tokens: the first is eos (and bos), the second (if any) pad; all are never split.
        out_dir: if given, the tokenizer is saved there with `save_pretrained` (written to a temporary
            directory and renamed into place, so a failure leaves nothing half-written).
        min_frequency: a merge needs this many occurrences.

    Returns the `PreTrainedTokenizerFast` (``len(tokenizer) == vocab_size`` unless the corpus runs out of merges).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special_tokens = list(special_tokens)
    if not special_tokens:
        raise DataError("special_tokens must hold at least the eos token (e.g. '<|endoftext|>')")
    if len(set(special_tokens)) != len(special_tokens):
        raise DataError(f"special_tokens has duplicates: {special_tokens}")
    minimum = _BYTE_ALPHABET + len(special_tokens)
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < minimum:
        raise DataError(f"vocab_size must be an integer ≥ {minimum} (256 bytes + {len(special_tokens)} special "
                        f"tokens), got {vocab_size!r}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    logger.info("training a byte-level BPE with %d tokens on %d documents", vocab_size, len(dataset))
    tokenizer.train_from_iterator(_text_batches(dataset), trainer=trainer, length=len(dataset))
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=special_tokens[0], bos_token=special_tokens[0],
        pad_token=special_tokens[1] if len(special_tokens) > 1 else special_tokens[0],
        additional_special_tokens=special_tokens[2:] or None,
    )
    if len(wrapped) < vocab_size:
        logger.warning("the corpus allowed only %d tokens of the %d asked for (too few distinct merges)",
                       len(wrapped), vocab_size)
    if out_dir is not None:
        save_tokenizer(wrapped, out_dir)
    return wrapped


def save_tokenizer(tokenizer, out_dir: str | os.PathLike) -> Path:
    """`save_pretrained` into a temporary sibling directory, then rename it to `out_dir` (replacing it)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out)
    try:
        tokenizer.save_pretrained(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def make_temp_dir(final: Path) -> Path:
    """A fresh hidden directory beside `final` (same file system, so the final rename is atomic)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes 0700; the result is an ordinary output directory
    return tmp


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished directory `src` to `dst`; an existing `dst` is replaced only after `src` is in place
    next to it, so at every moment either the old or the new directory is complete."""
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.replace(dst, old / dst.name)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
    fsync_dir(dst.parent)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_tokenizer(path: str | os.PathLike, added_tokens: Sequence[str] = ()):
    """Load an existing Hugging Face tokenizer directory (local files only), unchanged, plus domain tokens.

    The user's tokenizer (e.g. a 128K Llama-3 style one) is used as it is: same ids, same normalisation.
    `added_tokens` are appended as ordinary (non-special) added tokens, never split; the model's embeddings
    must then grow to `len(tokenizer)` (see `moai_lib.train.resize_token_embeddings`).
    Raises `DataError` when the directory is missing or unreadable, or the tokenizer has no eos token.
    """
    from transformers import AutoTokenizer

    directory = Path(path)
    if not directory.is_dir():
        raise DataError(f"tokenizer directory {os.fspath(path)!r} does not exist" if not directory.exists()
                        else f"tokenizer path {os.fspath(path)!r} is not a directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, use_fast=True)
    except (OSError, ValueError, TypeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot load a tokenizer from {os.fspath(path)!r}: {reason}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{os.fspath(path)!r} holds a slow (Python) tokenizer; save a fast one (tokenizer.json)")
    if tokenizer.eos_token_id is None:
        raise DataError(f"the tokenizer in {os.fspath(path)!r} has no eos token, which separates packed "
                        "documents; set eos_token in its tokenizer_config.json")
    if added_tokens:
        new = [t for t in dict.fromkeys(added_tokens) if t not in tokenizer.get_vocab()]
        if any(not isinstance(t, str) or not t for t in new):
            raise DataError(f"added_tokens must be non-empty strings, got {list(added_tokens)!r}")
        tokenizer.add_tokens(new)
        logger.info("added %d domain tokens; the vocabulary is now %d", len(new), len(tokenizer))
    return tokenizer
