"""The files a training node writes into its models folder, by the name the artist typed: the path, the refusal to
replace one unless asked, and the node's fingerprint (a cached training whose file was deleted since runs again)."""
from __future__ import annotations

import os

from ..sefi_core.names import InvalidName, validate_file_name
from .folders import identity_save_dir


class OutputFiles:
    """One training node's output files in `folder`; `what` names them in messages ("identity", "PVA encoder")."""

    def __init__(self, folder: str, what: str):
        self.folder, self.what = folder, what
        self.written: set[str] = set()  # the files this session's runs wrote
        self.generation: dict[str, int] = {}

    def path(self, name: str) -> str:
        return os.path.join(identity_save_dir(self.folder), validate_file_name(name, self.what))

    def new_path(self, name: str, overwrite: bool) -> str:
        """The path to write, refused where a file of that name exists and `overwrite` is off."""
        path = self.path(name)
        if os.path.exists(path) and not overwrite:
            article = "An" if self.what[0].lower() in "aeiou" else "A"
            raise InvalidName(f"{article} {self.what} named {os.path.basename(path)!r} already exists. Choose another "
                              "name, or switch 'overwrite' on to replace it.")
        return path

    def fingerprint(self, name) -> str:
        """For fingerprint_inputs: the file the node writes, a new generation once a file it wrote was deleted (the
        executor re-runs a node whose fingerprint changed)."""
        try:
            path = self.path(name)
        except InvalidName:
            return str(name)  # execute() reports the bad name
        if path in self.written and not os.path.exists(path):
            self.written.discard(path)
            self.generation[path] = self.generation.get(path, 0) + 1
        return f"{path}#{self.generation.get(path, 0)}"

    def wrote(self, path: str) -> None:
        self.written.add(path)
