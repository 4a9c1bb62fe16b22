"""Entry point run by the emulated aarch64 Python: `python3.11 run_cli.py predict ...` == `edge-quq predict ...`."""
import sys

sys.argv[0] = "edge-quq"
from edge_quq.cli import main  # noqa: E402

main()
