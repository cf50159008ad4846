"""The model zoo: importing this package registers every family with the harness."""
from . import dit  # noqa: F401
