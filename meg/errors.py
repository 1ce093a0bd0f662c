"""Errors users see. Every message names what was wrong and where."""


class MegError(Exception):
    """Base class for errors that the CLI reports as one clear line and exit code 2."""

    exit_code = 2


class ModelSourceError(MegError):
    """A base model cannot be found, installed or loaded (bad path, offline hub id, ...)."""


class ConfigError(MegError):
    """A setting has a wrong name, type or value."""


class BundleError(MegError):
    """An edit bundle or checkpoint is missing, corrupted, or belongs to another base model."""


class StoreError(MegError):
    """An artifact store cannot be reached, refuses an upload, or does not hold all of it afterwards."""


class FactProblem:
    """One problem in a fact file: `FILE:record N: field 'X': reason`."""

    def __init__(self, file: str, record: int | None, field: str | None, reason: str):
        self.file, self.record, self.field, self.reason = str(file), record, field, reason

    def __str__(self) -> str:
        where = self.file
        if self.record is not None:
            where += f":record {self.record}"
        if self.field is not None:
            where += f": field '{self.field}'"
        return f"{where}: {self.reason}"

    def __repr__(self) -> str:
        return f"FactProblem({str(self)!r})"


class FactsError(MegError):
    """A fact file has one or more problems; `problems` lists them all."""

    def __init__(self, problems: list[FactProblem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))
