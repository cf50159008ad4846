"""The model zoo: importing this package registers every family with the harness."""
from . import dit  # noqa: F401
from . import vivit  # noqa: F401
from . import navit  # noqa: F401
from . import vit  # noqa: F401
