from pathlib import Path

import pytest

from harness.trainer_constants import read_constants, write_constants

TRAINER = '''"""A trainer."""
# Hyperparameters (edit these directly)
DEPTH = 8  # number of transformer layers
TOTAL_BATCH_SIZE = 2**19  # tokens per optimizer step
WINDOW_PATTERN = "SSSL"  # L=full, S=half context
ADAM_BETAS = (0.8, 0.95)
MATRIX_LR = 0.04

def main():
    DEPTH = 3  # a local, not a constant
'''


def test_read_evaluates_literals_and_powers():
    values = read_constants(TRAINER)
    assert values == {"DEPTH": 8, "TOTAL_BATCH_SIZE": 524288, "WINDOW_PATTERN": "SSSL",
                      "ADAM_BETAS": (0.8, 0.95), "MATRIX_LR": 0.04}


def test_write_replaces_values_and_keeps_comments(tmp_path: Path):
    path = tmp_path / "train.py"
    path.write_text(TRAINER)
    write_constants(path, {"DEPTH": 2, "TOTAL_BATCH_SIZE": 4096, "WINDOW_PATTERN": "L"})
    text = path.read_text()
    assert "DEPTH = 2  # number of transformer layers\n" in text
    assert "TOTAL_BATCH_SIZE = 2**12  # tokens per optimizer step\n" in text
    assert 'WINDOW_PATTERN = \'L\'  # L=full, S=half context\n' in text
    assert "    DEPTH = 3  # a local" in text  # indented assignments are left alone
    assert read_constants(text)["TOTAL_BATCH_SIZE"] == 4096


def test_unknown_constant_is_an_error_and_the_file_is_untouched(tmp_path: Path):
    path = tmp_path / "train.py"
    path.write_text(TRAINER)
    with pytest.raises(KeyError, match="NOPE"):
        write_constants(path, {"DEPTH": 4, "NOPE": 1})
    assert path.read_text() == TRAINER
