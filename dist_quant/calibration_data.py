"""The job's calibration data: what `--calib-data` names, read as documents, turned into tokens and packed into
samples of exactly `--seq-len` tokens, so that no padding is ever calibrated.

Where documents come from:
- nothing given: the built-in text (dist_quant/data/calibration.txt), repeated as often as the samples asked
  need (enough to try the job; the summary says so). Data the user gives is never repeated.
- a plain text file: one document per paragraph (paragraphs are separated by blank lines).
- a `.jsonl` file: one document per line, a JSON object.
- a directory written by `datasets.Dataset.save_to_disk`, another directory (a dataset repository on disk,
  read by `datasets.load_dataset`), or the name of a Hugging Face dataset: one document per row of the split.
A record's column (`--calib-column`; by default the first of `input_ids`, `messages`, `text` it has) holds text
(tokenized), chat messages (rendered with the tokenizer's chat template, then tokenized) or token ids (taken as
they are: the one form a model without a tokenizer can use).

Packing (`--pack`): `concat` (the default) joins the documents, each followed by the tokenizer's EOS token where
it has one, into one stream cut into samples; `truncate` takes each document's first `--seq-len` tokens and
skips documents shorter than that. Reading stops once `--calib-samples` samples are made; where the data holds
fewer, those are the samples.
"""

from __future__ import annotations

import itertools
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable, Iterator

import torch

from dist_quant.job import JobError

PACKINGS = ("concat", "truncate")
BUILTIN_TEXT = "dist_quant/data/calibration.txt"
# The columns read when --calib-column names none, in this order, and what each holds.
DEFAULT_COLUMNS = {"input_ids": "token ids", "messages": "chat", "text": "text"}
_NEEDS = {"text": "a string", "chat": "a list of {role, content} messages in its", "token ids": "a list of token ids in its"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")  # each a JSON object
# A Hugging Face hub id: `name` or `owner/name`, no file suffix a local file would have
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
_LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet", ".md")


class NoTokenizer:
    """A model without a tokenizer: only token ids can be calibrated on. `why` names the model."""

    def __init__(self, why: str):
        self.name = f"none ({why})"
        self.why = why
        self.separator: list[int] = []

    def text(self, text: str) -> list[int]:
        raise JobError(
            f"{self.why}: give --calib-data of token ids (a .jsonl file or dataset with an 'input_ids' column), "
            "or add the tokenizer's files"
        )

    chat = text


class ByteEncoding:
    """UTF-8 bytes as token ids: the built-in models' vocabularies start with every byte (their configs are
    ours); no other model's are."""

    name = "bytes (the built-in model's byte vocabulary)"
    separator = list(b"\n\n")  # between documents, as between the paragraphs of a text

    def text(self, text: str) -> list[int]:
        return list(text.encode())

    def chat(self, messages) -> list[int]:
        raise JobError("--calib-data holds chat messages, which need a tokenizer with a chat template; the built-in models have bytes")


class TokenizerEncoding:
    """A transformers tokenizer, named by where it came from."""

    def __init__(self, tokenizer, origin: str):
        self.tokenizer = tokenizer
        self.name = f"the tokenizer of {origin} ({type(tokenizer).__name__})"
        self.separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def text(self, text: str) -> list[int]:
        return self._encoded(text, add_special_tokens=True)

    def chat(self, messages) -> list[int]:
        if not self.tokenizer.chat_template:
            raise JobError(f"--calib-data holds chat messages, which need a chat template, and {self.name} has none")
        with self._failures("rendering --calib-data's chat messages with its chat template"):
            rendered = self.tokenizer.apply_chat_template(messages, tokenize=False)
        return self._encoded(rendered, add_special_tokens=False)

    def _encoded(self, text: str, add_special_tokens: bool) -> list[int]:
        with self._failures("tokenizing --calib-data"):
            return self.tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]

    @contextmanager
    def _failures(self, doing: str):
        """Whatever the checkpoint's tokenizer files make transformers raise (tokenizers' own errors are plain
        Exceptions), as one line naming it."""
        try:
            yield
        except Exception as error:  # noqa: BLE001 - the user's tokenizer files, read by transformers
            raise JobError(f"{self.name} fails {doing} ({type(error).__name__}: {error})".splitlines()[0]) from None


