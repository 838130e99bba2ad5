"""Run the command line with ``python -m mammo_dissect``."""

from mammo_dissect.core.cli import main


if __name__ == "__main__":
    main()
