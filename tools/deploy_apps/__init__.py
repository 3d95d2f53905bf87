"""MONAI Deploy applications of the bundles (run in the separate ``.venv-deploy`` environment: ``make deploy-setup``).

Each application calls a bundle's ``inference.json`` through :func:`common.bundle.runner.run_bundle`; none
re-implements sampling.
"""
