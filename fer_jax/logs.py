"""Log filters that keep the command-line tools' output to what they report."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

# What orbax says, as a warning, about every read-only manager: expected when loading a
# trained workdir, so not shown.
_READ_ONLY_NOTICES = ('CheckpointManagerOptions.read_only=True', 'Given directory is read only')


class QuietLibraries(logging.Filter):
  """Hides orbax's and grain's INFO records unless --verbosity is raised above 0."""

  def filter(self, record: logging.LogRecord) -> bool:
    from absl import logging as absl_logging

    noisy = '/orbax/' in record.pathname or '/grain/' in record.pathname
    return not noisy or record.levelno >= logging.WARNING or absl_logging.get_verbosity() > 0


def quiet_library_logs() -> None:
  """Installs `QuietLibraries` on absl's handler (launch.py and every CLI call this once)."""
  from absl import logging as absl_logging

  absl_logging.get_absl_handler().addFilter(QuietLibraries())


class _DropReadOnlyNotices(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_READ_ONLY_NOTICES)


@contextlib.contextmanager
def quiet_read_only_notices() -> Iterator[None]:
  """Drops orbax's warning that a manager is read only, for the duration of the block."""
  absl_logger = logging.getLogger('absl')
  notice_filter = _DropReadOnlyNotices()
  absl_logger.addFilter(notice_filter)
  try:
    yield
  finally:
    absl_logger.removeFilter(notice_filter)
