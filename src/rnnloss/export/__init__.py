"""The export wing: artifacts from a config, their parity with eager mode, the atomic install, --verify.

``rnnloss-export`` (and ``export/export.py``) run :func:`main`; the registry of artifacts is
:mod:`rnnloss.export.artifacts`. Importing this package imports neither torch nor the CLI.
"""


def main(argv=None) -> int:
    """The ``rnnloss-export`` command (:func:`rnnloss.export.cli.main`)."""
    from .cli import main as cli_main
    return cli_main(argv)
