"""The MONAI Deploy tests run in the Deploy environment (``.venv-deploy``, ``make deploy-setup``); ``make test`` runs
them there. Elsewhere (the main ``.venv``, which must not hold the SDK: MONAI would import it in every run) they
are not collected."""

import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("monai.deploy") else ["test_*.py"]