def checkpoint_encoding(directory: str | Path, flag: str = "--hf-model"):
    """The tokenizer of a Hugging Face checkpoint directory; NoTokenizer where it has none (never bytes)."""
    directory = Path(directory)
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        return NoTokenizer(f"{flag} {directory} has no tokenizer ({', '.join(_TOKENIZER_FILES)})")
    for name in _TOKENIZER_JSON:  # read here, so that transformers never meets one that is no JSON object
        if (directory / name).is_file():
            _, problem = json_object((directory / name).read_bytes())
            if problem:
                raise JobError(f"{flag} {directory}: its {name} is {problem}")
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    except Exception as error:  # noqa: BLE001 - the user's files; tokenizers' own errors are plain Exceptions
        raise JobError(f"{flag} {directory}: its tokenizer does not load ({type(error).__name__}: {error})".splitlines()[0]) from None
    return TokenizerEncoding(tokenizer, str(directory))


def json_object(data: bytes | str) -> tuple[dict | None, str | None]:
    """-> (the object, None) where `data` is a JSON object; else (None, what it is instead, in words: 'not JSON
    (...)'), nesting too deep for Python's decoder included."""
    try:
        value = json.loads(data)
    except RecursionError:
        return None, "not JSON that can be read (nested too deep)"
    except json.JSONDecodeError as error:
        return None, f"not JSON ({error.msg})"
    except ValueError as error:  # not UTF-8, or an integer of more digits than Python converts
        return None, f"not JSON that can be read ({str(error).split(':')[0]})"
    return (value, None) if isinstance(value, dict) else (None, "not a JSON object")


@dataclass(frozen=True)
class DataSpec:
    """What the user asked for: --calib-data (None: the built-in text), --calib-subset, --calib-split,
    --calib-column."""

    source: str | None = None
    subset: str | None = None
    split: str | None = None
    column: str | None = None

    @property
    def shown(self) -> str:
        return self.source if self.source is not None else "the built-in text"


@dataclass(frozen=True)
class CalibrationSet:
    """The samples, [count, seq_len] token ids, and what the summary says of them."""

    samples: torch.Tensor
    data: str  # what was read
    encoding: str  # how it became tokens
    pack: str
    documents: int  # documents read
    skipped: int  # documents shorter than --seq-len, skipped (truncate)
    asked: int  # --calib-samples
    repeated: bool  # the built-in text, repeated to fill the samples

    @property
    def tokens(self) -> int:
        return self.samples.numel()

    def describe(self) -> str:
        count, seq_len = self.samples.shape
        what = [f"--pack {self.pack}, {self.documents} documents" + (", repeated to fill" if self.repeated else "")]
        if self.skipped:
            what.append(f"{self.skipped} shorter than --seq-len skipped")
        if count < self.asked:
            what.append(f"--calib-samples {self.asked} asked, the data holds {count}")
        line = f"{self.data}; {self.encoding}; {count} samples x {seq_len} = {self.tokens:,} tokens ({'; '.join(what)})"
        return line + ("; for trying the job: give --calib-data for a real calibration" if self.repeated else "")


def load(spec: DataSpec, encoding, count: int, seq_len: int, pack: str, vocab_size: int) -> CalibrationSet:
    """Read, tokenize and pack the data: at most `count` samples of `seq_len` tokens, every id in the
    vocabulary. JobError (one line naming the data) where it cannot."""
    if pack not in PACKINGS:
        raise JobError(f"--pack {pack}: one of {', '.join(PACKINGS)}")
    if spec.source is None:
        if spec.column is not None or spec.split is not None or spec.subset is not None:
            raise JobError("--calib-column, --calib-split and --calib-subset need --calib-data")
        data, kind = f"the built-in text ({BUILTIN_TEXT})", "text"
        text = resources.files("dist_quant.data").joinpath("calibration.txt").read_text()
        documents = [encoding.text(p) for p in paragraphs(text.splitlines(keepends=True))]
    else:
        data, kind, records = _records(spec)
        documents = (_tokens(kind, value, encoding) for value in records)
    repeat = spec.source is None and pack == "concat"
    separator = [] if kind == "token ids" else encoding.separator  # token ids are the user's exact stream
    samples, read, skipped = _packed(documents, separator, count, seq_len, pack, repeat, spec.shown)
    repeated = repeat and read > len(documents)
    # checked before any tensor holds them: a JSON integer may be beyond int64
    outside = next((t for sample in samples for t in sample if not 0 <= t < vocab_size), None)
    if outside is not None:
        raise JobError(f"--calib-data {spec.shown}: token id {outside} is outside the model's vocabulary (vocab_size {vocab_size})")
    name = "token ids as given" if kind == "token ids" else encoding.name
    samples = torch.tensor(samples, dtype=torch.long)
    return CalibrationSet(samples, data, name, pack, min(read, len(documents)) if repeated else read, skipped, count, repeated)


