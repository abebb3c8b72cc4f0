"""GLUE-format directories are read by their columns, not only by their names: every layout is
detected under an unrelated directory name, the most specific layout wins, and the chosen layout is
reported."""
from __future__ import annotations

import pytest

from leanformer.errors import LeanformerError
from leanformer.tasks import load_task

# layout → (header or None for headerless CoLA, two rows, expected text_b present, expected labels)
LAYOUTS = {
    "SST-2": (["sentence", "label"], [["a fine film", "1"], ["dull", "0"]], False, [1, 0]),
    "CoLA": (None, [["gj04", "1", "", "The cat sat."], ["gj04", "0", "*", "Cat the sat."]], False, [1, 0]),
    "MRPC": (["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
             [["1", "1", "2", "He left.", "He went away."], ["0", "3", "4", "It rains.", "Dogs bark."]], True, [1, 0]),
    "RTE": (["index", "sentence1", "sentence2", "label"],
            [["0", "A man sleeps.", "A person rests.", "entailment"],
             ["1", "A dog runs.", "A cat flies.", "not_entailment"]], True, [0, 1]),
    "QNLI": (["index", "question", "sentence", "label"],
             [["0", "Who wrote it?", "She wrote it.", "entailment"],
              ["1", "When?", "The sky is blue.", "not_entailment"]], True, [0, 1]),
    "STS-B": (["index", "genre", "sentence1", "sentence2", "score"],
              [["0", "main", "A man plays.", "A man is playing.", "4.8"], ["1", "main", "Cats.", "Cars.", "0.5"]],
              True, [4.8, 0.5]),
}


def _write(directory, header, rows):
    directory.mkdir(parents=True)
    text = "".join("\t".join(r) + "\n" for r in ([header] if header else []) + rows)
    for split in ("train", "dev"):
        (directory / f"{split}.tsv").write_text(text)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_glue_layout_is_detected_under_another_name(tmp_path, layout):
    header, rows, pair, labels = LAYOUTS[layout]
    _write(tmp_path / "my_task_v2", header, rows)
    task = load_task(str(tmp_path / "my_task_v2"))
    assert task.name == layout
    assert layout in task.layout and "columns" in task.layout
    assert (task.train.text_b is not None) == pair
    assert task.train.labels == labels


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_glue_layout_is_detected_under_its_own_name(tmp_path, layout):
    header, rows, _, labels = LAYOUTS[layout]
    _write(tmp_path / layout, header, rows)
    task = load_task(str(tmp_path / layout))
    assert task.name == layout and "directory name" in task.layout
    assert task.train.labels == labels


def test_qnli_columns_are_not_read_as_sst2(tmp_path):
    """QNLI's header also holds `sentence` and `label` (SST-2's columns): the pair layout must win."""
    header, rows, _, _ = LAYOUTS["QNLI"]
    _write(tmp_path / "questions", header, rows)
    task = load_task(str(tmp_path / "questions"))
    assert task.name == "QNLI" and task.train.text_a[0] == "Who wrote it?" and task.train.text_b is not None


def test_a_misnamed_directory_falls_back_to_its_columns(tmp_path):
    """A directory named SST-2 that holds RTE's columns is read as RTE, and the report says why."""
    header, rows, _, _ = LAYOUTS["RTE"]
    _write(tmp_path / "SST-2", header, rows)
    task = load_task(str(tmp_path / "SST-2"))
    assert task.name == "RTE" and "SST-2" in task.layout


def test_columns_fitting_no_layout_say_what_was_found(tmp_path):
    _write(tmp_path / "odd", ["id", "body", "target"], [["0", "x", "1"]])
    with pytest.raises(LeanformerError, match="body"):
        load_task(str(tmp_path / "odd"))
