"""The MONAI Label tests run in the MONAI Label environment (``.venv-label``, ``make label-setup``); ``make test``
runs them there. Elsewhere they are not collected."""

import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("monailabel") else ["test_*.py"]