def paragraphs(lines: Iterable[str]) -> Iterator[str]:
    """A plain text's documents: its paragraphs, separated by one or more blank lines (or lines of white space)."""
    paragraph: list[str] = []
    for line in lines:
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield "".join(paragraph).rstrip("\n")
            paragraph = []
    if paragraph:
        yield "".join(paragraph).rstrip("\n")


def _packed(documents: Iterable[list[int]], separator: list[int], count: int, seq_len: int, pack: str,
            repeat: bool, shown: str) -> tuple[list[list[int]], int, int]:
    """-> (n <= count samples of seq_len tokens, documents read (counting repeats), documents skipped). `repeat`:
    cycle through the documents (a list) until the samples are full."""
    samples: list[list[int]] = []
    stream: list[int] = []
    read = skipped = longest = total = 0
    for tokens in _cycled(documents) if repeat else documents:
        if len(samples) == count:
            break
        read += 1
        if not tokens:
            continue
        total += len(tokens)
        longest = max(longest, len(tokens))
        if pack == "truncate":
            if len(tokens) >= seq_len:
                samples.append(tokens[:seq_len])
            else:
                skipped += 1
            continue
        stream += tokens + separator
        start = 0
        while len(stream) - start >= seq_len and len(samples) < count:
            samples.append(stream[start:start + seq_len])
            start += seq_len
        del stream[:start]
    if samples:
        return samples, read, skipped
    if not total:
        raise JobError(f"--calib-data {shown}: no documents (nothing to calibrate on)")
    if pack == "truncate":
        raise JobError(
            f"--calib-data {shown}: no document holds --seq-len {seq_len} tokens (the longest has {longest}): "
            "use --pack concat or a shorter --seq-len"
        )
    raise JobError(f"--calib-data {shown}: {total} tokens in all, fewer than one sample of --seq-len {seq_len}")


def _cycled(documents: list[list[int]]) -> Iterator[list[int]]:
    while any(documents):
        yield from documents


def _tokens(kind: str, value, encoding) -> list[int]:
    if kind == "token ids":
        return list(value)
    return encoding.chat(value) if kind == "chat" else encoding.text(value)


# -- records -----------------------------------------------------------------------------------------------
def _records(spec: DataSpec) -> tuple[str, str, Iterator]:
    """-> (what is read, for the summary; what the column holds; each document's value)."""
    if not spec.source:
        raise JobError("--calib-data is empty: give a file, a directory or a dataset name")
    path = Path(spec.source)
    if path.is_file():
        if spec.split is not None or spec.subset is not None:
            raise JobError(f"--calib-split and --calib-subset are for datasets; --calib-data {spec.source} is a file")
        if path.suffix != ".jsonl":
            if spec.column is not None:
                raise JobError(f"--calib-column needs records (a .jsonl file or a dataset); {spec.source} is plain text")
            return f"{spec.source} (text, one document per paragraph)", "text", paragraphs(line for _, line in _lines(spec.source))
        records = _jsonl(spec.source)
        first = next(records, None)
        if first is None:
            raise JobError(f"--calib-data {spec.source}: no records (nothing to calibrate on)")
        column, kind = _column(spec, list(first[1]))
        kind = kind or _kind(spec, first, column)
        values = (_value(spec, where, record, column, kind) for where, record in itertools.chain([first], records))
        return f"{spec.source} (jsonl, column {column})", kind, values
    if path.exists() and not path.is_dir():
        raise JobError(f"--calib-data {spec.source}: not a file or directory")
    if not path.is_dir() and (not _HUB_ID.fullmatch(spec.source) or spec.source.endswith(_LOCAL_SUFFIXES)):
        raise JobError(f"--calib-data {spec.source}: no such file or directory (nor a Hugging Face dataset name)")
    dataset, described = _dataset(spec)
    column, kind = _column(spec, list(dataset.column_names))
    rows = ((f"row {i}", row) for i, row in enumerate(dataset.select_columns([column])))
    first = next(rows, None)
    if first is None:
        raise JobError(f"--calib-data {spec.source}: no rows (nothing to calibrate on)")
    kind = kind or _kind(spec, first, column)
    values = (_value(spec, where, record, column, kind) for where, record in itertools.chain([first], rows))
    return f"{described}, column {column}", kind, values


