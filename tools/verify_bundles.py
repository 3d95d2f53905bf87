"""Check every bundle (metadata, large-file hashes, config properties, networks): ``verify-bundles --help``.

The checks live in :mod:`tools.release.verify`; this is its command line.
"""

from tools.release.verify import cli

if __name__ == "__main__":
    cli()
