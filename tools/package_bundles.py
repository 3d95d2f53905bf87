"""Package bundles as Model Zoo zips with a ``model_info.json`` index: ``package-bundles --help``.

The packaging lives in :mod:`tools.release.package`; this is its command line.
"""

from tools.release.package import main

if __name__ == "__main__":
    main()
