"""The words and file names an artist types on the pack's nodes: trigger words, class words and the names of the
files training writes. Both systems' nodes check them here, so that a bad one gets the same clear answer anywhere."""
from __future__ import annotations

import re

FILE_SUFFIX = ".safetensors"
MAX_CLASS_WORD_LENGTH = 40
_FORBIDDEN_NAME_CHARS = re.compile(r'[<>:"/\\|?*\x00-\x1f]')
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
_PROMPT_SYNTAX = set("()[]{}:\\,|<>")


class InvalidName(ValueError):
    """A trigger word, class word or file name that cannot be used; the message says why and what to type."""


def validate_trigger(trigger: str, class_word: str | None = None) -> str:
    """A trigger is one word the prompt can contain, e.g. 'sks', and not the class word itself."""
    if not isinstance(trigger, str) or not trigger.strip():
        raise InvalidName("The trigger word is empty. Type a single rare word such as 'sks' and use it in the prompt.")
    word = trigger.strip()
    if any(ch.isspace() for ch in word):
        raise InvalidName(f"The trigger word {trigger!r} has spaces. Use a single word such as 'sks' or 'ohwx'.")
    _check_prompt_syntax(trigger, word, "trigger word", "Use letters and digits only, e.g. 'sks'.")
    if not any(ch.isalnum() for ch in word):
        raise InvalidName(f"The trigger word {trigger!r} has no letter or digit, so prompts cannot name it reliably. "
                          "Use a rare word such as 'sks' or 'ohwx'.")
    if class_word is not None and word.lower() == class_word.strip().lower():
        raise InvalidName(f"The trigger word {word!r} is the class word itself: every {word!r} in a prompt would "
                          "become this identity. Use a rare word such as 'sks' as the trigger.")
    return word


def validate_class_word(class_word: str) -> str:
    """What the subject is: 'person', 'dog', or a few words such as 'golden retriever'."""
    if not isinstance(class_word, str) or not class_word.strip():
        raise InvalidName("The class word is empty. Say what the subject is: 'person' for faces, 'dog', 'cat', "
                          "'teddy bear'...")
    words = " ".join(class_word.split())
    _check_prompt_syntax(class_word, words, "class word", "Use plain words, e.g. 'golden retriever'.")
    if not any(ch.isalpha() for ch in words) or len(words) > MAX_CLASS_WORD_LENGTH:
        raise InvalidName(f"The class word {class_word!r} should be one to a few plain words ({MAX_CLASS_WORD_LENGTH} "
                          "characters at most) saying what the subject is, e.g. 'person' or 'golden retriever'.")
    return words


def _check_prompt_syntax(raw: str, text: str, what: str, advice: str) -> None:
    bad = sorted(set(text) & _PROMPT_SYNTAX)
    if bad:
        raise InvalidName(f"The {what} {raw!r} contains prompt syntax {''.join(bad)!r}. {advice}")


def validate_file_name(name: str, what: str = "identity") -> str:
    """A file name (without folders) for what a node writes (`what`: "identity", "PVA encoder"...); returns it with
    the .safetensors suffix."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidName(f"The {what} name is empty. Give it a file name such as 'anna'.")
    stem = name.strip()
    if stem.lower().endswith(FILE_SUFFIX):
        stem = stem[: -len(FILE_SUFFIX)]
    if stem.strip(".") == "":
        raise InvalidName(f"The {what} name {name!r} is not a file name. Use something like 'anna'.")
    if _FORBIDDEN_NAME_CHARS.search(stem) or ".." in stem:
        raise InvalidName(f"The {what} name {name!r} contains a path separator, '..' or a character that "
                          "file systems reject (<>:\"/\\|?*). Use letters, digits, '-' and '_', e.g. 'anna_v2'.")
    if stem.endswith((".", " ")) or stem.split(".")[0].upper() in _WINDOWS_RESERVED:
        raise InvalidName(f"The {what} name {name!r} is not allowed on Windows. Use e.g. 'anna_v2'.")
    if len(stem) > 100:
        raise InvalidName(f"The {what} name is {len(stem)} characters long; keep it under 100.")
    return stem + FILE_SUFFIX