def _column(spec: DataSpec, columns: list[str]) -> tuple[str, str | None]:
    """-> (the column to read, what it holds where its name says so, else None)."""
    if spec.column is not None:
        if spec.column not in columns:
            raise JobError(f"--calib-column {spec.column}: {spec.source} has no such column (it has: {', '.join(columns)})")
        return spec.column, DEFAULT_COLUMNS.get(spec.column)
    column = next((c for c in DEFAULT_COLUMNS if c in columns), None)
    if column is None:
        raise JobError(
            f"--calib-data {spec.source}: no {', '.join(repr(c) for c in DEFAULT_COLUMNS)} column (it has: "
            f"{', '.join(columns)}): name one with --calib-column"
        )
    return column, DEFAULT_COLUMNS[column]


def _holds(kind: str, value) -> bool:
    if kind == "text":
        return isinstance(value, str)
    if kind == "token ids":
        return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )


def _kind(spec: DataSpec, first: tuple[str, dict], column: str) -> str:
    """What a column not named for its kind holds, from its first value."""
    where, record = first
    kind = next((k for k in _NEEDS if _holds(k, record.get(column))), None)
    if kind is None or (kind != "text" and not record[column]):
        raise JobError(f"--calib-data {spec.source}: {where}: column {column} holds neither text, chat messages nor token ids")
    return kind


def _value(spec: DataSpec, where: str, record: dict, column: str, kind: str):
    value = record.get(column)
    if not _holds(kind, value):
        raise JobError(f"--calib-data {spec.source}: {where} needs {_NEEDS[kind]} '{column}' field")
    texts = [value] if kind == "text" else [] if kind == "token ids" else [t for m in value for t in (m["role"], m["content"])]
    for text in texts:  # JSON can escape half a UTF-16 pair, which no tokenizer encodes
        try:
            text.encode()
        except UnicodeEncodeError as error:
            raise JobError(
                f"--calib-data {spec.source}: {where}: its '{column}' holds {text[error.start]!r}, half a UTF-16 "
                "surrogate pair, which is no text"
            ) from None
    return value


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """(number, line) of a UTF-8 file, read as it goes."""
    offset = 0
    with open(path, "rb") as file:
        for number, raw in enumerate(file, 1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise JobError(
                    f"--calib-data {path}: not UTF-8 text (byte {offset + error.start}): give a text or .jsonl file"
                ) from None
            offset += len(raw)


def _jsonl(path: str) -> Iterator[tuple[str, dict]]:
    for number, line in _lines(path):
        if not line.strip():
            continue
        record, problem = json_object(line)
        if problem:
            raise JobError(f"--calib-data {path}: line {number} is {problem}")
        yield f"line {number}", record


def _dataset(spec: DataSpec):
    """The split to read, through the datasets library. -> (dataset, what it is, for the summary)."""
    try:
        import datasets
    except ImportError:
        raise JobError(
            f"--calib-data {spec.source}: reading a dataset needs the datasets library: pip install 'dist_quant[data]'"
        ) from None
    path = Path(spec.source)
    saved = path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())
    if saved and spec.subset is not None:
        raise JobError(f"--calib-subset {spec.subset}: {spec.source} is a saved dataset, without subsets")
    try:
        if saved:
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset(spec.source, spec.subset, split=spec.split or "train")
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise JobError(f"--calib-data {spec.source}: {message}") from None
    split = spec.split or "train"
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        split = spec.split or ("train" if "train" in splits or len(splits) != 1 else splits[0])
        if split not in loaded:
            raise JobError(f"--calib-split {split}: {spec.source} has the splits {', '.join(splits)}")
        loaded = loaded[split]
    elif saved:
        if spec.split is not None:
            raise JobError(f"--calib-split {spec.split}: {spec.source} is one saved dataset, without splits")
        split = None
    where = "saved dataset" if saved else "dataset directory" if path.is_dir() else "dataset"
    parts = [f"subset {spec.subset}"] * bool(spec.subset) + [f"split {split}"] * bool(split) + [f"{len(loaded)} rows"]
    return loaded, f"{where} {spec.source} ({', '.join(parts)})"
