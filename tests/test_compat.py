import pytest
from tokenizers import normalizers
from transformers import AutoTokenizer

from opdx.compat import check_same_tokenizer, same_token_ids
from opdx.config import asset_path
from opdx.pairs.tiny import build_char_tokenizer


def test_a_tokenizer_with_other_ids_is_refused():
    other = build_char_tokenizer("0123456789+-=")
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_same_tokenizer(AutoTokenizer.from_pretrained(asset_path("tiny/student")), other)


def test_same_token_ids_catches_a_tokenizer_that_splits_text_differently():
    tokenizer, other = build_char_tokenizer(), build_char_tokenizer()
    assert same_token_ids(tokenizer, other)
    other.backend_tokenizer.normalizer = normalizers.Replace("1", "2")  # same vocabulary, other ids for "17*23"
    check_same_tokenizer(tokenizer, other)
    assert not same_token_ids(tokenizer, other)
