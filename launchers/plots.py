"""Draw the figures of docs/results.md from docs/results.json and the runs' TensorBoard files.

python launchers/plots.py                       # -> docs/figures/*.png
python launchers/plots.py --out /tmp/figures
"""

import argparse
import json
import sys
from pathlib import Path

from disco_dist.cli.config import Parser
from disco_dist.core.errors import UserError, exit_on_user_error


@exit_on_user_error
def main(argv=None):
    parser = Parser(prog="plots.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path("docs") / "results.json")
    parser.add_argument("--out", type=Path, default=Path("docs") / "figures", help="folder for the PNG files")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not args.results.is_file():
        raise UserError(f"--results {args.results}: no such file; record rows with launchers/reproduce.py first")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("plots.py needs matplotlib: pip install 'disco-dist[plots]' (or matplotlib)") from None
    from disco_dist.report.figures import draw_all

    for path in draw_all(json.loads(args.results.read_text()), args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
