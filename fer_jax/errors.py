"""User-facing errors: one clear line, no traceback (launch.py prints them)."""


class FerJaxError(Exception):
  """An error caused by the user's input or config, reported as one line."""


class DataError(FerJaxError):
  """Bad or missing data: the message names the file, the line and the problem."""


class ConfigError(FerJaxError):
  """An invalid configuration value."""
