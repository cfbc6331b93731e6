"""NLI triplets for supervised contrastive fine-tuning: SimCSE's `sent0,sent1,hard_neg` CSV layout."""

from pathlib import Path

from ..core.errors import UserError
from .paths import require_file, resolve_data_root

NLI_COLUMNS = ("sent0", "sent1", "hard_neg")
DEFAULT_NLI_FILES = ("nli/snli_dev_triplets.csv", "nli/snli_test_triplets.csv")


def read_nli_triplets(paths=None, data_root=None):
    """(anchors, positives, hard_negatives) lists from one or more CSV files.

    `paths` default to the shared SNLI dev+test triplets under the data root; relative paths are taken
    from the data root when they are not found as given.
    """
    import datasets  # loaded here: it is slow to import and only fine-tuning needs it

    if paths is None:
        root = resolve_data_root(data_root)
        paths = [root / p for p in DEFAULT_NLI_FILES]
    files = [str(require_file(Path(p))) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    table = datasets.load_dataset("csv", data_files=files, split="train", keep_in_memory=True)
    missing = [c for c in NLI_COLUMNS if c not in table.column_names]
    if missing:
        raise UserError(
            f"{', '.join(files)}: missing column(s) {', '.join(missing)}; "
            f"expected a CSV header '{','.join(NLI_COLUMNS)}' (found: {','.join(table.column_names)})"
        )
    columns = [table[c] for c in NLI_COLUMNS]
    for row, values in enumerate(zip(*columns)):
        if any(v is None or not str(v).strip() for v in values):
            raise UserError(
                f"{', '.join(files)}: data row {row + 1} has an empty cell; every triplet needs "
                "all three sentences (remove or fill the row)"
            )
    return tuple([str(v) for v in col] for col in columns)
