"""The words and file names an artist types: trigger words, class words, file names (host-free)."""
import pytest

from sefi_core.names import InvalidName, validate_class_word, validate_file_name, validate_trigger


@pytest.mark.parametrize("name", ["", "  ", "../x", "a/b", "a\\b", "..", "con", "x:y", "bad*name", "tail.", "a" * 120])
def test_bad_names_are_rejected(name):
    with pytest.raises(InvalidName):
        validate_file_name(name)


@pytest.mark.parametrize("name, file", [("anna", "anna.safetensors"), ("anna_v2.safetensors", "anna_v2.safetensors"),
                                        (" Bob-1 ", "Bob-1.safetensors")])
def test_good_names(name, file):
    assert validate_file_name(name) == file


@pytest.mark.parametrize("trigger, message", [
    ("", "is empty"), ("   ", "is empty"), ("two words", "has spaces"), ("(sks", "prompt syntax"),
    ("sks:1.2", "prompt syntax"), ("!!!", "has no letter or digit, so prompts cannot name it reliably"),
])
def test_bad_triggers(trigger, message):
    with pytest.raises(InvalidName, match=message):
        validate_trigger(trigger)


def test_the_class_word_is_not_a_trigger():
    with pytest.raises(InvalidName, match="The trigger word 'Dog' is the class word itself: every 'Dog' in a prompt "
                                            "would become this identity. Use a rare word such as 'sks'"):
        validate_trigger("Dog", "dog")


@pytest.mark.parametrize("word", ["", "(dog)", "123", "x" * 41])
def test_bad_class_words(word):
    with pytest.raises(InvalidName, match="class word"):
        validate_class_word(word)
