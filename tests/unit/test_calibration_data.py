"""Calibration data: documents as samples, packed without padding, from files, token ids and datasets on disk
(no network), with the tokenizer's chat template; every data-parallel replica gets as many batches of one
shape."""

import json

import pytest
import torch

from dist_quant.calibration_data import (
    ByteEncoding,
    DataSpec,
    NoTokenizer,
    TokenizerEncoding,
    checkpoint_encoding,
    load,
    paragraphs,
)
from dist_quant.job import JobError, calibration_batches
from tests.e2e.jobs import byte_tokenizer

BYTES = ByteEncoding()


def _bytes(text: str) -> list[int]:
    return list(text.encode())


def test_a_text_files_documents_are_its_paragraphs(tmp_path):
    text = "one\n  still one\n\n  \t\ntwo\n\n\n\nthree\n"
    assert list(paragraphs(text.splitlines(keepends=True))) == ["one\n  still one", "two", "three"]
    data = tmp_path / "notes.txt"
    data.write_text("alpha beta\ngamma\n\ndelta epsilon zeta\n")
    packed = load(DataSpec(str(data)), BYTES, 2, 8, "truncate", 256)
    assert packed.samples.tolist() == [_bytes("alpha be"), _bytes("delta ep")]
    assert packed.documents == 2 and "one document per paragraph" in packed.data


def test_concat_joins_documents_with_the_separator_and_never_pads(tmp_path):
    data = tmp_path / "calib.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in ("abc", "defg", "h")) + "\n")
    packed = load(DataSpec(str(data)), BYTES, 10, 4, "concat", 256)
    stream = _bytes("abc\n\ndefg\n\nh\n\n")
    assert packed.samples.tolist() == [stream[i:i + 4] for i in range(0, 12, 4)]  # the 2 tokens left are dropped
    assert packed.samples.shape == (3, 4) and packed.tokens == 12
    assert "--calib-samples 10 asked, the data holds 3" in packed.describe()


def test_truncate_makes_one_sample_per_record_and_skips_shorter_ones(tmp_path):
    data = tmp_path / "calib.jsonl"
    records = ["a long enough record", "short", "another long record", "third long record!"]
    data.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(records)))
    packed = load(DataSpec(str(data)), BYTES, 2, 7, "truncate", 256)
    assert packed.samples.tolist() == [_bytes("a long "), _bytes("another")]  # reading stops at 2 samples
    assert (packed.documents, packed.skipped) == (3, 1)
    assert "1 shorter than --seq-len skipped" in packed.describe()


def test_token_ids_need_no_tokenizer_and_are_taken_as_they_are(tmp_path):
    data = tmp_path / "ids.jsonl"
    data.write_text("\n".join(json.dumps({"input_ids": list(range(i, i + 6))}) for i in range(3)))
    none = NoTokenizer("--hf-model ckpt has no tokenizer")
    packed = load(DataSpec(str(data)), none, 3, 6, "truncate", 100)
    assert packed.samples.tolist() == [list(range(i, i + 6)) for i in range(3)] and packed.encoding == "token ids as given"
    packed = load(DataSpec(str(data)), none, 3, 4, "concat", 100)
    assert packed.samples.tolist() == [[0, 1, 2, 3], [4, 5, 1, 2], [3, 4, 5, 6]]  # no separator between records
    with pytest.raises(JobError, match=r"^--calib-data .*ids.jsonl: token id 7 is outside the model's vocabulary \(vocab_size 7\)$"):
        load(DataSpec(str(data)), none, 3, 6, "truncate", 7)


def test_text_without_a_tokenizer_fails_with_one_line(tmp_path):
    data = tmp_path / "calib.txt"
    data.write_text("some text")
    none = checkpoint_encoding(tmp_path)
    assert isinstance(none, NoTokenizer)
    for spec in (DataSpec(str(data)), DataSpec()):  # the built-in text too: never bytes for a checkpoint
        with pytest.raises(JobError) as caught:
            load(spec, none, 4, 8, "concat", 256)
        assert str(caught.value).startswith(f"--hf-model {tmp_path} has no tokenizer") and "\n" not in str(caught.value)
        assert "give --calib-data of token ids" in str(caught.value)


def test_a_checkpoints_tokenizer_is_used_with_its_eos_between_documents(tmp_path):
    byte_tokenizer().save_pretrained(tmp_path)
    encoding = checkpoint_encoding(tmp_path)
    assert isinstance(encoding, TokenizerEncoding) and encoding.separator == [0]
    data = tmp_path / "calib.txt"
    data.write_text("ab\n\ncd\n")
    packed = load(DataSpec(str(data)), encoding, 1, 6, "concat", 256)
    assert packed.samples.tolist() == [[97, 98, 0, 99, 100, 0]] and "the tokenizer of" in packed.encoding


