"""``python -m lorasmith`` runs the command-line interface."""

from lorasmith.cli import main

if __name__ == "__main__":
    main()
