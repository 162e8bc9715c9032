"""The end-of-sequence set every decoding loop stops on, from each form a generation config may give."""

from types import SimpleNamespace

import pytest

from kvpress_ext.core.tokens import eos_token_ids


@pytest.mark.parametrize("configured, expected", [(2, {2}), ([2, 7, 2], {2, 7}), (None, set()), ([], set())])
def test_eos_ids_from_one_id_a_list_or_none(configured, expected):
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=configured))
    assert eos_token_ids(model) == expected


def test_eos_ids_of_a_model_without_generation_config_are_empty():
    assert eos_token_ids(SimpleNamespace()) == set()
    assert eos_token_ids(SimpleNamespace(generation_config=None)) == set()

