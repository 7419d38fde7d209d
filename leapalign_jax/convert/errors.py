"""The one error type every converter raises."""

from leapalign_jax.errors import UserError


class ConversionError(UserError):
  """Weights cannot be read or do not match the model; the message says why.

  Messages are one line: what is wrong, where (file / key names, the first few
  when there are many), and how to fix it.
  """


def name_some(names, limit: int = 5) -> str:
  """Formats the first ``limit`` names of a collection, with a count."""
  names = sorted(names)
  shown = ", ".join(names[:limit])
  more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
  return f"{shown}{more}"
