"""Reading the files a user names (corpora, requests, facts, hyper-parameters) with one-line errors.

    text = read_text("corpus.txt", "corpus")   # InputFileError: "corpus 'x.txt' is not UTF-8 …"
"""

from __future__ import annotations

from pathlib import Path

from memlens.errors import InputFileError, InvalidArgument


def read_text(path: str | Path, what: str) -> str:
    """The UTF-8 text of ``path``; :class:`InputFileError` naming ``what`` and the file when it
    is missing, a directory, unreadable, or not UTF-8 (with the first bad byte's offset)."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputFileError(f"{what} {str(path)!r} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} "
                             f"at offset {exc.start}); convert it to UTF-8") from None
    except FileNotFoundError:
        raise InputFileError(f"{what} {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise InputFileError(f"{what} {str(path)!r} is a directory, expected a file") from None
    except OSError as exc:
        raise InputFileError(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}") from None


def check_unicode(text: str, what: str) -> str:
    """``text`` unchanged, or :class:`InvalidArgument` naming ``what`` when it holds a lone
    surrogate (a ``"\\ud800"`` JSON escape, or a non-UTF-8 byte in a command-line argument):
    no tokenizer accepts one."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgument(f"{what} {text!r:.80} is not valid Unicode text: it holds the lone "
                              f"surrogate {text[exc.start]!r} at character {exc.start} (from a "
                              "'\\ud800'-style JSON escape or a non-UTF-8 byte)") from None
    return text
