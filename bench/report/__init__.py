"""The HTML report: frames, figures, guidance, the page."""


class ReportWriteError(Exception):
    """The report could not be written (a full disk, a file-size limit, no permission); the
    store is untouched and no half-written report is left. Exit code 1."""

    code = 1