def test_the_builtin_text_is_repeated_only_to_fill_and_says_so():
    packed = load(DataSpec(), BYTES, 2, 16, "concat", 256)
    assert not packed.repeated and "repeated" not in packed.describe()
    packed = load(DataSpec(), BYTES, 400, 64, "concat", 256)
    assert packed.repeated and packed.samples.shape == (400, 64) and packed.documents == 14
    assert "repeated to fill" in packed.describe() and "give --calib-data for a real calibration" in packed.describe()


@pytest.mark.parametrize(
    "pack, seq_len, message",
    [
        ("truncate", 50, r"no document holds --seq-len 50 tokens \(the longest has 5\): use --pack concat"),
        ("concat", 50, r"10 tokens in all, fewer than one sample of --seq-len 50"),
    ],
)
def test_too_little_data_for_one_sample_is_one_line(tmp_path, pack, seq_len, message):
    data = tmp_path / "calib.txt"
    data.write_text("hello\n\nworld")
    with pytest.raises(JobError, match=message):
        load(DataSpec(str(data)), BYTES, 4, seq_len, pack, 256)


def _dataset_dir(tmp_path, columns: dict, splits: tuple[str, ...] | None = None):
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_dict(columns)
    path = tmp_path / "dataset"
    (datasets.DatasetDict({s: dataset for s in splits}) if splits else dataset).save_to_disk(str(path))
    return str(path)


def test_a_saved_chat_dataset_goes_through_the_chat_template(tmp_path):
    messages = [[{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}] for i in range(3)]
    path = _dataset_dir(tmp_path, {"messages": messages, "id": [0, 1, 2]})
    tokenizer = byte_tokenizer()
    packed = load(DataSpec(path), TokenizerEncoding(tokenizer, "t"), 3, 20, "truncate", 256)
    assert packed.samples.tolist() == [_bytes(f"<user>question {i}\n<assistant>answer {i}\n")[:20] for i in range(3)]
    assert f"saved dataset {path} (3 rows), column messages" == packed.data
    with pytest.raises(JobError, match=r"chat messages, which need a tokenizer with a chat template"):
        load(DataSpec(path), BYTES, 3, 20, "truncate", 256)


def test_a_saved_dataset_with_splits_and_a_named_column(tmp_path):
    path = _dataset_dir(tmp_path, {"article": ["first article text", "second article text"], "label": [1, 2]},
                        splits=("train", "validation"))
    packed = load(DataSpec(path, split="validation", column="article"), BYTES, 2, 6, "truncate", 256)
    assert packed.samples.tolist() == [_bytes("first "), _bytes("second")]
    assert packed.data == f"saved dataset {path} (split validation, 2 rows), column article"
    with pytest.raises(JobError, match=r"^--calib-split test: .* has the splits train, validation$"):
        load(DataSpec(path, split="test", column="article"), BYTES, 2, 6, "truncate", 256)
    with pytest.raises(JobError, match=r"no 'input_ids', 'messages', 'text' column \(it has: article, label\): name one with --calib-column"):
        load(DataSpec(path), BYTES, 2, 6, "truncate", 256)
    with pytest.raises(JobError, match=r"^--calib-data .*: row 0: column label holds neither text, chat messages nor token ids$"):
        load(DataSpec(path, column="label"), BYTES, 2, 6, "truncate", 256)


def test_a_path_that_does_not_exist_is_not_taken_for_a_dataset_name():
    with pytest.raises(JobError, match=r"^--calib-data no/such/file.txt: no such file or directory"):
        load(DataSpec("no/such/file.txt"), BYTES, 2, 6, "concat", 256)


@pytest.mark.parametrize("count, replicas, batch", [(5, 2, 2), (3, 4, 8), (16, 4, 3), (1, 2, 1)])
def test_every_replica_gets_as_many_batches_of_one_shape(count, replicas, batch):
    samples = torch.arange(count * 4).reshape(count, 4)
    shares = [calibration_batches(samples, batch, r, replicas) for r in range(replicas)]
    assert len({len(share) for share in shares}) == 1
    assert len({tuple(b.shape) for share in shares for b in share}) == 1
    seen = {tuple(row.tolist()) for share in shares for b in share for row in b}
    assert seen == {tuple(row.tolist()) for row in samples}
